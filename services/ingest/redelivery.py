"""Telling a redelivery from a reused seq, for messages whose ``(device_id, seq)`` was not new.

A message whose key is stored and which says something else is no redelivery: the device used
the seq twice, as after a factory reset or a lost outbox. The ledgers keep each payload's
CRC-32 and it is compared only for keys that were not new, so a batch of new messages pays
nothing here beyond the CRC. Galvani's agent resends a payload byte for byte, so the same CRC
is a redelivery. Another CRC is not yet a reused seq: the protocol keys a message by
``(device_id, seq)`` alone, and other firmware may serialize a message anew when it resends it
(key order, spacing, ``1`` for ``1.0``, a field this backend ignores), so on that rare path
what the message says is compared with what the key holds (see :func:`_said_before`), and
with what ``message_conflicts`` recorded under it. Messages under one key in one batch are
compared the same way in memory (:class:`Keyed`). What is found reused is recorded by
:mod:`services.ingest.conflicts`.
"""

import json
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from operator import itemgetter
from typing import Final, Generic, NamedTuple, TypeVar
from zlib import crc32

from psycopg import sql
from psycopg.rows import args_row

from services.common.db import Conn
from services.common.protocol import Channel, device_topic
from services.common.subscriber import Inbound
from services.ingest.batch import BatchOutcome, M, Message
from services.ingest.decode import (
    ROW_SUSPECT,
    ROW_TS,
    SAMPLE_COLUMNS,
    EventIn,
    SampleRow,
    StateIn,
    TelemetryIn,
    decode_inbound,
)
from services.ingest.samples import READINGS

# The stored readings at given sample times, to compare a message with what its key holds.
FIND_STORED: Final = sql.SQL(
    "SELECT s.device_id, s.ts, {} FROM samples s"
    " JOIN unnest(%b::text[], %b::timestamptz[]) AS u(device_id, ts)"
    " ON s.device_id = u.device_id AND s.ts = u.ts"
    # Constant bounds let the planner skip chunks and partitions no time can be in.
    " WHERE s.ts BETWEEN %s AND %s"
).format(sql.SQL(", ").join(sql.Identifier("s", c) for c in READINGS))
# A suspect-clock message's samples, by the message's key (samples.py stores them apart).
FIND_SUSPECT_STORED: Final = sql.SQL(
    "SELECT s.device_id, s.seq, s.idx, s.ts, {} FROM suspect_samples s"
    " JOIN unnest(%b::text[], %b::int8[]) AS u(device_id, seq)"
    " ON s.device_id = u.device_id AND s.seq = u.seq"
).format(sql.SQL(", ").join(sql.Identifier("s", c) for c in READINGS))
_readings_of: Final = itemgetter(*(SAMPLE_COLUMNS.index(c) for c in READINGS))
# What a state report says, as state_reports stores it.
STATE_FIELDS: Final = (
    "ts",
    "fw",
    "hw",
    "config_version",
    "config_sha256",
    "config_status",
    "config_reason",
    "dropped",
)
LEDGERS: Final = {
    Channel.TELEMETRY: "telemetry_messages",
    Channel.EVENTS: "events",
    Channel.STATE: "state_reports",
}
T = TypeVar("T")


@dataclass
class Keyed(Generic[M]):
    """One channel's messages of a batch by ``(device_id, seq)``: the first of each key, and
    each other message sent under a key (a copy of an earlier one is a duplicate)."""

    first: dict[tuple[str, int], M] = field(default_factory=dict)
    later: list[M] = field(default_factory=list)

    def add(self, item: M, outcome: BatchOutcome, channel: Channel) -> None:
        key = (item.device_id, item.seq)
        earlier = self.first.get(key)
        if earlier is None:
            self.first[key] = item
        elif _repeats(item, [earlier, *(o for o in self.later if (o.device_id, o.seq) == key)]):
            outcome.duplicates[channel] += 1  # a publish retried by the device
        else:
            self.later.append(item)

    def all(self) -> list[M]:
        return [*self.first.values(), *self.later]


def _repeats(item: M, earlier: list[M]) -> bool:
    """Whether ``item`` says what one of ``earlier`` says: the same bytes, or the same content
    serialized anew (compared only when the bytes differ, which is rare)."""
    if any(other.payload == item.payload for other in earlier):
        return True
    content = _content(item)
    return any(_content(other) == content for other in earlier)


@dataclass(frozen=True, slots=True)
class Held:
    """The message a key already holds, as a later message under that key is compared to."""

    crc32: int | None  # None: stored before ledgers kept it
    ts: datetime
    received_at: datetime


def sort_out(
    conn: Conn,
    channel: Channel,
    keyed: Keyed[M],
    new: set[tuple[str, int]],
    outcome: BatchOutcome,
    as_held: Callable[[Conn, list[M]], list[bool]],
) -> list[tuple[M, Held]]:
    """The messages of ``keyed`` whose seq the device used for another message, each with what
    its key holds; the others are counted as stored or duplicate.

    Only keys that were not new are looked up (one query), so a batch of new messages pays
    nothing here beyond the CRC the ledger stores; only a message with another CRC than its
    key's is compared by content (``as_held``, then :func:`_recorded`).
    """
    outcome.stored[channel] += len(new)
    old = [key for key in keyed.first if key not in new]
    held = _held(conn, LEDGERS[channel], old) if old else {}
    differing: list[tuple[M, Held]] = []
    for item in [keyed.first[key] for key in old] + keyed.later:
        key = (item.device_id, item.seq)
        if key in new:  # a later message under a key this batch stored first
            first = keyed.first[key]
            holds: Held | None = Held(crc32(first.payload), first.ts, first.received_at)
        else:
            holds = held.get(key)
        # No CRC on record (stored before the ledgers kept one), or the row trimmed by the
        # retention job since the insert found it: taken as a redelivery.
        if holds is None or holds.crc32 is None or holds.crc32 == crc32(item.payload):
            outcome.duplicates[channel] += 1
        else:
            differing.append((item, holds))
    # A later message under a key this batch stored first was compared by content on arrival
    # (Keyed.add); the others are compared with what the database holds under their key.
    checked = [i for i, (item, _) in enumerate(differing) if (item.device_id, item.seq) not in new]
    said = _said_before(conn, channel, [differing[i][0] for i in checked], as_held)
    resent = {i for i, same in zip(checked, said, strict=True) if same}
    outcome.duplicates[channel] += len(resent)
    reused = [pair for i, pair in enumerate(differing) if i not in resent]
    outcome.reused[channel] += len(reused)
    return reused


def _columns(*values: object) -> tuple[object, ...]:
    return values


def _by_key(
    conn: Conn,
    table: str,
    columns: Sequence[str],
    keys: Iterable[tuple[str, int]],
    row: Callable[..., T],
) -> dict[tuple[str, int], T]:
    """``columns`` of ``table``'s rows under ``keys`` (``(device_id, seq)``), each made by
    ``row`` from the columns' values."""

    def keyed(device_id: str, seq: int, *values: object) -> tuple[tuple[str, int], T]:
        return (device_id, seq), row(*values)

    wanted = list(keys)
    query = sql.SQL(
        "SELECT t.device_id, t.seq, {} FROM {} t"
        " JOIN unnest(%b::text[], %b::int8[]) AS u(device_id, seq)"
        " ON t.device_id = u.device_id AND t.seq = u.seq"
    ).format(sql.SQL(", ").join(sql.Identifier("t", c) for c in columns), sql.Identifier(table))
    with conn.cursor(row_factory=args_row(keyed)) as cur:
        return dict(cur.execute(query, [[k[0] for k in wanted], [k[1] for k in wanted]]).fetchall())


def _held(conn: Conn, table: str, keys: list[tuple[str, int]]) -> dict[tuple[str, int], Held]:
    return _by_key(conn, table, ("payload_crc32", "ts", "received_at"), keys, Held)


def _said_before(
    conn: Conn, channel: Channel, items: list[M], as_held: Callable[[Conn, list[M]], list[bool]]
) -> list[bool]:
    """Whether each of ``items``, a message with another CRC than its stored key's, says what
    was stored under that key: what the key's rows hold (``as_held``), or a message recorded
    whole in ``message_conflicts`` under it (a conflicting message resent)."""
    if not items:
        return []
    said = as_held(conn, items)
    others = [i for i, same in enumerate(said) if not same]
    if others:
        recorded = _recorded(conn, channel, [items[i] for i in others])
        for i, same in zip(others, recorded, strict=True):
            said[i] = same
    return said


def _content(item: Message) -> object:
    """What a message says, in the form the database stores it, to tell a message serialized
    anew from another: a sample's readings rounded as their ``real`` columns hold them, an
    event's body parsed (keys in any order, numbers by value, as ``jsonb`` compares them), a
    state report's stored fields. Receipt time, the suspect flag and the seq are not content.
    """
    if isinstance(item, TelemetryIn):
        samples = {row[ROW_TS]: _as_stored(_readings_of(row)) for row in item.rows}
        return (item.ts, len(item.rows), item.session, samples)
    if isinstance(item, EventIn):
        return (item.ts, item.event.type, json.loads(item.body))
    if isinstance(item, StateIn):  # as ledgers.insert_states stores it, in STATE_FIELDS order
        state, config, dropped = item.state, item.state.config, item.state.dropped
        return (
            item.ts,
            state.fw,
            state.hw,
            config.version if config else None,
            config.sha256 if config else None,
            config.status.value if config else None,
            config.reason.value if config and config.reason else None,
            dropped.model_dump() if dropped else None,
        )
    raise TypeError(f"no content for {type(item).__name__}")


def _as_stored(readings: Sequence[object]) -> tuple[object, ...]:
    # A float goes into a real column as psycopg's binary dumper sends it, a C cast to single
    # precision, which array("f") also does (without struct's overflow error); so 6.1 and
    # 6.0999999 are one reading, as PostgreSQL's comparison of the stored columns has them.
    return tuple(array("f", [v])[0] if isinstance(v, float) else v for v in readings)


def _stored_sample(
    device_id: str, ts: datetime, *readings: object
) -> tuple[tuple[str, datetime], tuple[object, ...]]:
    return (device_id, ts), _as_stored(readings)


def _suspect_sample(
    device_id: str, seq: int, idx: int, ts: datetime, *readings: object
) -> tuple[tuple[str, int, int], tuple[datetime, tuple[object, ...]]]:
    return (device_id, seq, idx), (ts, _as_stored(readings))


def telemetry_as_held(conn: Conn, items: list[TelemetryIn]) -> list[bool]:
    """Whether each message says what its key holds: the ledger's first sample time, sample
    count and session, and every sample stored at its time with its readings (by whichever
    message stored it: a sample is keyed by its time, and readings are what it says); a
    suspect-clock sample at its place in the message, with its time and readings."""
    keys = {(m.device_id, m.seq) for m in items}
    ledger = _by_key(conn, "telemetry_messages", ("ts", "samples", "session"), keys, _columns)
    times = sorted(
        {(m.device_id, row[ROW_TS]) for m in items for row in m.rows if not row[ROW_SUSPECT]}
    )
    stored: dict[tuple[str, datetime], tuple[object, ...]] = {}
    if times:
        with conn.cursor(row_factory=args_row(_stored_sample)) as cur:
            stored = dict(
                cur.execute(
                    FIND_STORED,
                    [
                        [d for d, _ in times],
                        [t for _, t in times],
                        min(t for _, t in times),
                        max(t for _, t in times),
                    ],
                ).fetchall()
            )
    suspect_keys = sorted({(m.device_id, m.seq) for m in items if m.ts_suspect})
    suspect: dict[tuple[str, int, int], tuple[datetime, tuple[object, ...]]] = {}
    if suspect_keys:
        with conn.cursor(row_factory=args_row(_suspect_sample)) as by_place:
            suspect = dict(
                by_place.execute(
                    FIND_SUSPECT_STORED,
                    [[d for d, _ in suspect_keys], [q for _, q in suspect_keys]],
                ).fetchall()
            )

    def holds(m: TelemetryIn, idx: int, row: SampleRow) -> bool:
        readings = _as_stored(_readings_of(row))
        if row[ROW_SUSPECT]:
            return suspect.get((m.device_id, m.seq, idx)) == (row[ROW_TS], readings)
        return stored.get((m.device_id, row[ROW_TS])) == readings

    return [
        ledger.get((m.device_id, m.seq)) == (m.ts, len(m.rows), m.session)
        and all(holds(m, idx, row) for idx, row in enumerate(m.rows))
        for m in items
    ]


def events_as_held(conn: Conn, items: list[EventIn]) -> list[bool]:
    """Whether each event says what the ``events`` row under its key holds."""
    keys = {(e.device_id, e.seq) for e in items}
    held = _by_key(conn, "events", ("ts", "type", "body"), keys, _columns)
    # psycopg reads the jsonb body with json.loads, as _content reads the new one.
    return [held.get((e.device_id, e.seq)) == _content(e) for e in items]


def states_as_held(conn: Conn, items: list[StateIn]) -> list[bool]:
    """Whether each state report says what the ``state_reports`` row under its key holds."""
    keys = {(s.device_id, s.seq) for s in items}
    held = _by_key(conn, "state_reports", STATE_FIELDS, keys, _columns)
    # psycopg reads the jsonb dropped counts with json.loads: the dict that was stored.
    return [held.get((s.device_id, s.seq)) == _content(s) for s in items]


class Recorded(NamedTuple):
    """A message recorded whole in ``message_conflicts``."""

    device_id: str
    seq: int
    crc32: int
    payload: bytes  # a bytea column
    received_at: datetime


def _recorded(conn: Conn, channel: Channel, items: list[M]) -> list[bool]:
    """Whether each of ``items`` says what a message recorded in ``message_conflicts`` under
    its key says. Such a message did everything it does (its samples, session or state) in
    the transaction that recorded it, so its copy is a duplicate like any redelivery."""
    wanted = sorted({(m.device_id, m.seq, m.ts) for m in items})
    recorded: dict[tuple[str, int], list[Recorded]] = {}
    with conn.cursor(row_factory=args_row(Recorded)) as cur:
        cur.execute(
            "SELECT c.device_id, c.seq, c.payload_crc32, c.payload, c.received_at"
            " FROM message_conflicts c"
            " JOIN unnest(%b::text[], %b::int8[], %b::timestamptz[]) AS u(device_id, seq, ts)"
            # Content equal means time equal, so only records at the message's time are read.
            " ON c.device_id = u.device_id AND c.seq = u.seq AND c.ts = u.ts"
            " WHERE c.channel = %s",
            [[w[0] for w in wanted], [w[1] for w in wanted], [w[2] for w in wanted], channel.value],
        )
        for entry in cur.fetchall():
            recorded.setdefault((entry.device_id, entry.seq), []).append(entry)
    said: list[bool] = []
    for item in items:
        entries = recorded.get((item.device_id, item.seq), [])
        crc = crc32(item.payload)
        said.append(
            any(entry.crc32 == crc for entry in entries)
            or any(
                _decoded_content(item.device_id, channel, entry.payload, entry.received_at)
                == _content(item)
                for entry in entries
            )
        )
    return said


def _decoded_content(device_id: str, channel: Channel, payload: bytes, at: datetime) -> object:
    """The content of a payload recorded whole, decoded as ingest decoded it on arrival."""
    decoded = decode_inbound(Inbound(device_topic(device_id, channel), payload, 0, 1, at, 0))
    if isinstance(decoded, TelemetryIn | EventIn | StateIn):
        return _content(decoded)
    return None  # no longer v1 as this ingest reads it: says nothing a message can repeat
