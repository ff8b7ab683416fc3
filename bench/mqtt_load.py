"""A CPU-cheap MQTT 3.1.1 load generator: many device connections publishing telemetry at QoS 1.

The benchmark shares two cores between the broker, PostgreSQL, the ingest workers and this
load generator, so every cycle spent here is a cycle the system under test does not get.
paho costs tens of microseconds per publish; this client costs a few:

* every CONNECT and PUBLISH packet (payload, topic, packet id) is encoded before timing starts,
  so publishing is slicing a list and one ``transport.write`` per readiness event;
* connections are ``asyncio.Protocol`` objects on uvloop (when installed): no stream objects,
  no coroutine per connection, and PUBACKs are parsed straight out of ``data_received``;
* each connection keeps at most ``window`` publishes unacknowledged, and packet ids are
  ``1..65535`` in order, so the broker's in-order PUBACKs (MQTT 3.1.1, 4.6) are checked by
  comparing each one with the id expected next;
* like a real device, each connection subscribes to its own ``ack`` topic (protocol.md), so
  the broker delivers the stored acks ingest publishes after every commit, as in production.
  An ack's seq ranges are read by slicing ingest's compact form, not by a JSON parser, and
  marked in a byte per pre-built message, which says at the end whether every acknowledged
  seq was heard of. ``LoadPlan.hear_acks`` off leaves the subscription out: the broker then
  discards the acks and the benchmark leaves out their delivery.

Offered load adapts to what ingest stores: the benchmark's main process publishes the stored
count, and a process never lets its share of "sent but not yet stored" exceed ``backlog``
messages. Without that bound the broker acknowledges as fast as it can read, queues the rest
for the ingest workers, and the load generator burns the CPU ingest needs on messages that
only wait in the broker. ``max_msgs_per_s`` caps the offered load besides (and sizes the
pre-built payloads).
"""

import asyncio
import ctypes
import json
import math
import multiprocessing
import multiprocessing.queues
import queue
import signal
import struct
import time
from collections import deque
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar, cast

from services.common.mqtt5 import ProtocolViolation, read_varint, string, varint
from services.common.protocol.limits import SAMPLE_PERIOD_S
from services.common.protocol.topics import ACK_CHANNEL, device_topic
from services.common.tls import client_context

KEEPALIVE_S: Final = 600  # activity never stops for long; the broker allows up to 65535
CONNECT_CONCURRENCY: Final = 100
# Right after the device password file is re-rendered the broker is still reloading it and
# refuses new devices (CONNACK 4/5) for a moment: retry those.
CONNECT_ATTEMPTS: Final = 40
CONNECT_RETRY_S: Final = 0.25
CONNECT_TIMEOUT_S: Final = 10.0
TICK_S: Final = 0.01
LOADGEN_READY_TIMEOUT_S: Final = 300.0
POLL_S: Final = 0.25
DRAIN_TIMEOUT_S: Final = 60.0
MAX_PACKET_ID: Final = 65_535

# After the last commit, how long to wait for the acks not heard of yet. Ingest queues a
# batch's acks before its PUBACKs and sends both in one write, so they are on their way by the
# time the benchmark sees the commit in the workers' counters.
ACK_GRACE_S: Final = 2.0

CONNACK: Final = 0x20
PUBLISH_QOS0: Final = 0x30  # not retained, not a duplicate (MQTT 3.1.1, 3.3.1)
PUBACK: Final = 0x40
SUBACK: Final = 0x90
PINGRESP: Final = 0xD0
DISCONNECT: Final = b"\xe0\x00"
CONNACK_REFUSED_RETRYABLE: Final = frozenset({4, 5})  # bad credentials / not authorised
# The SUBSCRIBE is acknowledged before the first PUBLISH, so its id is free again by then.
SUBSCRIBE_ID_BYTES: Final = b"\x00\x01"
SUBACK_FAILURE: Final = 0x80
# services/ingest/acks.py ``ack_payload``: {"v":1,"seqs":[[first,last],...]}, no spaces.
ACK_PREFIX: Final = b'{"v":1,"seqs":[['
ACK_SUFFIX: Final = b"]]}"

SAMPLES_PER_MESSAGE: Final = 10
SAMPLE_SPACING_MS: Final = round(SAMPLE_PERIOD_S * 1000)
MESSAGE_SPACING_MS: Final = 1000
# One 10 Hz sample during output, with gel: protocol.md's example, pinned by the protocol
# vectors, without its ``ts`` (tests/ingest.py ``sample()`` builds the same).
SPEC_EXAMPLE: Final = "spec_example"
VECTORS_DIR: Final = Path(__file__).resolve().parents[1] / "protocol" / "vectors"


def _vector_sample_fields(name: str) -> dict[str, object]:
    cases = json.loads((VECTORS_DIR / "telemetry.json").read_text("utf-8"))["valid"]
    payload = next(case["payload"] for case in cases if case["name"] == name)
    return {key: value for key, value in payload["samples"][0].items() if key != "ts"}


SAMPLE_FIELDS: Final = _vector_sample_fields(SPEC_EXAMPLE)

T = TypeVar("T")


class LoadError(RuntimeError):
    """The broker refused a device, broke protocol or dropped a connection."""


@dataclass(frozen=True)
class DeviceLogin:
    """A provisioned device's broker credentials (the username is the device id)."""

    device_id: str
    password: str


@dataclass(frozen=True)
class LoadPlan:
    """What one load-generator process publishes, and the limits it shares with the others."""

    host: str
    port: int
    devices: tuple[DeviceLogin, ...]
    total_devices: int
    messages_per_device: int
    first_ts_ms: int
    window: int
    seconds: float
    max_msgs_per_s: float
    backlog_msgs: int
    hear_acks: bool = True  # subscribe to each device's ack topic, as a real device does
    # TLS verifying the broker against this CA (the TLS device listener), plain TCP when None.
    # A path, not a context: a plan crosses into the load processes.
    ca_file: str | None = None


@dataclass
class SharedState:
    """Counters shared with the benchmark's main process (``RawValue``/``RawArray``).

    Single writers only: the main process writes ``start_at``, ``abort``, ``stored_msgs``
    and ``all_stored_at``; load process ``i`` writes ``sent[i]``, ``acked[i]`` and
    ``heard[i]``.
    """

    start_at: Any  # c_double: time.monotonic() to start publishing at; 0 until known
    abort: Any  # c_int: non-zero stops publishing at once
    stored_msgs: Any  # c_int64: telemetry messages the ingest workers have committed
    all_stored_at: Any  # c_double: time.monotonic() the last commit was seen; 0 until then
    sent: Any  # c_int64 array, one per load process
    acked: Any  # c_int64 array, one per load process
    heard: Any  # c_int64 array, one per load process: ack messages received

    @classmethod
    def create(cls, ctx: Any, processes: int) -> "SharedState":
        """Shared counters for ``processes`` load processes from a multiprocessing context."""
        return cls(
            start_at=ctx.RawValue(ctypes.c_double, 0.0),
            abort=ctx.RawValue(ctypes.c_int, 0),
            stored_msgs=ctx.RawValue(ctypes.c_int64, 0),
            all_stored_at=ctx.RawValue(ctypes.c_double, 0.0),
            sent=ctx.RawArray(ctypes.c_int64, processes),
            acked=ctx.RawArray(ctypes.c_int64, processes),
            heard=ctx.RawArray(ctypes.c_int64, processes),
        )


@dataclass
class LoadResult:
    """What one load process did, sent back to the main process when it is done."""

    index: int
    acked: dict[str, int] = field(default_factory=dict)  # per device: messages 0..n-1 acked
    sent: int = 0
    first_publish: float | None = None  # time.monotonic()
    last_ack: float | None = None
    cpu_publishing_s: float = 0.0  # this process's CPU from first publish to drained
    exhausted_devices: int = 0  # devices that ran out of pre-built messages
    error: str | None = None


@dataclass
class AckResult:
    """The stored acks one load process heard, sent once the last commit has been seen."""

    index: int
    subscribed: bool
    messages: int = 0  # ack PUBLISHes received
    covered: int = 0  # PUBACKed seqs that an ack named
    acknowledged: int = 0  # PUBACKed seqs: every one of them is stored when lost=0
    devices_short: int = 0  # devices with a PUBACKed seq that no ack named
    wait_s: float = 0.0  # from the last PUBACK to the last ack (or giving up)
    cpu_s: float = 0.0  # this process's CPU over ``wait_s``
    error: str | None = None  # a malformed ack, or one naming a seq never published


# --- Encoding ---------------------------------------------------------------------------


def connect_packet(login: DeviceLogin) -> bytes:
    """CONNECT, MQTT 3.1.1, clean session, client id = username = device id."""
    flags = 0x80 | 0x40 | 0x02  # username, password, clean session
    variable = string("MQTT") + bytes([4, flags]) + struct.pack("!H", KEEPALIVE_S)
    payload = string(login.device_id) + string(login.device_id) + string(login.password)
    body = variable + payload
    return b"\x10" + varint(len(body)) + body


def publish_packet(topic_field: bytes, packet_id: int, payload: bytes) -> bytes:
    """PUBLISH at QoS 1; ``topic_field`` is the length-prefixed topic."""
    remaining = len(topic_field) + 2 + len(payload)
    return b"".join(
        (b"\x32", varint(remaining), topic_field, packet_id.to_bytes(2, "big"), payload)
    )


def subscribe_packet(device_id: str) -> bytes:
    """SUBSCRIBE (MQTT 3.1.1, 3.8) to the device's own ack topic at QoS 0, as ingest sends it."""
    body = SUBSCRIBE_ID_BYTES + string(ack_topic(device_id)) + b"\x00"
    return b"\x82" + varint(len(body)) + body


def packet_id(index: int) -> int:
    """The packet id of a connection's ``index``-th publish (0-based): 1..65535, wrapping."""
    return index % MAX_PACKET_ID + 1


def telemetry_topic(device_id: str) -> str:
    """The device's own telemetry topic."""
    return device_topic(device_id, "telemetry")


def ack_topic(device_id: str) -> str:
    """The topic on which the device hears which of its seqs are stored."""
    return device_topic(device_id, ACK_CHANNEL)


def ack_json_ranges(payload: bytes) -> list[bytes] | None:
    """An ack not in ingest's compact form, read by ``json``: its ranges as ``b"first,last"``,
    or None when it is not an ack."""
    try:
        body = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    seqs = body.get("seqs") if isinstance(body, dict) else None
    if not isinstance(seqs, list):
        return None
    ranges = []
    for bounds in seqs:
        if not (isinstance(bounds, list) and len(bounds) == 2):
            return None
        first, last = bounds
        if type(first) is not int or type(last) is not int:
            return None
        ranges.append(b"%d,%d" % (first, last))
    return ranges


def session_of(device_id: str) -> str:
    """The one session a benchmark device reports all its samples in."""
    return f"s-{device_id}"


def telemetry_body(seq: int, ts_ms: int, session: str) -> dict[str, object]:
    """A v1 telemetry message exactly as tests/ingest.py ``telemetry()`` builds it."""
    samples = [
        {"ts": ts_ms + SAMPLE_SPACING_MS * i, **SAMPLE_FIELDS} for i in range(SAMPLES_PER_MESSAGE)
    ]
    return {"v": 1, "seq": seq, "session": session, "samples": samples}


def payload_template(session: str) -> bytes:
    """``json.dumps`` of a telemetry message with ``%d`` for seq and the ten sample times.

    Formatting ints into this template gives the same bytes as ``json.dumps`` of the message
    at a tenth of the cost, which matters when a million payloads are built before a run.
    """
    seq_mark = 987_654_321_000_000
    ts_marks = [seq_mark + 1 + i for i in range(SAMPLES_PER_MESSAGE)]
    body = telemetry_body(seq_mark, 0, session)
    for sample, mark in zip(cast(list[dict[str, object]], body["samples"]), ts_marks, strict=True):
        sample["ts"] = mark
    text = json.dumps(body).replace("%", "%%")
    for mark in (seq_mark, *ts_marks):
        if text.count(str(mark)) != 1:
            raise AssertionError(f"template marker {mark} is not unique")
        text = text.replace(str(mark), "%d")
    return text.encode()


def device_packets(device_id: str, count: int, first_ts_ms: int) -> list[bytes]:
    """``count`` PUBLISH packets of one device: seq 0.., one second of device time apart."""
    session = session_of(device_id)
    template = payload_template(session)
    topic_field = string(telemetry_topic(device_id))
    spacing = SAMPLE_SPACING_MS
    packets = []
    for seq in range(count):
        ts = first_ts_ms + MESSAGE_SPACING_MS * seq
        payload = template % (seq, *(ts + spacing * i for i in range(SAMPLES_PER_MESSAGE)))
        packets.append(publish_packet(topic_field, packet_id(seq), payload))
    # The template must reproduce json.dumps byte for byte; check one message per device.
    expected = json.dumps(telemetry_body(0, first_ts_ms, session)).encode()
    if count and not packets[0].endswith(expected):
        raise AssertionError("payload template does not match json.dumps")
    return packets


# --- Connections ------------------------------------------------------------------------


class DeviceConnection(asyncio.Protocol):
    """One device's connection: publishes handed to it by the generator, PUBACKs counted,
    stored acks marked."""

    def __init__(self, generator: "LoadGenerator", device_id: str, packets: list[bytes]):
        self.generator = generator
        self.device_id = device_id
        self.packets = packets
        self.sent = 0
        self.acked = 0
        self.parked = False
        self.exhausted = False
        self.closing = False
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.connack: asyncio.Future[int] = loop.create_future()
        self.suback: asyncio.Future[int] = loop.create_future()
        self.ack_topic_field = string(ack_topic(device_id))
        # One byte per pre-built message, set to 1 when an ack names its seq.
        self.ack_marks = bytearray(len(packets))
        self._buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        buf = self._buffer + data if self._buffer else data
        size = len(buf)
        pos = 0
        acks = 0
        while pos + 2 <= size:
            kind = buf[pos]
            start = pos + 2
            end = start + buf[pos + 1]
            if buf[pos + 1] & 0x80:
                # CONNACK, PUBACK, SUBACK and PINGRESP are shorter than 128 bytes; an ack
                # PUBLISH naming many ranges may not be.
                try:
                    found = read_varint(buf, pos + 1, size)
                except ProtocolViolation as exc:
                    self._protocol_error(f"packet 0x{kind:02x}: {exc}")
                    return
                if found is None:
                    break
                length, start = found
                end = start + length
            if end > size:
                break
            if kind == PUBACK:
                got = (buf[start] << 8) | buf[start + 1]
                if got != packet_id(self.acked + acks):
                    self._protocol_error(f"PUBACK {got}, expected {packet_id(self.acked + acks)}")
                    return
                acks += 1
            elif kind == PUBLISH_QOS0:
                if not self._mark_ack(buf, start, end):
                    return
            elif kind == CONNACK:
                if not self.connack.done():
                    code = buf[start + 1]
                    if code:
                        self.closing = True  # the broker closes a refused connection
                    self.connack.set_result(code)
            elif kind == SUBACK:
                if end - start != 3 or buf[start : start + 2] != SUBSCRIBE_ID_BYTES:
                    self._protocol_error(f"unexpected SUBACK {buf[pos:end]!r}")
                    return
                if not self.suback.done():
                    self.suback.set_result(buf[start + 2])
            elif kind != PINGRESP:
                self._protocol_error(f"unexpected packet 0x{kind:02x}")
                return
            pos = end
        self._buffer = buf[pos:] if pos < size else b""
        if acks:
            self.acked += acks
            self.generator.on_acked(self, acks)

    # Called for every ack PUBLISH (one per device and committed batch; in bench-ingest about
    # one per five telemetry messages): keep this path short.
    # Ingest's compact form is read by slicing and int(), without copying the payload or
    # building a JSON object: less than half of what ``json.loads`` alone costs. Other
    # spellings (spaces, more fields) go through json.
    def _mark_ack(self, buf: bytes, start: int, end: int) -> bool:
        """Mark the seqs a stored ack names; False (after failing the run) when it is wrong."""
        topic_field = self.ack_topic_field
        if not buf.startswith(topic_field, start):
            self._protocol_error(f"PUBLISH on a topic not subscribed to: {buf[start:end]!r}")
            return False
        start += len(topic_field)
        ranges: list[bytes] | None
        if buf.startswith(ACK_PREFIX, start) and buf.endswith(ACK_SUFFIX, start, end):
            ranges = buf[start + len(ACK_PREFIX) : end - len(ACK_SUFFIX)].split(b"],[")
        else:
            ranges = ack_json_ranges(buf[start:end])
        marks = self.ack_marks
        sent = self.sent
        try:
            for bounds in ranges or ():
                head, _, tail = bounds.partition(b",")
                first, last = int(head), int(tail)
                if not 0 <= first <= last < sent:
                    self._protocol_error(f"ack of seqs {first}..{last}; {sent} published")
                    return False
                if first == last:
                    marks[first] = 1
                else:
                    marks[first : last + 1] = b"\x01" * (last - first + 1)
        except ValueError:
            ranges = None
        if ranges is None:
            self._protocol_error(f"not an ack: {buf[start:end]!r}")
            return False
        self.generator.acks_heard += 1
        return True

    def acks_covered(self) -> int:
        """How many of the PUBACKed seqs (0..acked-1) an ack has named."""
        return self.ack_marks.count(1, 0, self.acked)

    def _protocol_error(self, what: str) -> None:
        self.generator.fail(f"{self.device_id}: {what}")
        self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.connack.done():
            self.connack.set_exception(LoadError(f"{self.device_id}: connection lost ({exc})"))
        elif not self.closing:
            self.generator.fail(f"{self.device_id}: connection lost ({exc or 'closed'})")

    def send(self, count: int) -> None:
        """Write the next ``count`` pre-encoded publishes in one go."""
        start = self.sent
        assert self.transport is not None
        if count == 1:
            self.transport.write(self.packets[start])
        else:
            self.transport.write(b"".join(self.packets[start : start + count]))
        self.sent = start + count

    def close(self, *, disconnect: bool = False) -> None:
        """Close the connection (sending DISCONNECT first when asked)."""
        self.closing = True
        if self.transport is not None and not self.transport.is_closing():
            if disconnect:
                self.transport.write(DISCONNECT)
            self.transport.close()


class LoadGenerator:
    """The connections of one load process and the credit that paces them."""

    def __init__(self, index: int, plan: LoadPlan, shared: SharedState):
        self.index = index
        self.plan = plan
        self.shared = shared
        # One context for every connection of the process, as a device fleet would share one.
        self.tls = None if plan.ca_file is None else client_context(plan.ca_file)
        self.connections: list[DeviceConnection] = []
        self.parked: deque[DeviceConnection] = deque()
        self.publishing = False
        self.credit = 0
        self.sent = 0
        self.acked = 0
        self.exhausted = 0
        self.acks_heard = 0
        self.first_publish: float | None = None
        self.last_ack: float | None = None
        self.error: str | None = None

    def fail(self, what: str) -> None:
        """Record the first failure; the publishing loop stops on it."""
        if self.error is None:
            self.error = what

    # Called for every PUBACK burst: keep this path short.
    def on_acked(self, conn: DeviceConnection, count: int) -> None:
        self.acked += count
        self.last_ack = time.monotonic()
        if self.publishing:
            self.fill(conn)

    def fill(self, conn: DeviceConnection) -> None:
        """Top the connection's window up as far as the credit allows, else park it."""
        room = self.plan.window - (conn.sent - conn.acked)
        left = len(conn.packets) - conn.sent
        count = min(room, left, self.credit)
        if count > 0:
            if self.first_publish is None:
                self.first_publish = time.monotonic()
            conn.send(count)
            self.credit -= count
            self.sent += count
        if count == left:
            if not conn.exhausted:
                conn.exhausted = True
                self.exhausted += 1
        elif count < room and not conn.parked:
            # Out of credit: the ticker resumes parked connections in arrival order.
            conn.parked = True
            self.parked.append(conn)

    async def connect_all(self) -> None:
        """Open every device connection (bounded concurrency, retrying refusals)."""
        plan = self.plan
        limit = asyncio.Semaphore(CONNECT_CONCURRENCY)

        async def one(login: DeviceLogin) -> DeviceConnection:
            packets = device_packets(login.device_id, plan.messages_per_device, plan.first_ts_ms)
            async with limit:
                return await self._connect(login, packets)

        self.connections = list(await asyncio.gather(*(one(login) for login in plan.devices)))

    async def _connect(self, login: DeviceLogin, packets: list[bytes]) -> DeviceConnection:
        loop = asyncio.get_running_loop()
        code = -1
        for _ in range(CONNECT_ATTEMPTS):
            transport, conn = await loop.create_connection(
                lambda: DeviceConnection(self, login.device_id, packets),
                self.plan.host,
                self.plan.port,
                ssl=self.tls,
                server_hostname=self.plan.host if self.tls is not None else None,
            )
            transport.write(connect_packet(login))
            code = await asyncio.wait_for(conn.connack, CONNECT_TIMEOUT_S)
            if code == 0:
                if self.plan.hear_acks:
                    await self._subscribe(conn)
                return conn
            conn.close()
            if code not in CONNACK_REFUSED_RETRYABLE:
                break
            await asyncio.sleep(CONNECT_RETRY_S)
        raise LoadError(f"broker refused {login.device_id} (CONNACK return code {code})")

    async def _subscribe(self, conn: DeviceConnection) -> None:
        assert conn.transport is not None
        conn.transport.write(subscribe_packet(conn.device_id))
        granted = await asyncio.wait_for(conn.suback, CONNECT_TIMEOUT_S)
        if granted == SUBACK_FAILURE:
            raise LoadError(f"broker refused {conn.device_id} its ack subscription")

    def _publish_shared(self) -> None:
        self.shared.sent[self.index] = self.sent
        self.shared.acked[self.index] = self.acked
        self.shared.heard[self.index] = self.acks_heard

    async def wait_for_start(self) -> bool:
        """Wait for the main process's start time; False when it aborted instead."""
        shared = self.shared
        while shared.start_at.value == 0.0 or time.monotonic() < shared.start_at.value:
            if shared.abort.value:
                return False
            await asyncio.sleep(0.002)
        return True

    async def publish(self) -> None:
        """Publish for ``plan.seconds`` from the start time, then wait for the PUBACKs."""
        plan = self.plan
        shared = self.shared
        start = shared.start_at.value
        end = start + plan.seconds
        share = len(plan.devices) / plan.total_devices
        self.parked.extend(self.connections)
        for conn in self.connections:
            conn.parked = True
        self.publishing = True
        while True:
            now = time.monotonic()
            if now >= end or shared.abort.value or self.error:
                break
            # Credit: this process's share of the global limit, minus what it already sent.
            offered = plan.max_msgs_per_s * (now - start)
            stored_limit = shared.stored_msgs.value + plan.backlog_msgs
            self.credit = int(share * min(offered, stored_limit)) - self.sent
            while self.credit > 0 and self.parked:
                conn = self.parked.popleft()
                conn.parked = False
                self.fill(conn)
            self._publish_shared()
            await asyncio.sleep(TICK_S)
        self.publishing = False
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while self.acked < self.sent and not self.error and not shared.abort.value:
            if time.monotonic() > deadline:
                self.fail(f"{self.sent - self.acked} publishes unacknowledged after draining")
                break
            self._publish_shared()
            await asyncio.sleep(TICK_S)
        self._publish_shared()

    async def hear_last_acks(self) -> AckResult:
        """Wait for the acks of the last commits, then count what the acks covered.

        Waits until every PUBACKed seq has been named by an ack, or ``ACK_GRACE_S`` after
        the main process saw the last commit (acks are QoS 0: one lost is not resent), or an
        abort.
        """
        if not self.plan.hear_acks:
            return AckResult(self.index, subscribed=False)
        shared = self.shared
        cpu_start, start = time.process_time(), time.monotonic()
        checked = -1
        while not shared.abort.value and not self.error:
            if self.acks_heard != checked:
                checked = self.acks_heard
                if all(conn.acks_covered() == conn.acked for conn in self.connections):
                    break
            stored_at = shared.all_stored_at.value
            if stored_at and time.monotonic() > stored_at + ACK_GRACE_S:
                break
            self._publish_shared()
            await asyncio.sleep(TICK_S)
        cpu_s, wait_s = time.process_time() - cpu_start, time.monotonic() - start
        self._publish_shared()
        covered = [conn.acks_covered() for conn in self.connections]
        return AckResult(
            index=self.index,
            subscribed=True,
            messages=self.acks_heard,
            covered=sum(covered),
            acknowledged=sum(conn.acked for conn in self.connections),
            devices_short=sum(
                n < conn.acked for n, conn in zip(covered, self.connections, strict=True)
            ),
            wait_s=wait_s,
            cpu_s=cpu_s,
            error=self.error,
        )

    async def close_all(self) -> None:
        """DISCONNECT every connection and give the writes a moment to leave."""
        for conn in self.connections:
            conn.close(disconnect=True)
        await asyncio.sleep(0.2)

    def result(self, cpu_publishing_s: float) -> LoadResult:
        """This process's outcome for the main process."""
        return LoadResult(
            index=self.index,
            acked={conn.device_id: conn.acked for conn in self.connections},
            sent=self.sent,
            first_publish=self.first_publish,
            last_ack=self.last_ack,
            cpu_publishing_s=cpu_publishing_s,
            exhausted_devices=self.exhausted,
            error=self.error,
        )


def run_event_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on uvloop when it is installed (it is, with uvicorn[standard])."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


async def _run_load(
    generator: LoadGenerator,
    ready: "multiprocessing.queues.Queue[tuple[int, str | None]]",
    results: "multiprocessing.queues.Queue[LoadResult]",
    acks: "multiprocessing.queues.Queue[AckResult]",
) -> None:
    try:
        await generator.connect_all()
    except (OSError, LoadError, TimeoutError) as exc:
        ready.put((generator.index, f"connecting: {exc!r}"))
        raise
    ready.put((generator.index, None))
    try:
        if not await generator.wait_for_start():
            results.put(generator.result(0.0))
            return
        # CPU from the start signal to the last PUBACK: payload building and connecting,
        # which are far from cheap, happen before and do not count.
        cpu_start = time.process_time()
        await generator.publish()
        results.put(generator.result(time.process_time() - cpu_start))
        # The connections stay open: the acks of the last batches are still on their way.
        acks.put(await generator.hear_last_acks())
    finally:
        await generator.close_all()


def load_process(
    index: int,
    plan: LoadPlan,
    shared: SharedState,
    ready: "multiprocessing.queues.Queue[tuple[int, str | None]]",
    results: "multiprocessing.queues.Queue[LoadResult]",
    acks: "multiprocessing.queues.Queue[AckResult]",
) -> None:
    """Entry point of one load-generator process (multiprocessing target).

    Puts one LoadResult on ``results`` once its publishes are acknowledged, then one
    AckResult on ``acks`` once the main process has seen the last commit.
    """
    # Ctrl-C reaches the whole process group; the main process decides when this one stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    generator = LoadGenerator(index, plan, shared)
    try:
        run_event_loop(_run_load(generator, ready, results, acks))
    except (OSError, LoadError, TimeoutError, AssertionError) as exc:
        results.put(LoadResult(index=index, error=repr(exc)))


def messages_per_device(seconds: float, max_msgs_per_s: float, devices: int, window: int) -> int:
    """Messages to pre-build per device so the offered-load ceiling never runs dry."""
    return math.ceil(seconds * max_msgs_per_s / devices * 1.05) + window


def split(devices: Sequence[DeviceLogin], parts: int) -> list[tuple[DeviceLogin, ...]]:
    """Deal devices round-robin into ``parts`` groups."""
    return [tuple(devices[i::parts]) for i in range(parts)]


class LoadProcesses:
    """The load-generator processes, seen from the benchmark's main process."""

    def __init__(self, count: int):
        self.ctx = multiprocessing.get_context("spawn")
        self.shared = SharedState.create(self.ctx, count)
        self.ready: Any = self.ctx.Queue()
        self.results: Any = self.ctx.Queue()
        self.acks: Any = self.ctx.Queue()
        self.processes: list[Any] = []

    def start(self, plans: Sequence[LoadPlan]) -> None:
        """Start one process per plan; return when all have built payloads and connected."""
        for index, plan in enumerate(plans):
            process = self.ctx.Process(
                target=load_process,
                args=(index, plan, self.shared, self.ready, self.results, self.acks),
                name=f"bench-load-{index}",
            )
            process.start()
            self.processes.append(process)
        waiting = set(range(len(plans)))
        deadline = time.monotonic() + LOADGEN_READY_TIMEOUT_S
        while waiting:
            try:
                index, error = self.ready.get(timeout=1.0)
            except queue.Empty:
                if time.monotonic() > deadline or not all(p.is_alive() for p in self.processes):
                    raise LoadError("the load generator did not get ready") from None
                continue
            if error is not None:
                raise LoadError(f"load process {index} failed: {error}")
            waiting.discard(index)

    def any_alive(self) -> bool:
        """Whether a load process is still running."""
        return any(p.is_alive() for p in self.processes)

    def collect_acks(self, timeout_s: float) -> list[AckResult]:
        """Each process's count of the acks it heard, once it has stopped waiting for them."""
        acks: list[AckResult] = []
        deadline = time.monotonic() + timeout_s
        while len(acks) < len(self.processes) and time.monotonic() < deadline:
            try:
                acks.append(self.acks.get(timeout=POLL_S))
            except queue.Empty:
                continue
        return acks

    def stop(self) -> None:
        """Stop the processes (they exit on their own once done; abort otherwise)."""
        self.shared.abort.value = 1
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)


# --- One-off publishing (the readiness probe) -------------------------------------------


async def publish_once(
    host: str, port: int, login: DeviceLogin, topic: str, payloads: Sequence[bytes]
) -> None:
    """Connect as ``login``, publish ``payloads`` at QoS 1, wait for every PUBACK, disconnect."""
    topic_field = string(topic)
    for _ in range(CONNECT_ATTEMPTS):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(connect_packet(login))
            connack = await asyncio.wait_for(reader.readexactly(4), CONNECT_TIMEOUT_S)
            if connack[0] != CONNACK:
                raise LoadError(f"expected CONNACK, got 0x{connack[0]:02x}")
            if connack[3] in CONNACK_REFUSED_RETRYABLE:
                await asyncio.sleep(CONNECT_RETRY_S)
                continue
            if connack[3]:
                raise LoadError(f"broker refused {login.device_id}: return code {connack[3]}")
            for i, payload in enumerate(payloads):
                writer.write(publish_packet(topic_field, packet_id(i), payload))
            for i in range(len(payloads)):
                ack = await asyncio.wait_for(reader.readexactly(4), CONNECT_TIMEOUT_S)
                if ack[0] != PUBACK or int.from_bytes(ack[2:4], "big") != packet_id(i):
                    raise LoadError(f"unexpected reply {ack!r} to publish {i}")
            writer.write(DISCONNECT)
            return
        finally:
            writer.close()
    raise LoadError(f"broker kept refusing {login.device_id}")
