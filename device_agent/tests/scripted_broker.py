"""A scripted MQTT 5 or 3.1.1 broker on a loopback port, and a link connected to it, for the
link's tests.

The test plays the broker's side of MQTT 5 (CONNACK, SUBACK, a PUBACK reason code chosen per
message, stored-acks sent on ``ack``) or of MQTT 3.1.1 (the same packets without reason codes
or properties; a refusal is a closed connection), whichever the device's CONNECT asks for, in
the same asyncio loop as the link, so it decides exactly what each publish meets. Against a
real Mosquitto and ingest: tests/test_agent_live.py.
"""

import asyncio
import contextlib
import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from agent_rig import DURABLE
from device_agent.connection import MQTT_5
from device_agent.link import BrokerAddress, DeleteOn, Link
from device_agent.store import DeviceStore, open_database
from paho.mqtt.properties import VariableByteIntegers

DEVICE = "dev-0001"
ACK_TOPIC = f"galvani/v1/d/{DEVICE}/ack"
T0 = 1_763_805_600_000
WAIT_S = 5.0
TICK_S = 0.01

# PUBACK reason codes (MQTT 5.0 section 3.4.2.1).
SUCCESS = 0x00
NO_MATCHING_SUBSCRIBERS = 0x10
NOT_AUTHORIZED = 0x87
# What a 3.1.1 SUBACK returns for a refused filter (MQTT 3.1.1 section 3.9.3).
SUBACK_FAILURE_311 = 0x80
# The MQTT 3.1.1 broker's answer to a publish it will not take: it closes the connection.
HANG_UP = -1

# (seq, how often the broker has seen it before) -> the PUBACK reason code for this copy.
Pubacks = Callable[[int, int], int]


@dataclass(frozen=True)
class Publish:
    """A PUBLISH the broker received."""

    at: float  # loop time
    channel: str
    seq: int | None  # None for presence
    reason: int  # what the broker answered


def _packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + VariableByteIntegers.encode(len(body)) + body


def _utf8(text: str) -> bytes:
    data = text.encode()
    return len(data).to_bytes(2, "big") + data


async def _read_packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    first = (await reader.readexactly(1))[0]
    length, multiplier = 0, 1
    while True:
        digit = (await reader.readexactly(1))[0]
        length += (digit & 0x7F) * multiplier
        if not digit & 0x80:
            break
        multiplier *= 128
    return first, await reader.readexactly(length)


@dataclass
class ScriptedBroker:
    """The broker's side of the device's connections; ``pubacks`` chooses each PUBACK."""

    pubacks: Pubacks = lambda seq, seen: SUCCESS
    refuse: frozenset[str] = frozenset()  # filters the SUBACK refuses (0x87, not authorized)
    wedged: bool = (
        False  # takes connections and reads, as a stopped node's kernel does; answers nothing
    )
    published: list[Publish] = field(default_factory=list)
    subscriptions: list[list[tuple[str, int]]] = field(default_factory=list)
    connects: int = 0
    levels: list[int] = field(default_factory=list)  # each CONNECT's protocol level
    _server: asyncio.Server | None = None
    _writer: asyncio.StreamWriter | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def close(self) -> None:
        self.hang_up()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def send(self, topic: str, payload: bytes) -> None:
        """A QoS 0 PUBLISH to the device, as the backend's stored-acks are sent."""
        assert self._writer is not None
        properties = b"\x00" if self.levels[-1] == 5 else b""
        self._writer.write(_packet(0x30, _utf8(topic) + properties + payload))

    def ack(self, *ranges: tuple[int, int]) -> None:
        self.send(ACK_TOPIC, json.dumps({"v": 1, "seqs": [list(r) for r in ranges]}).encode())

    def hang_up(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def seqs(self, reason: int | None = None) -> list[int]:
        """Seqs published, in order, optionally only those answered with ``reason``."""
        return [
            p.seq
            for p in self.published
            if p.seq is not None and (reason is None or p.reason == reason)
        ]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.hang_up()
        self._writer = writer
        self.connects += 1
        loop = asyncio.get_running_loop()
        v5 = True
        try:
            while True:
                first, body = await _read_packet(reader)
                kind = first >> 4
                if self.wedged:
                    continue
                if kind == 1:  # CONNECT: protocol name, then its level
                    level = body[6]
                    self.levels.append(level)
                    v5 = level == 5
                    writer.write(b"\x20\x03\x00\x00\x00" if v5 else b"\x20\x02\x00\x00")
                elif kind == 8:  # SUBSCRIBE
                    filters = self._filters(body, v5)
                    self.subscriptions.append(filters)
                    refused = NOT_AUTHORIZED if v5 else SUBACK_FAILURE_311
                    granted = bytes(
                        refused if name in self.refuse else qos for name, qos in filters
                    )
                    writer.write(_packet(0x90, body[:2] + (b"\x00" if v5 else b"") + granted))
                elif kind == 3:  # PUBLISH
                    if not self._on_publish(first, body, loop.time(), writer, v5):
                        break
                elif kind == 12:  # PINGREQ
                    writer.write(b"\xd0\x00")
                elif kind == 14:  # DISCONNECT
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @staticmethod
    def _filters(body: bytes, v5: bool) -> list[tuple[str, int]]:
        at = 2
        if v5:
            size, used = VariableByteIntegers.decode(body[2:])
            at += used + size
        filters = []
        while at < len(body):
            length = int.from_bytes(body[at : at + 2], "big")
            filters.append((body[at + 2 : at + 2 + length].decode(), body[at + 2 + length] & 3))
            at += 3 + length
        return filters

    def _on_publish(
        self, first: int, body: bytes, at: float, writer: asyncio.StreamWriter, v5: bool
    ) -> bool:
        """Answer a PUBLISH; False when the broker closes the connection instead (3.1.1)."""
        qos = (first >> 1) & 3
        length = int.from_bytes(body[:2], "big")
        topic = body[2 : 2 + length].decode()
        packet_id = body[2 + length : 4 + length]
        properties = 0
        if v5:
            size, used = VariableByteIntegers.decode(body[4 + length :])
            properties = used + size
        payload = json.loads(body[4 + length + properties :])
        channel = topic.rsplit("/", 1)[1]
        seq = payload.get("seq") if channel != "presence" else None
        reason = SUCCESS
        if seq is not None:
            reason = self.pubacks(seq, self.seqs().count(seq))
        self.published.append(Publish(at, channel, seq, reason))
        if reason == HANG_UP:
            return False
        if qos == 1:
            writer.write(_packet(0x40, packet_id + (bytes((reason,)) if v5 else b"")))
        return True


class FakeClock:
    """The link's clock for its stored-ack timeouts: time moves only when a test says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Device:
    link: Link
    store: DeviceStore
    broker: ScriptedBroker
    clock: FakeClock
    ticks: int = 0  # how often the link has been serviced

    async def at(self, now: float) -> None:
        """Move the link's clock to ``now`` and let it be serviced at that time."""
        self.clock.now = now
        ticks = self.ticks
        await self.until(lambda: self.ticks >= ticks + 2, "the link serviced")

    async def marker(self) -> int:
        """Enqueue a message and wait until the broker has it: the link writes its packets in
        order, so the broker has by then everything the link sent before it. Its seq."""
        self.enqueue()
        seq = self.store.last_seq()
        await self.until(lambda: seq in self.broker.seqs(), f"marker seq {seq} published")
        return seq

    async def around(self, due: float) -> tuple[int, int]:
        """Markers just before ``due`` and at it, their seqs: what the broker received between
        them is what the link sent at ``due``."""
        await self.at(due - 0.001)
        before = await self.marker()
        await self.at(due)
        return before, await self.marker()

    def since(self, seq: int) -> list[int]:
        """The seqs the broker received after (the first copy of) ``seq``, in order."""
        seqs = self.broker.seqs()
        return seqs[seqs.index(seq) + 1 :]

    async def stream_to(self, now: float, step_s: float = 20.0) -> None:
        """Advance the clock to ``now`` as a device that streams does: a message every
        ``step_s``, each acknowledged as stored, so the backend is plainly answering."""
        while self.clock.now < now:
            await self.at(min(now, self.clock.now + step_s))
            seq = await self.marker()
            self.broker.ack((seq, seq))
            await self.until(lambda s=seq: s not in self.outbox(), f"marker seq {seq} stored")

    def sent(self, seq: int) -> int:
        """How often the broker has received ``seq``."""
        return self.broker.seqs().count(seq)

    def enqueue(self, count: int = 1, channel: str = "telemetry") -> None:
        for _ in range(count):
            self.store.enqueue(
                channel, lambda seq: json.dumps({"v": 1, "seq": seq}).encode(), now_ms=T0
            )

    async def deliver(self, count: int) -> None:
        """Enqueue ``count`` messages and wait for the broker's PUBACKs of them all."""
        delivered = self.link.stats.delivered + count
        self.enqueue(count)
        await self.until(lambda: self.link.stats.delivered == delivered, f"{count} PUBACKs")

    async def acked(self, *ranges: tuple[int, int], leaving: list[int]) -> None:
        """Send a stored-ack for ``ranges`` and wait until the outbox holds only ``leaving``."""
        self.broker.ack(*ranges)
        await self.until(lambda: self.outbox() == leaving, f"the outbox down to {leaving}")

    def outbox(self) -> list[int]:
        return [m.seq for m in self.store.pending(limit=1000)]

    async def until(self, check: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not check():
            if loop.time() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await asyncio.sleep(TICK_S)


@contextlib.asynccontextmanager
async def connected(
    tmp_path: Path,
    broker: ScriptedBroker,
    delete_on: DeleteOn = DeleteOn.STORED,
    clock: FakeClock | None = None,
    protocol: int = MQTT_5,
    fallbacks: tuple[tuple[str, int], ...] = (),
    keepalive_s: int = 60,
) -> AsyncIterator[Device]:
    """A link on the running loop, connected to ``broker``, serviced every few milliseconds.

    Its stored-ack timeouts run on ``clock`` (a new one by default): they fire only when the
    test moves it, however slowly the machine runs the loop.
    """
    loop = asyncio.get_running_loop()
    clock = clock or FakeClock()
    port = await broker.start()
    conn = open_database(tmp_path / "agent.sqlite3", durable=DURABLE)
    store = DeviceStore(conn, DEVICE)
    link = Link(
        DEVICE,
        BrokerAddress(
            "127.0.0.1",
            port,
            "password",
            protocol=protocol,
            fallbacks=fallbacks,
            keepalive_s=keepalive_s,
        ),
        store,
        lambda raw: None,
        loop=loop,
        rng=random.Random(1),
        delete_on=delete_on,
        clock=clock,
    )
    device = Device(link, store, broker, clock)

    async def service() -> None:
        while True:
            link.pump()
            link.service()
            device.ticks += 1
            await asyncio.sleep(TICK_S)

    ticker = asyncio.create_task(service())
    link.start()
    try:
        await device.until(lambda: link.connected, "the link to connect")
        yield device
    finally:
        ticker.cancel()
        link.stop()
        await asyncio.sleep(0.05)  # the DISCONNECT goes out
        await broker.close()
        conn.close()


def run_linked(
    scenario: Callable[[Device], Awaitable[None]],
    tmp_path: Path,
    broker: ScriptedBroker,
    delete_on: DeleteOn = DeleteOn.STORED,
    clock: FakeClock | None = None,
    protocol: int = MQTT_5,
) -> None:
    """Run ``scenario`` on a new loop with a device :func:`connected` to ``broker``."""

    async def main() -> None:
        async with connected(tmp_path, broker, delete_on, clock, protocol) as device:
            await scenario(device)

    asyncio.run(main())
