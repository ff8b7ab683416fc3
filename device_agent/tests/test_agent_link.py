"""The link's delivery rules against a scripted broker on a loopback port.

The test plays the broker's side of MQTT 5 (CONNACK, SUBACK, a PUBACK reason code chosen per
message, stored-acks sent on ``ack``) in the same asyncio loop as the link, so it decides
exactly what each publish meets. Against a real Mosquitto and ingest: tests/test_agent_live.py.
"""

import asyncio
import contextlib
import json
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from device_agent.link import BrokerAddress, DeleteOn, Link
from device_agent.store import DeviceStore, DropCounts, open_database
from paho.mqtt.properties import VariableByteIntegers

from device_agent import connection as connection_module
from device_agent import link as link_module
from device_agent import puback as puback_module
from device_agent import unstored as unstored_module

DEVICE = "dev-0001"
ACK_TOPIC = f"galvani/v1/d/{DEVICE}/ack"
T0 = 1_763_805_600_000
WAIT_S = 5.0
TICK_S = 0.01

# PUBACK reason codes (MQTT 5.0 section 3.4.2.1).
SUCCESS = 0x00
NO_MATCHING_SUBSCRIBERS = 0x10
NOT_AUTHORIZED = 0x87

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
                    granted = bytes(
                        NOT_AUTHORIZED if name in self.refuse else qos for name, qos in filters
                    )
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
    """Backoffs in tens of milliseconds (the stored-ack timeouts run on a fake clock)."""
    monkeypatch.setattr(connection_module, "BACKOFF_MIN_S", 0.02)
    monkeypatch.setattr(puback_module, "RETRY_BACKOFF_MIN_S", 0.05)
    monkeypatch.setattr(puback_module, "RETRY_BACKOFF_MAX_S", 0.1)


@contextlib.asynccontextmanager
async def connected(
    tmp_path: Path,
    broker: ScriptedBroker,
    delete_on: DeleteOn = DeleteOn.STORED,
    clock: FakeClock | None = None,
) -> AsyncIterator[Device]:
    """A link on the running loop, connected to ``broker``, serviced every few milliseconds.

    Its stored-ack timeouts run on ``clock`` (a new one by default): they fire only when the
    test moves it, however slowly the machine runs the loop.
    """
    loop = asyncio.get_running_loop()
    clock = clock or FakeClock()
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
            assert tries[1] - tries[0] >= 0.5 * puback_module.RETRY_BACKOFF_MIN_S

    asyncio.run(scenario())


def test_quota_exceeded_is_sent_again_until_the_broker_takes_it(tmp_path: Path) -> None:
    refusals = puback_module.REFUSED_RETRIES + 2  # more than a refusal that may not clear gets
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

            assert broker.seqs().count(2) == 1 + puback_module.REFUSED_RETRIES
            assert device.outbox() == [1, 3]
            assert device.store.dropped() == DropCounts(
                messages=1, events=1, first_seq=2, last_seq=2
            )

    asyncio.run(scenario())


@pytest.fixture
def ack_timeouts(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """The stored-ack timeouts as shipped (30 s doubling to 480 s), on a fake clock."""
    monkeypatch.setattr(unstored_module, "ACK_TIMEOUT_S", 30.0)
    monkeypatch.setattr(unstored_module, "ACK_TIMEOUT_MAX_S", 480.0)
    return FakeClock()


def test_with_no_stored_ack_at_all_only_the_oldest_message_is_sent_again_with_a_doubling_wait(
    tmp_path: Path, ack_timeouts: FakeClock
) -> None:
    """The backend silent (ingest or PostgreSQL down): one probe, not the whole outbox."""

    async def scenario() -> None:
        async with connected(tmp_path, ScriptedBroker(), clock=ack_timeouts) as device:
            device.enqueue(3)
            await device.until(lambda: device.link.stats.delivered == 3, "three PUBACKs")

            due = 0.0
            for probes, wait in enumerate((30, 60, 120, 240, 480, 480), start=1):
                due += wait
                await device.at(due - 0.001)
                await device.marker()
                assert device.sent(1) == probes, f"seq 1 sent again before {due} s"
                await device.at(due)
                await device.marker()
                assert device.sent(1) == 1 + probes, f"seq 1 not sent again at {due} s"
            assert [seq for seq in device.broker.seqs() if seq <= 3] == [1, 2, 3] + [1] * 6
            assert device.link.stats.resends == 6

            # An ack: the backend is back. The wait starts over at its shortest, and the next
            # probe is the oldest message still unacknowledged.
            device.broker.ack((1, 1))
            await device.until(lambda: 1 not in device.outbox(), "seq 1 deleted")
            await device.at(due + 30 - 0.001)
            await device.marker()
            assert device.sent(2) == 1
            await device.at(due + 30)
            await device.marker()
            assert device.sent(2) == 2
            assert device.sent(3) == 1

    asyncio.run(scenario())


def test_acks_resuming_after_a_silence_bring_no_copies_of_what_the_backend_works_through(
    tmp_path: Path, ack_timeouts: FakeClock
) -> None:
    """Ingest back after an outage drains the broker's queue in order: its first acks name
    the oldest messages, and the younger ones are on their way, not lost."""

    async def scenario() -> None:
        async with connected(tmp_path, ScriptedBroker(), clock=ack_timeouts) as device:
            device.enqueue(5)
            await device.until(lambda: device.link.stats.delivered == 5, "five PUBACKs")
            await device.at(30)
            await device.until(lambda: device.sent(1) == 2, "the probe")

            await device.at(40)
            device.broker.ack((1, 1))
            await device.until(lambda: device.outbox() == [2, 3, 4, 5], "seq 1 deleted")
            await device.at(60 - 0.001)
            marker = await device.marker()

            assert device.broker.seqs() == [1, 2, 3, 4, 5, 1, marker]
            device.broker.ack((2, marker))
            await device.until(lambda: device.outbox() == [], "the rest deleted")

    asyncio.run(scenario())


def test_a_message_whose_ack_was_lost_is_sent_again_alone_with_its_own_doubling_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ack_timeouts: FakeClock
) -> None:
    """An ingest worker killed between its commit and its publish loses that batch's acks;
    the backend goes on storing and acking the device's later messages. The unacked one must
    not wait for the next reconnect (days, for a device that stays online), nor be copied
    every 30 s while, say, a lagging worker still holds it."""
    monkeypatch.setattr(unstored_module, "ACK_TIMEOUT_MAX_S", 120.0)

    async def scenario() -> None:
        async with connected(tmp_path, ScriptedBroker(), clock=ack_timeouts) as device:
            device.enqueue(3)
            await device.until(lambda: device.link.stats.delivered == 3, "three PUBACKs")
            device.broker.ack((2, 3))
            await device.until(lambda: device.outbox() == [1], "seqs 2 and 3 deleted")

            # 30 s, then 60, 120, and the cap, 120, again.
            for copies, due in enumerate((30, 90, 210, 330), start=1):
                await device.stream_to(due - 0.001)
                assert device.sent(1) == copies, f"seq 1 sent again before {due} s"
                await device.stream_to(due)
                assert device.sent(1) == 1 + copies, f"seq 1 not sent again at {due} s"

            device.broker.ack((1, 1))
            await device.until(lambda: device.outbox() == [], "seq 1 deleted")
            assert device.link.stats.resends == 4

    asyncio.run(scenario())


def test_a_lost_ack_sends_again_only_the_overdue_messages_not_the_outbox(
    tmp_path: Path, ack_timeouts: FakeClock
) -> None:
    async def scenario() -> None:
        async with connected(tmp_path, ScriptedBroker(), clock=ack_timeouts) as device:
            device.enqueue(3)
            await device.until(lambda: device.link.stats.delivered == 3, "seqs 1-3 delivered")
            device.broker.ack((3, 3))  # 1 and 2 passed over: their acks look lost
            await device.until(lambda: device.outbox() == [1, 2], "seq 3 deleted")
            await device.at(10)
            device.enqueue(3)
            await device.until(lambda: device.link.stats.delivered == 6, "seqs 4-6 delivered")
            device.broker.ack((6, 6))  # now 4 and 5 too, but they were delivered at 10 s
            await device.until(lambda: device.outbox() == [1, 2, 4, 5], "seq 6 deleted")

            await device.at(30 - 0.001)
            before = await device.marker()
            await device.at(30)
            after = await device.marker()
            seqs = device.broker.seqs()
            assert seqs[seqs.index(before) + 1 :] == [1, 2, after]

            device.broker.ack((before, after))  # the backend answering: no probe at 40 s
            await device.until(lambda: device.outbox() == [1, 2, 4, 5], "markers deleted")
            await device.at(40 - 0.001)
            before = await device.marker()
            await device.at(40)
            after = await device.marker()
            seqs = device.broker.seqs()
            assert seqs[seqs.index(before) + 1 :] == [4, 5, after]
            assert device.link.stats.resends == 4

    asyncio.run(scenario())


def test_acks_out_of_order_by_moments_after_an_outage_bring_no_copies(
    tmp_path: Path, ack_timeouts: FakeClock
) -> None:
    """After an outage every message's wait is long over; two ingest workers of the share
    group draining their queues side by side ack out of order by moments. A message passed
    over gets its full wait from then, so only a worker behind by more than that is copied."""

    async def scenario() -> None:
        async with connected(tmp_path, ScriptedBroker(), clock=ack_timeouts) as device:
            device.enqueue(4)
            await device.until(lambda: device.link.stats.delivered == 4, "four PUBACKs")
            await device.at(30)
            await device.at(90)
            await device.until(lambda: device.sent(1) == 3, "the probes at 30 and 90 s")

            await device.at(100)
            device.broker.ack((4, 4))  # one worker is first to come back
            await device.until(lambda: device.outbox() == [1, 2, 3], "seq 4 deleted")
            await device.at(129.999)
            marker = await device.marker()
            assert device.broker.seqs() == [1, 2, 3, 4, 1, 1, marker]
            device.broker.ack((1, 3), (marker, marker))  # and the other
            await device.until(lambda: device.outbox() == [], "every seq deleted")

            # A worker behind by the full wait: its messages are copied.
            await device.at(130)
            device.enqueue(3)
            first = marker + 1
            await device.until(lambda: device.link.stats.delivered == 10, "three more")
            device.broker.ack((first + 2, first + 2))
            await device.until(lambda: len(device.outbox()) == 2, "the last one deleted")
            await device.at(160 - 0.001)
            before = await device.marker()
            await device.at(160)
            after = await device.marker()
            seqs = device.broker.seqs()
            assert seqs[seqs.index(first + 2) + 1 :] == [before, first, first + 1, after]

    asyncio.run(scenario())


def test_more_overdue_messages_than_the_window_holds_are_each_sent_again_once(
    tmp_path: Path, ack_timeouts: FakeClock
) -> None:
    lost = link_module.PUBLISH_WINDOW + 5

    async def scenario() -> None:
        async with connected(tmp_path, ScriptedBroker(), clock=ack_timeouts) as device:
            device.enqueue(lost + 1)
            await device.until(lambda: device.link.stats.delivered == lost + 1, "delivered")
            device.broker.ack((lost + 1, lost + 1))
            await device.until(lambda: len(device.outbox()) == lost, "the last one deleted")

            await device.at(30)
            await device.until(
                lambda: all(device.sent(seq) == 2 for seq in range(1, lost + 1)), "every copy"
            )
            await device.marker()
            assert [device.sent(seq) for seq in range(1, lost + 1)] == [2] * lost
            assert device.link.stats.resends == lost

    asyncio.run(scenario())


def test_a_copy_the_broker_refuses_is_sent_again_on_its_own_timer(
    tmp_path: Path, ack_timeouts: FakeClock
) -> None:
    # The first copy of seq 1 meets no subscriber; it is neither lost nor sent in a loop.
    broker = ScriptedBroker(
        lambda seq, seen: NO_MATCHING_SUBSCRIBERS if seq == 1 and seen == 1 else SUCCESS
    )

    async def scenario() -> None:
        async with connected(tmp_path, broker, clock=ack_timeouts) as device:
            device.enqueue(2)
            await device.until(lambda: device.link.stats.delivered == 2, "two PUBACKs")
            device.broker.ack((2, 2))
            await device.until(lambda: device.outbox() == [1], "seq 2 deleted")

            await device.stream_to(30)
            assert broker.seqs(NO_MATCHING_SUBSCRIBERS) == [1]
            await device.stream_to(90 - 0.001)
            assert device.sent(1) == 2
            await device.stream_to(90)
            assert device.sent(1) == 3
            assert broker.seqs(SUCCESS).count(1) == 2

    asyncio.run(scenario())


def test_a_message_dropped_from_the_outbox_while_unacked_is_not_sent_again(
    tmp_path: Path, ack_timeouts: FakeClock
) -> None:
    async def scenario() -> None:
        async with connected(tmp_path, ScriptedBroker(), clock=ack_timeouts) as device:
            device.enqueue(3)
            await device.until(lambda: device.link.stats.delivered == 3, "three PUBACKs")
            device.broker.ack((3, 3))
            await device.until(lambda: device.outbox() == [1, 2], "seq 3 deleted")
            [first, _] = device.store.pending()
            device.store.give_up([first.id])  # as the outbox's byte limit would

            await device.at(30)
            marker = await device.marker()
            assert device.broker.seqs()[3:] == [2, marker]

    asyncio.run(scenario())


def test_delivered_messages_the_outbox_dropped_are_forgotten_while_no_ack_comes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Acks that never arrive must not make the link keep every delivery of a long
    connection: what the outbox has dropped is forgotten each time the count doubles."""
    monkeypatch.setattr(unstored_module, "PRUNE_MIN", 4)

    async def scenario() -> None:
        async with connected(tmp_path, ScriptedBroker()) as device:
            device.enqueue(4)
            await device.until(lambda: device.link.stats.delivered == 4, "four PUBACKs")
            assert device.link.awaiting_ack == 4
            device.store.give_up(m.id for m in device.store.pending() if m.seq <= 3)
            device.enqueue(3)
            await device.until(lambda: device.link.stats.delivered == 7, "seven PUBACKs")
            assert device.link.awaiting_ack == 7
            device.enqueue(1)  # the eighth: twice the count at the last check
            await device.until(lambda: device.link.stats.delivered == 8, "eight PUBACKs")

            assert device.link.awaiting_ack == 5
            assert device.outbox() == [4, 5, 6, 7, 8]

    asyncio.run(scenario())


def test_after_a_refusal_what_was_delivered_meanwhile_is_not_sent_again(tmp_path: Path) -> None:
    # Seq 1's first try meets a full quota; seqs 2 and 3, in flight beside it, are taken.
    broker = ScriptedBroker(lambda seq, seen: 0x97 if seq == 1 and seen == 0 else SUCCESS)

    async def scenario() -> None:
        async with connected(tmp_path, broker) as device:
            device.enqueue(3)
            await device.until(lambda: broker.seqs(SUCCESS).count(1) == 1, "seq 1 taken")
            marker = await device.marker()

            assert broker.seqs() == [1, 2, 3, 1, marker]
            assert device.outbox() == [1, 2, 3, marker]  # delivered, waiting for stored-acks

    asyncio.run(scenario())


def test_a_refused_subscription_is_logged_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A missing ACL line for ``ack``: no stored-ack will ever come, and the outbox fills."""
    broker = ScriptedBroker(refuse=frozenset({ACK_TOPIC}))

    async def scenario() -> None:
        async with connected(tmp_path, broker) as device:
            await device.until(lambda: device.link.stats.subscribe_refused == 1, "the SUBACK")
            device.broker.hang_up()
            await device.until(lambda: device.link.stats.subscribe_refused == 2, "again")

    with caplog.at_level("ERROR", logger="galvani.agent.link"):
        asyncio.run(scenario())
    refusals = [r for r in caplog.records if ACK_TOPIC in r.getMessage()]
    assert len(refusals) == 2
    assert all(r.levelname == "ERROR" for r in refusals)
    assert not any(f"d/{DEVICE}/config" in r.getMessage() for r in caplog.records)


def test_a_link_whose_delivered_messages_wait_past_the_longest_ack_timeout_says_so(
    tmp_path: Path, ack_timeouts: FakeClock
) -> None:
    """Mosquitto 2.0 grants a filter its ACL forbids and then delivers nothing: the SUBACK
    looks fine, and only the missing acks show it."""

    async def scenario() -> None:
        async with connected(tmp_path, ScriptedBroker(), clock=ack_timeouts) as device:
            assert not device.link.acks_overdue
            device.enqueue(2)
            await device.until(lambda: device.link.stats.delivered == 2, "two PUBACKs")
            await device.at(480)
            assert not device.link.acks_overdue
            await device.at(480.001)
            assert device.link.acks_overdue

            device.broker.ack((1, 1))
            await device.until(lambda: device.outbox() == [2], "seq 1 deleted")
            assert device.link.acks_overdue  # seq 2 still waits from its first delivery
            device.broker.ack((2, 2))
            await device.until(lambda: device.outbox() == [], "seq 2 deleted")
            assert not device.link.acks_overdue

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
