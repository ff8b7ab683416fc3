"""From one MQTT message to rows ready to store, or a dead letter saying why not.

Everything here is pure: no database, no broker. The device id comes from the topic, which
the broker's ACL binds to the device's credentials; a payload never names its device.
"""

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Final, Literal

import msgspec

from services.common.protocol import (
    MAX_PAYLOAD_BYTES,
    Channel,
    Event,
    Presence,
    ProtocolError,
    State,
    Telemetry,
    decode,
    parse_topic,
)
from services.common.protocol.limits import (
    CLOCK_FUTURE_LIMIT,
    CLOCK_PAST_LIMIT,
    DEVICE_TIME_MAX,
    DEVICE_TIME_MAX_MS,
    SESSION_ID_MAX,
)
from services.common.protocol.models import (
    CURRENT_UA_MAX,
    CURRENT_UA_MIN,
    IMPEDANCE_OHM_MAX,
    IMPEDANCE_OHM_MIN,
    INT64_MAX,
    MAX_SAMPLES,
    TEMP_C_MAX,
    TEMP_C_MIN,
    VOLTAGE_V_MAX,
    VOLTAGE_V_MIN,
)
from services.common.subscriber import Inbound

# safety.md: skin impedance with gel is 1-20 kOhm in every default mode table.
GEL_BAND_OHM: Final = (1_000.0, 20_000.0)

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


# The telemetry fast path's view of the v1 models (services/common/protocol/models.py):
# msgspec validates in C and, like the models, takes an int where a float is expected but
# neither a bool nor 1.0 where an int is. Unknown fields are refused here (the full path
# ignores them, after its depth and NUL checks).
_Current = Annotated[float, msgspec.Meta(ge=CURRENT_UA_MIN, le=CURRENT_UA_MAX)]
_Temperature = Annotated[float, msgspec.Meta(ge=TEMP_C_MIN, le=TEMP_C_MAX)]


class _FastSample(msgspec.Struct, forbid_unknown_fields=True):
    ts: Annotated[int, msgspec.Meta(ge=0, le=DEVICE_TIME_MAX_MS)]
    mode: Literal["LIFT", "TIGHTEN", "INFUSE", "SAFE"] | None = None
    level: Annotated[int, msgspec.Meta(ge=0, le=10)] | None = None
    out: bool | None = None
    i_ua: _Current | None = None
    i_set_ua: _Current | None = None
    v_v: Annotated[float, msgspec.Meta(ge=VOLTAGE_V_MIN, le=VOLTAGE_V_MAX)] | None = None
    # The largest finite real (float4), as the full path: PostgreSQL stores z_ohm as real.
    z_ohm: Annotated[float, msgspec.Meta(ge=IMPEDANCE_OHM_MIN, le=IMPEDANCE_OHM_MAX)] | None = None
    t_elec_c: _Temperature | None = None
    t_batt_c: _Temperature | None = None
    batt_pct: Annotated[int, msgspec.Meta(ge=0, le=100)] | None = None
    charging: bool | None = None


class _FastTelemetry(msgspec.Struct, forbid_unknown_fields=True):
    v: Literal[1]
    seq: Annotated[int, msgspec.Meta(ge=0, le=INT64_MAX)]
    samples: Annotated[list[_FastSample], msgspec.Meta(min_length=1, max_length=MAX_SAMPLES)]
    session: Annotated[str, msgspec.Meta(max_length=SESSION_ID_MAX)] | None = None


_FAST_TELEMETRY: Final = msgspec.json.Decoder(_FastTelemetry)


# The samples table's columns, in COPY order.
SAMPLE_COLUMNS: Final = (
    "device_id",
    "ts",
    "seq",
    "session",
    "mode",
    "level",
    "out",
    "i_ua",
    "i_set_ua",
    "v_v",
    "z_ohm",
    "t_elec_c",
    "t_batt_c",
    "batt_pct",
    "charging",
    "received_at",
    "ts_suspect",
)
SAMPLE_TYPES: Final = (
    "text",
    "timestamptz",
    "int8",
    "text",
    "text",
    "int2",
    "bool",
    "float4",
    "float4",
    "float4",
    "float4",
    "float4",
    "float4",
    "int2",
    "bool",
    "timestamptz",
    "bool",
)
SampleRow = tuple[
    str,
    datetime,
    int,
    str | None,
    str | None,
    int | None,
    bool | None,
    float | None,
    float | None,
    float | None,
    float | None,
    float | None,
    float | None,
    int | None,
    bool | None,
    datetime,
    bool,
]
# Indexes into SampleRow used by the session counters.
ROW_DEVICE: Final = 0
ROW_TS: Final = 1
ROW_SESSION: Final = 3
ROW_MODE: Final = 4
ROW_LEVEL: Final = 5
ROW_OUT: Final = 6
ROW_Z_OHM: Final = 10
ROW_BATT_PCT: Final = 13
ROW_RECEIVED_AT: Final = 15
ROW_SUSPECT: Final = 16


@dataclass(frozen=True, slots=True)
class TelemetryIn:
    """A telemetry message: its ledger entry and one row per sample."""

    device_id: str
    seq: int
    session: str | None
    rows: list[SampleRow]
    received_at: datetime
    payload: bytes  # as received: tells a redelivery from a reused seq, kept with a conflict

    @property
    def ts(self) -> datetime:
        """The first sample's time, which the ledger records."""
        return self.rows[0][ROW_TS]

    @property
    def ts_suspect(self) -> bool:
        """Whether any sample's device time is implausible."""
        return any(row[ROW_SUSPECT] for row in self.rows)


@dataclass(frozen=True, slots=True)
class _Stamped:
    """What ingest keeps beside a one-time message with a seq: whose, when, and its bytes."""

    device_id: str
    ts: datetime
    ts_suspect: bool
    received_at: datetime
    payload: bytes  # as received: tells a redelivery from a reused seq, kept with a conflict


@dataclass(frozen=True, slots=True)
class EventIn(_Stamped):
    """One lifecycle event; ``body`` is its own fields as JSON, as ``events.body`` stores them."""

    event: Event
    body: str

    @property
    def seq(self) -> int:
        """The event's seq."""
        return self.event.seq


@dataclass(frozen=True, slots=True)
class StateIn(_Stamped):
    """A state report: firmware and the answer to the last mode table."""

    state: State

    @property
    def seq(self) -> int:
        """The report's seq."""
        return self.state.seq

    @property
    def at(self) -> datetime:
        """When the report counts from, to tell the newest: its device time, or its receipt
        when the clock is suspect (a report from year 2100 would otherwise stay the newest
        for good, and every later firmware and config answer would lose to it)."""
        return self.received_at if self.ts_suspect else self.ts


@dataclass(frozen=True, slots=True)
class PresenceIn:
    """Online or offline; ``ts`` is None for the last will, which the broker sends."""

    device_id: str
    online: bool
    ts: datetime | None
    ts_suspect: bool
    received_at: datetime


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message that is not protocol v1, kept for the firmware team and then acknowledged."""

    topic: str
    device_id: str | None
    channel: str | None
    payload: bytes
    payload_size: int
    reason: str
    detail: str
    received_at: datetime


Decoded = TelemetryIn | EventIn | StateIn | PresenceIn | DeadLetter


def device_time(epoch_ms: int, received_at: datetime) -> tuple[datetime, bool]:
    """The device's time as a datetime and whether it is implausible next to the receipt."""
    _refuse_past_max(epoch_ms)
    ts = _EPOCH + timedelta(milliseconds=epoch_ms)
    suspect = ts < received_at - CLOCK_PAST_LIMIT or ts > received_at + CLOCK_FUTURE_LIMIT
    return ts, suspect


def _refuse_past_max(epoch_ms: int) -> None:
    if epoch_ms > DEVICE_TIME_MAX_MS:
        raise ProtocolError(
            "invalid", f"ts {epoch_ms} is past {DEVICE_TIME_MAX:%Y-%m-%d}", path="ts"
        )


def decode_inbound(message: Inbound) -> Decoded:
    """Validate one message against protocol v1; anything invalid becomes a DeadLetter."""
    device_id: str | None = None
    channel: Channel | None = None
    try:
        device_id, channel = parse_topic(message.topic)
        return _decode(device_id, channel, message)
    except ProtocolError as exc:
        return dead_letter(
            message,
            exc.reason,
            exc.detail,
            device_id=device_id,
            channel=channel.value if channel is not None else None,
        )


def dead_letter(
    message: Inbound,
    reason: str,
    detail: str,
    *,
    device_id: str | None = None,
    channel: str | None = None,
) -> DeadLetter:
    """A dead letter for ``message``: its payload, its size and why."""
    return DeadLetter(
        topic=message.topic,
        device_id=device_id,
        channel=channel if channel is not None else _channel_of(message.topic),
        # Whole: ingest acknowledges a dead letter to its device (acks.py), which then deletes
        # its own copy, so this row is the only one left. The broker bounds it
        # (max_packet_size, 256 KiB).
        payload=message.payload,
        payload_size=len(message.payload),
        reason=reason,
        detail=detail,
        received_at=message.received_at,
    )


def _channel_of(topic: str) -> str | None:
    last = topic.rsplit("/", 1)[-1][:64]
    return last or None


def _decode(device_id: str, channel: Channel, message: Inbound) -> Decoded:
    received_at = message.received_at
    if channel is Channel.CONFIG:
        raise ProtocolError("unknown_channel", "config is written by the backend, not read")
    if channel is Channel.TELEMETRY:
        fast = _telemetry_fast(device_id, message.payload, received_at)
        if fast is not None:
            return fast
        telemetry = decode(Channel.TELEMETRY, message.payload)
        return _telemetry(device_id, telemetry, received_at, message.payload)
    if channel is Channel.EVENTS:
        event = decode(Channel.EVENTS, message.payload)
        ts, suspect = device_time(event.ts, received_at)
        body = event.model_dump_json(exclude={"v", "seq", "ts", "type"}, exclude_none=True)
        return EventIn(device_id, ts, suspect, received_at, message.payload, event, body)
    if channel is Channel.STATE:
        state = decode(Channel.STATE, message.payload)
        ts, suspect = device_time(state.ts, received_at)
        return StateIn(device_id, ts, suspect, received_at, message.payload, state)
    presence: Presence = decode(Channel.PRESENCE, message.payload)
    if presence.ts is None:
        return PresenceIn(device_id, presence.online, None, False, received_at)
    ts, suspect = device_time(presence.ts, received_at)
    return PresenceIn(device_id, presence.online, ts, suspect, received_at)


def _telemetry(
    device_id: str, message: Telemetry, received_at: datetime, payload: bytes
) -> TelemetryIn:
    """The rows of a message the full path validated, built as the fast path builds them."""
    for sample in message.samples:
        _refuse_past_max(sample.ts)
    # Plain values (a mode's str, not the enum) in the fast path's structs, so rows are alike.
    samples = msgspec.convert(message.samples, list[_FastSample], from_attributes=True)
    rows = _sample_rows(device_id, message.seq, message.session, samples, received_at)
    return TelemetryIn(device_id, message.seq, message.session, rows, received_at, payload)


def _telemetry_fast(device_id: str, payload: bytes, received_at: datetime) -> TelemetryIn | None:
    """The common telemetry message decoded by msgspec, or None to take the full path.

    Accepts only what the full path accepts and builds the same rows (a test holds the two
    to that on the vectors and on generated payloads): a message with an unknown field or a
    session id that is not plain printable ASCII, and anything invalid, goes the full way,
    which also names the problem for the dead letter. It costs about a third of the full
    path, and telemetry is nearly everything ingest reads.
    """
    if len(payload) > MAX_PAYLOAD_BYTES:
        return None
    try:
        message = _FAST_TELEMETRY.decode(payload)
    except msgspec.DecodeError:  # ValidationError is a DecodeError
        return None
    session = message.session
    if session is not None and not (session.isascii() and session.isprintable()):
        return None  # no U+0000 (PostgreSQL text cannot hold it) and no lone surrogates
    rows = _sample_rows(device_id, message.seq, session, message.samples, received_at)
    return TelemetryIn(device_id, message.seq, session, rows, received_at, payload)


def _sample_rows(
    device_id: str,
    seq: int,
    session: str | None,
    samples: Iterable[_FastSample],
    received_at: datetime,
) -> list[SampleRow]:
    """One row per sample, its device time flagged as :func:`device_time` flags it."""
    past = received_at - CLOCK_PAST_LIMIT
    future = received_at + CLOCK_FUTURE_LIMIT
    rows: list[SampleRow] = []
    for s in samples:
        ts = _EPOCH + timedelta(0, 0, 0, s.ts)  # positional milliseconds: a quarter faster
        rows.append(
            (
                device_id,
                ts,
                seq,
                session,
                s.mode,
                s.level,
                s.out,
                s.i_ua,
                s.i_set_ua,
                s.v_v,
                s.z_ohm,
                s.t_elec_c,
                s.t_batt_c,
                s.batt_pct,
                s.charging,
                received_at,
                ts < past or ts > future,
            )
        )
    return rows
