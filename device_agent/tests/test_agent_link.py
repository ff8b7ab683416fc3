"""The link's delivery rules against a scripted broker on a loopback port.

The test plays the broker's side of MQTT 5 (CONNACK, SUBACK, a PUBACK reason code chosen per
message, stored-acks sent on ``ack``) in the same asyncio loop as the link, so it decides
exactly what each publish meets. Against a real Mosquitto and ingest: tests/test_agent_live.py.
"""

import asyncio
import contextlib
import itertools
import json
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from device_agent.link import BrokerAddress, DeleteOn, Link
from device_agent.store import DeviceStore, DropCounts, open_database
from paho.mqtt.properties import VariableByteIntegers

from device_agent import link as link_module

DEVICE = "dev-0001"
ACK_TOPIC = f"galvani/v1/d/{DEVICE}/ack"
T0 = 1_763_805_600_000
WAIT_S = 5.0
TICK_S = 0.01

# PUBACK reason codes (MQTT 5.0 section 3.4.2.1).
SUCCESS = 0x00
NO_MATCHING_SUBSCRIBERS = 0x10

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
    published: list[Publish] = field(default_factory=list)
    subscriptions: list[list[tuple[str, int]]] = field(default_factory=list)
    connects: int = 0
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
        self._writer.write(_packet(0x30, _utf8(topic) + b"\x00" + payload))

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
        try:
            while True:
                first, body = await _read_packet(reader)
                kind = first >> 4
                if kind == 1:  # CONNECT
                    writer.write(b"\x20\x03\x00\x00\x00")
                elif kind == 8:  # SUBSCRIBE
                    filters = self._filters(body)
                    self.subscriptions.append(filters)
                    granted = bytes(qos for _, qos in filters)
                    writer.write(_packet(0x90, body[:2] + b"\x00" + granted))
                elif kind == 3:  # PUBLISH
                    self._on_publish(first, body, loop.time(), writer)
                elif kind == 12:  # PINGREQ
                    writer.write(b"\xd0\x00")
                elif kind == 14:  # DISCONNECT
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @staticmethod
    def _filters(body: bytes) -> list[tuple[str, int]]:
        size, used = VariableByteIntegers.decode(body[2:])
        at = 2 + used + size
        filters = []
        while at < len(body):
            length = int.from_bytes(body[at : at + 2], "big")
            filters.append((body[at + 2 : at + 2 + length].decode(), body[at + 2 + length] & 3))
            at += 3 + length
        return filters

    def _on_publish(self, first: int, body: bytes, at: float, writer: asyncio.StreamWriter) -> None:
        qos = (first >> 1) & 3
        length = int.from_bytes(body[:2], "big")
        topic = body[2 : 2 + length].decode()
        packet_id = body[2 + length : 4 + length]
        size, used = VariableByteIntegers.decode(body[4 + length :])
        payload = json.loads(body[4 + length + used + size :])
        channel = topic.rsplit("/", 1)[1]
        seq = payload.get("seq") if channel != "presence" else None
        reason = SUCCESS
        if seq is not None:
            reason = self.pubacks(seq, self.seqs().count(seq))
        self.published.append(Publish(at, channel, seq, reason))
        if qos == 1:
            writer.write(_packet(0x40, packet_id + bytes((reason,))))


@dataclass
class Device:
    link: Link
    store: DeviceStore
    broker: ScriptedBroker

    def enqueue(self, count: int = 1, channel: str = "telemetry") -> None:
        for _ in range(count):
            self.store.enqueue(
                channel, lambda seq: json.dumps({"v": 1, "seq": seq}).encode(), now_ms=T0
            )

    def outbox(self) -> list[int]:
        return [m.seq for m in self.store.pending(limit=1000)]

    async def until(self, check: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not check():
            if loop.time() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await asyncio.sleep(TICK_S)


@pytest.fixture(autouse=True)
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    """Backoffs in tens of milliseconds; no stored-ack timeout unless a test sets one."""
    monkeypatch.setattr(link_module, "BACKOFF_MIN_S", 0.02)
    monkeypatch.setattr(link_module, "RETRY_BACKOFF_MIN_S", 0.05)
    monkeypatch.setattr(link_module, "RETRY_BACKOFF_MAX_S", 0.1)
    monkeypatch.setattr(link_module, "ACK_TIMEOUT_S", 3600.0)


@contextlib.asynccontextmanager
async def connected(
    tmp_path: Path, broker: ScriptedBroker, delete_on: DeleteOn = DeleteOn.STORED
) -> AsyncIterator[Device]:
    """A link on the running loop, connected to ``broker``, serviced every few milliseconds."""
    loop = asyncio.get_running_loop()
    port = await broker.start()
    conn = open_database(tmp_path / "agent.sqlite3")
    store = DeviceStore(conn, DEVICE)
    link = Link(
        DEVICE,
        BrokerAddress("127.0.0.1", port, "password"),
        store,
        lambda raw: None,
        loop=loop,
        rng=random.Random(1),
        delete_on=delete_on,
    )

    async def service() -> None:
        while True:
            link.pump()
            link.service()
            await asyncio.sleep(TICK_S)

    ticker = asyncio.create_task(service())
    link.start()
    device = Device(link, store, broker)
    try:
        await device.until(lambda: link.connected, "the link to connect")
        yield device
    finally:
        ticker.cancel()
        link.stop()
        await asyncio.sleep(0.05)  # the DISCONNECT goes out
        await broker.close()
        conn.close()


def test_a_delivered_message_stays_in_the_outbox_until_a_stored_ack_covers_it(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with connected(tmp_path, ScriptedBroker()) as device:
            device.enqueue(3)
            await device.until(lambda: device.link.stats.delivered == 3, "three PUBACKs")
            assert device.outbox() == [1, 2, 3]  # the broker has them; the backend may not

            device.broker.ack((1, 2))
            await device.until(lambda: device.outbox() == [3], "seqs 1 and 2 deleted")
            assert device.store.backlog()[0] == 1
            device.broker.ack((3, 3), (1, 2))  # and 1..2 acknowledged again: nothing more
            await device.until(lambda: device.outbox() == [], "seq 3 deleted")

            assert device.link.stats.stored == 3
            assert device.broker.seqs() == [1, 2, 3]  # sent once each
            assert device.store.dropped() == DropCounts()

    asyncio.run(scenario())


def test_the_link_subscribes_to_config_and_ack_on_every_connection(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with connected(tmp_path, ScriptedBroker()) as device:
            device.broker.hang_up()
            await device.until(lambda: device.broker.connects == 2, "a reconnect")
            await device.until(lambda: len(device.broker.subscriptions) == 2, "a subscribe")

            wanted = {f"galvani/v1/d/{DEVICE}/config", ACK_TOPIC}
            for subscription in device.broker.subscriptions:
                assert {name for name, _ in subscription} == wanted

    asyncio.run(scenario())


def test_a_new_connection_sends_every_unstored_message_again_from_the_oldest(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with connected(tmp_path, ScriptedBroker()) as device:
            device.enqueue(4)
            await device.until(lambda: device.link.stats.delivered == 4, "four PUBACKs")
            device.broker.ack((2, 2))
            await device.until(lambda: device.outbox() == [1, 3, 4], "seq 2 deleted")

            device.broker.hang_up()  # say the broker crashed with 1, 3 and 4 in memory
            await device.until(lambda: device.broker.seqs()[4:] == [1, 3, 4], "a resend")

            assert device.outbox() == [1, 3, 4]

    asyncio.run(scenario())


def test_a_malformed_ack_deletes_nothing_and_the_link_carries_on(tmp_path: Path) -> None:
    malformed = [
        b"not json",
        b"[" * 100_000,
        b'{"v": 2, "seqs": [[1, 3]]}',
        b'{"v": 1, "seqs": [[1, 3], [5, 4]]}',
        b'{"v": 1, "seqs": [[1, true]]}',
        b'{"v": 1}',
        b"",
    ]

    async def scenario() -> None:
        async with connected(tmp_path, ScriptedBroker()) as device:
            device.enqueue(3)
            await device.until(lambda: device.link.stats.delivered == 3, "three PUBACKs")
            for payload in malformed:
                device.broker.send(ACK_TOPIC, payload)
            device.broker.ack((2, 2))  # a good ack after them is still read
            await device.until(lambda: device.outbox() == [1, 3], "seq 2 deleted")

            assert device.link.stats.malformed_acks == len(malformed)
            assert device.link.connected

    asyncio.run(scenario())


def test_no_matching_subscribers_keeps_the_message_and_sends_it_again_after_a_backoff(
    tmp_path: Path,
) -> None:
    # After a broker restart the backend's subscription is not back yet: the first two tries
    # of every message meet no subscriber.
    broker = ScriptedBroker(lambda seq, seen: NO_MATCHING_SUBSCRIBERS if seen < 2 else SUCCESS)

    async def scenario() -> None:
        async with connected(tmp_path, broker) as device:
            device.enqueue(3)
            await device.until(lambda: device.link.stats.delivered == 3, "every seq taken")

            assert device.outbox() == [1, 2, 3]  # delivered, not yet stored
            assert device.link.stats.no_subscribers == 6
            assert broker.seqs(SUCCESS) == [1, 2, 3]
            # Each round starts again from the oldest message not taken, in seq order.
            assert broker.seqs() == [1, 2, 3] * 3
            tries = [p.at for p in broker.published if p.seq == 1]
            assert tries[1] - tries[0] >= 0.5 * link_module.RETRY_BACKOFF_MIN_S

    asyncio.run(scenario())


def test_quota_exceeded_is_sent_again_until_the_broker_takes_it(tmp_path: Path) -> None:
    refusals = link_module.REFUSED_RETRIES + 2  # more than a refusal that may not clear gets
    broker = ScriptedBroker(lambda seq, seen: 0x97 if seq == 2 and seen < refusals else SUCCESS)

    async def scenario() -> None:
        async with connected(tmp_path, broker) as device:
            device.enqueue(3)
            await device.until(lambda: set(broker.seqs(SUCCESS)) == {1, 2, 3}, "every seq taken")

            assert broker.seqs().count(2) == refusals + 1
            assert device.link.stats.retried == refusals
            assert device.store.dropped() == DropCounts()
            assert device.outbox() == [1, 2, 3]

    asyncio.run(scenario())


@pytest.mark.parametrize("code", [0x87, 0x90, 0x99], ids=hex)
def test_a_refusal_that_cannot_clear_is_given_up_and_reported_as_a_drop(
    tmp_path: Path, code: int
) -> None:
    broker = ScriptedBroker(lambda seq, seen: code if seq == 2 else SUCCESS)

    async def scenario() -> None:
        async with connected(tmp_path, broker) as device:
            device.enqueue(3)
            await device.until(lambda: broker.seqs(SUCCESS) == [1, 3], "seqs 1 and 3 taken")
            await device.until(lambda: device.link.stats.refused == 1, "seq 2 given up")

            assert broker.seqs().count(2) == 1
            assert device.outbox() == [1, 3]
            assert device.store.dropped() == DropCounts(
                messages=1, telemetry=1, first_seq=2, last_seq=2
            )

    asyncio.run(scenario())


@pytest.mark.parametrize("code", [0x80, 0x83, 0x91], ids=hex)
def test_a_refusal_that_may_clear_is_sent_again_a_few_times_then_given_up(
    tmp_path: Path, code: int
) -> None:
    broker = ScriptedBroker(lambda seq, seen: code if seq == 2 else SUCCESS)

    async def scenario() -> None:
        async with connected(tmp_path, broker) as device:
            device.enqueue(3, channel="events")
            await device.until(lambda: device.link.stats.refused == 1, "seq 2 given up")
            await device.until(lambda: set(broker.seqs(SUCCESS)) == {1, 3}, "seqs 1 and 3 taken")

            assert broker.seqs().count(2) == 1 + link_module.REFUSED_RETRIES
            assert device.outbox() == [1, 3]
            assert device.store.dropped() == DropCounts(
                messages=1, events=1, first_seq=2, last_seq=2
            )

    asyncio.run(scenario())


def test_delivered_messages_without_a_stored_ack_are_sent_again_with_a_doubling_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    timeout_s = 0.15
    monkeypatch.setattr(link_module, "ACK_TIMEOUT_S", timeout_s)
    monkeypatch.setattr(link_module, "ACK_TIMEOUT_MAX_S", 4 * timeout_s)

    def tries(broker: ScriptedBroker, seq: int) -> list[float]:
        return [p.at for p in broker.published if p.seq == seq]

    async def scenario() -> None:
        async with connected(tmp_path, ScriptedBroker()) as device:
            device.enqueue(2)
            await device.until(lambda: len(tries(device.broker, 1)) == 5, "four resends", 10)

            sent = tries(device.broker, 1)
            waits = [later - earlier for earlier, later in itertools.pairwise(sent)]
            # 0.15, 0.3, 0.6, then the cap (0.6) again, not 1.2.
            for wait, floor in zip(waits, [1, 2, 4, 4], strict=True):
                assert wait >= floor * timeout_s * 0.95
            assert waits[3] < 7 * timeout_s
            assert device.broker.seqs()[:4] == [1, 2, 1, 2]  # from the oldest, in order
            assert device.link.stats.resends == 4

            # A stored-ack starts the wait over at its shortest for what is left.
            device.broker.ack((1, 1))
            await device.until(lambda: device.outbox() == [2], "seq 1 deleted")
            acked_at = asyncio.get_running_loop().time()
            before = len(tries(device.broker, 2))
            await device.until(lambda: len(tries(device.broker, 2)) > before, "seq 2 again")
            assert tries(device.broker, 2)[-1] - acked_at < 3 * timeout_s
            assert 1 not in device.broker.seqs()[-1:]

    asyncio.run(scenario())


def test_a_message_whose_ack_was_lost_is_sent_again_while_acks_for_others_keep_coming(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ingest worker killed between its commit and its publish loses that batch's acks;
    the backend goes on storing and acking the device's later messages. The unacked one must
    not wait for the next reconnect (days, for a device that stays online)."""
    timeout_s = 0.3
    monkeypatch.setattr(link_module, "ACK_TIMEOUT_S", timeout_s)
    monkeypatch.setattr(link_module, "ACK_TIMEOUT_MAX_S", timeout_s)

    async def scenario() -> None:
        async with connected(tmp_path, ScriptedBroker()) as device:
            device.enqueue(1)
            await device.until(lambda: device.broker.seqs() == [1], "seq 1 delivered")
            first_sent = device.broker.published[-1].at
            loop = asyncio.get_running_loop()
            seq = 1
            # A streaming device: a message every 50 ms, each acked, seq 1 never.
            while device.broker.seqs().count(1) < 2:
                assert loop.time() - first_sent < 6 * timeout_s, "seq 1 was never sent again"
                device.enqueue(1)
                seq += 1
                await device.until(lambda s=seq: s in device.broker.seqs(), f"seq {seq}")
                device.broker.ack((seq, seq))
                await asyncio.sleep(0.05)
            resent_at = [p.at for p in device.broker.published if p.seq == 1][1]
            assert resent_at - first_sent >= timeout_s * 0.95
            device.broker.ack((1, 1))
            await device.until(lambda: 1 not in device.outbox(), "seq 1 deleted")

    asyncio.run(scenario())


def test_puback_mode_deletes_on_the_brokers_puback_as_before(tmp_path: Path) -> None:
    broker = ScriptedBroker(lambda seq, seen: NO_MATCHING_SUBSCRIBERS if seq == 2 else SUCCESS)

    async def scenario() -> None:
        async with connected(tmp_path, broker, DeleteOn.PUBACK) as device:
            device.enqueue(3)
            await device.until(lambda: device.outbox() == [], "every message deleted")

            # No backend stored-acks in this mode: the broker taking it (even with nobody
            # subscribed) is the end of the device's part, as before stored-acks.
            assert broker.seqs() == [1, 2, 3]
            assert device.link.stats.delivered == 3
            assert [[name for name, _ in s] for s in broker.subscriptions] == [
                [f"galvani/v1/d/{DEVICE}/config"]
            ]

    asyncio.run(scenario())
