"""What a batch changes on the rows derived from its messages: sessions and devices.

Each batch gathers per-device and per-session deltas in memory (only from what the database
reported as new, so a batch written twice counts once) and applies them in one statement per
table, in key order: sessions (samples, output time, gel share, start and end by highest
seq), config pushes answered, and devices (last seen, seq counters and gaps, firmware and
config answer by device time, or by receipt for a report with a suspect clock, presence).
"""

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from itertools import groupby
from operator import itemgetter
from typing import Final

from psycopg import sql

from services.common.db import Conn
from services.common.protocol import SessionEnd, SessionStart
from services.common.protocol.limits import SAMPLE_PERIOD_S
from services.ingest.decode import (
    GEL_BAND_OHM,
    ROW_BATT_PCT,
    ROW_DEVICE,
    ROW_LEVEL,
    ROW_MODE,
    ROW_OUT,
    ROW_SESSION,
    ROW_SUSPECT,
    ROW_TS,
    ROW_Z_OHM,
    EventIn,
    PresenceIn,
    SampleRow,
    StateIn,
    TelemetryIn,
)

_sample_time: Final = itemgetter(ROW_TS)

# When a batch's value replaces the stored one: redelivered or out-of-order messages must not
# roll a row back, so the start and end with the highest seq win, and state and presence with
# the newest device time (a config answer only from a report that carries one).
_START_WINS: Final = (
    "excluded.start_seq > s.start_seq OR s.start_seq IS NULL AND excluded.start_seq IS NOT NULL"
)
_END_WINS: Final = (
    "excluded.end_seq > s.end_seq OR s.end_seq IS NULL AND excluded.end_seq IS NOT NULL"
)
_STATE_WINS: Final = "u.state_ts >= d.state_ts OR d.state_ts IS NULL AND u.state_ts IS NOT NULL"
_CONFIG_WINS: Final = (
    "(u.state_ts >= d.state_ts OR d.state_ts IS NULL) AND u.config_reported_version IS NOT NULL"
)
_CONFIG_COLUMNS: Final = (
    "config_reported_version",
    "config_reported_sha256",
    "config_reported_status",
    "config_reported_reason",
)
_PRESENCE_WINS: Final = (
    "u.presence_at >= d.presence_at OR d.presence_at IS NULL AND u.presence_at IS NOT NULL"
)


def _if_newer(when: str, new: str, old: str, *columns: str) -> sql.SQL:
    """SET items ``column = CASE WHEN when THEN new ELSE old END``, one per column; ``{c}``
    in ``new`` and ``old`` stands for the column's name."""
    return sql.SQL(
        ",\n".join(
            f"{c} = CASE WHEN {when} THEN {new.format(c=c)} ELSE {old.format(c=c)} END"
            for c in columns
        )
    )


_UPSERT_SESSIONS: Final = sql.SQL(
    """
    INSERT INTO sessions AS s (
        device_id, session, brand_id, user_id, mode, level, started_at, start_seq,
        ended_at, duration_s, end_reason, end_seq, samples, out_samples, gel_ok_samples,
        output_s, first_sample_at, last_sample_at, start_batt_pct, updated_at)
    SELECT u.device_id, u.session, d.brand_id, COALESCE(u.user_id, d.user_id),
           COALESCE(u.start_mode, u.sample_mode), COALESCE(u.start_level, u.sample_level),
           u.started_at, u.start_seq, u.ended_at, u.duration_s, u.end_reason, u.end_seq,
           u.samples, u.out_samples, u.gel_ok_samples, u.out_samples * %s::real,
           u.first_sample_at, u.last_sample_at, u.start_batt_pct, now()
    FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[], %b::int2[], %b::text[],
                %b::int2[], %b::timestamptz[], %b::int8[], %b::timestamptz[], %b::real[],
                %b::text[], %b::int8[], %b::int4[], %b::int4[], %b::int4[],
                %b::timestamptz[], %b::timestamptz[], %b::int2[])
         AS u(device_id, session, user_id, start_mode, start_level, sample_mode,
              sample_level, started_at, start_seq, ended_at, duration_s, end_reason,
              end_seq, samples, out_samples, gel_ok_samples, first_sample_at,
              last_sample_at, start_batt_pct)
    JOIN devices d ON d.id = u.device_id
    ORDER BY u.device_id, u.session
    ON CONFLICT (device_id, session) DO UPDATE SET
        -- The start and end with the highest seq win, whatever order they arrive in.
        {start_wins},
        {start_wins_when_given},
        start_seq = GREATEST(s.start_seq, excluded.start_seq),
        {end_wins},
        end_seq = GREATEST(s.end_seq, excluded.end_seq),
        samples = s.samples + excluded.samples,
        out_samples = s.out_samples + excluded.out_samples,
        gel_ok_samples = s.gel_ok_samples + excluded.gel_ok_samples,
        output_s = (s.out_samples + excluded.out_samples) * %s::real,
        start_batt_pct = CASE WHEN excluded.first_sample_at < s.first_sample_at
                              OR s.first_sample_at IS NULL
                              THEN COALESCE(excluded.start_batt_pct, s.start_batt_pct)
                              ELSE s.start_batt_pct END,
        first_sample_at = LEAST(s.first_sample_at, excluded.first_sample_at),
        last_sample_at = GREATEST(s.last_sample_at, excluded.last_sample_at),
        updated_at = now()"""
).format(
    start_wins=_if_newer(_START_WINS, "excluded.{c}", "s.{c}", "user_id", "started_at"),
    start_wins_when_given=_if_newer(
        _START_WINS, "excluded.{c}", "COALESCE(s.{c}, excluded.{c})", "mode", "level"
    ),
    end_wins=_if_newer(_END_WINS, "excluded.{c}", "s.{c}", "ended_at", "duration_s", "end_reason"),
)


_UPDATE_DEVICES: Final = sql.SQL(
    """
    UPDATE devices d SET
        last_received_at = GREATEST(d.last_received_at, u.received_at),
        last_seen = GREATEST(d.last_seen, u.seen),
        first_seq = LEAST(d.first_seq, u.min_seq),
        last_seq = GREATEST(d.last_seq, u.max_seq),
        seq_count = d.seq_count + u.new_seqs,
        -- In numeric: seqs span 0 to 2^63 - 1, and last - first + 1 is one past bigint then.
        -- The difference itself fits (a span that wide holds at least two counted seqs).
        seq_gaps = GREATEST(0, COALESCE(
            GREATEST(d.last_seq, u.max_seq)::numeric - LEAST(d.first_seq, u.min_seq) + 1
            - (d.seq_count + u.new_seqs), 0))::bigint,
        -- "Latest" is the newest device time, not the last message received.
        {state_wins},
        {config_wins},
        state_ts = GREATEST(d.state_ts, u.state_ts),
        {presence_wins},
        -- The device's own word on presence ends a silence maintenance reported.
        silent_since = CASE WHEN {presence_won} THEN NULL ELSE d.silent_since END,
        presence_at = GREATEST(d.presence_at, u.presence_at),
        suspect_samples_at = GREATEST(d.suspect_samples_at, u.suspect_at)
    FROM unnest(%b::text[], %b::timestamptz[], %b::timestamptz[], %b::int8[], %b::int8[],
                %b::int8[], %b::timestamptz[], %b::text[], %b::text[], %b::int4[],
                %b::text[], %b::text[], %b::text[], %b::timestamptz[], %b::bool[],
                %b::timestamptz[])
         AS u(id, received_at, seen, min_seq, max_seq, new_seqs, state_ts, fw, hw,
              config_reported_version, config_reported_sha256, config_reported_status,
              config_reported_reason, presence_at, online, suspect_at)
    WHERE d.id = u.id"""
).format(
    state_wins=_if_newer(_STATE_WINS, "u.{c}", "d.{c}", "fw", "hw"),
    config_wins=_if_newer(_CONFIG_WINS, "u.{c}", "d.{c}", *_CONFIG_COLUMNS),
    presence_wins=_if_newer(_PRESENCE_WINS, "u.{c}", "d.{c}", "online"),
    presence_won=sql.SQL(_PRESENCE_WINS),
)


@dataclass
class DeviceDelta:
    """What one batch changes on one device row."""

    received_at: datetime
    seen: datetime | None = None
    min_seq: int | None = None
    max_seq: int | None = None
    new_seqs: int = 0
    state: StateIn | None = None
    presence_at: datetime | None = None
    online: bool | None = None
    suspect_at: datetime | None = None  # the latest receipt of a stored suspect-clock sample

    def saw(self, ts: datetime, suspect: bool, received_at: datetime) -> None:
        self.received_at = max(self.received_at, received_at)
        if not suspect and (self.seen is None or ts > self.seen):
            self.seen = ts

    def saw_samples(self, rows: list[SampleRow], received_at: datetime) -> None:
        self.received_at = max(self.received_at, received_at)
        plausible = [row[ROW_TS] for row in rows if not row[ROW_SUSPECT]]
        if plausible:
            latest = max(plausible)
            if self.seen is None or latest > self.seen:
                self.seen = latest

    def counted(self, seq: int) -> None:
        self.new_seqs += 1
        self.min_seq = seq if self.min_seq is None else min(self.min_seq, seq)
        self.max_seq = seq if self.max_seq is None else max(self.max_seq, seq)


@dataclass
class SessionDelta:
    """What one batch adds to one session row."""

    samples: int = 0
    out_samples: int = 0
    gel_ok_samples: int = 0
    first_sample_at: datetime | None = None
    last_sample_at: datetime | None = None
    first_batt_pct: int | None = None
    first_mode: str | None = None
    first_level: int | None = None
    start: EventIn | None = None
    end: EventIn | None = None

    def add_samples(self, rows: list[SampleRow]) -> None:
        """Count a run of one session's samples (a message's, as a rule)."""
        self.samples += len(rows)
        out = [row[ROW_Z_OHM] for row in rows if row[ROW_OUT]]
        self.out_samples += len(out)
        low, high = GEL_BAND_OHM
        self.gel_ok_samples += sum(1 for z in out if z is not None and low <= z <= high)
        # A suspect clock's samples count, but their times say nothing about the session's.
        timed = [row for row in rows if not row[ROW_SUSPECT]]
        if not timed:
            return
        first = min(timed, key=_sample_time)
        if self.first_sample_at is None or first[ROW_TS] < self.first_sample_at:
            self.first_sample_at = first[ROW_TS]
            self.first_batt_pct = first[ROW_BATT_PCT]
            self.first_mode = first[ROW_MODE]
            self.first_level = first[ROW_LEVEL]
        last = max(row[ROW_TS] for row in timed)
        if self.last_sample_at is None or last > self.last_sample_at:
            self.last_sample_at = last

    def add_event(self, event: EventIn) -> None:
        if isinstance(event.event, SessionStart):
            if self.start is None or event.event.seq > self.start.event.seq:
                self.start = event
        elif self.end is None or event.event.seq > self.end.event.seq:
            self.end = event


def devices_of(
    telemetry: Iterable[TelemetryIn],
    events: Iterable[EventIn],
    states: Iterable[StateIn],
    presences: Iterable[PresenceIn],
) -> dict[str, DeviceDelta]:
    """A delta for each device the batch's messages name, in order of first appearance."""
    devices: dict[str, DeviceDelta] = {}
    items: list[TelemetryIn | EventIn | StateIn | PresenceIn] = [
        *telemetry,
        *events,
        *states,
        *presences,
    ]
    for item in items:
        if item.device_id not in devices:
            devices[item.device_id] = DeviceDelta(received_at=item.received_at)
    return devices


def session_deltas(
    rows: list[SampleRow], new_events: list[EventIn]
) -> dict[tuple[str, str], SessionDelta]:
    """What the stored samples and the session events add to each session."""
    sessions: dict[tuple[str, str], SessionDelta] = {}
    # A message's rows are adjacent and share device and session: counted a run at a time.
    for (device_id, session), run in groupby(rows, key=itemgetter(ROW_DEVICE, ROW_SESSION)):
        if session is not None:
            key = (device_id, session)
            delta = sessions.get(key)
            if delta is None:
                delta = sessions[key] = SessionDelta()
            delta.add_samples(list(run))
    for event in new_events:
        if isinstance(event.event, SessionStart | SessionEnd):
            key = (event.device_id, event.event.session)
            sessions.setdefault(key, SessionDelta()).add_event(event)
    return sessions


def upsert_sessions(conn: Conn, sessions: dict[tuple[str, str], SessionDelta]) -> None:
    """Apply the session deltas, in key order."""
    keys = sorted(sessions)
    deltas = [sessions[key] for key in keys]
    starts = [d.start.event if d.start else None for d in deltas]
    ends = [d.end.event if d.end else None for d in deltas]
    conn.execute(
        _UPSERT_SESSIONS,
        [
            SAMPLE_PERIOD_S,
            [k[0] for k in keys],
            [k[1] for k in keys],
            [e.user if isinstance(e, SessionStart) else None for e in starts],
            [e.mode.value if isinstance(e, SessionStart) else None for e in starts],
            [e.level if isinstance(e, SessionStart) else None for e in starts],
            [d.first_mode for d in deltas],
            [d.first_level for d in deltas],
            [d.start.ts if d.start else None for d in deltas],
            [e.seq if e else None for e in starts],
            [d.end.ts if d.end else None for d in deltas],
            [e.duration_s if isinstance(e, SessionEnd) else None for e in ends],
            [e.reason.value if isinstance(e, SessionEnd) else None for e in ends],
            [e.seq if e else None for e in ends],
            [d.samples for d in deltas],
            [d.out_samples for d in deltas],
            [d.gel_ok_samples for d in deltas],
            [d.first_sample_at for d in deltas],
            [d.last_sample_at for d in deltas],
            [d.first_batt_pct for d in deltas],
            SAMPLE_PERIOD_S,
        ],
    )


def record_config_answers(conn: Conn, states: list[StateIn]) -> None:
    """Record on each config push the device's newest answer to it."""
    answers = [(s, s.state.config) for s in states if s.state.config is not None]
    if not answers:
        return
    conn.execute(
        """
        UPDATE config_pushes p
        SET answer_status = u.status, answer_reason = u.reason, answered_at = u.ts
        FROM unnest(%b::text[], %b::int4[], %b::text[], %b::text[], %b::timestamptz[])
             AS u(device_id, version, status, reason, ts)
        WHERE p.device_id = u.device_id AND p.version = u.version
          AND (p.answered_at IS NULL OR p.answered_at <= u.ts)""",
        [
            [s.device_id for s, _ in answers],
            [c.version for _, c in answers],
            [c.status.value for _, c in answers],
            [c.reason.value if c.reason else None for _, c in answers],
            [s.at for s, _ in answers],
        ],
    )


def update_devices(conn: Conn, devices: dict[str, DeviceDelta]) -> None:
    """Apply the device deltas, in id order."""
    if not devices:
        return
    ids = sorted(devices)
    deltas = [devices[i] for i in ids]
    states = [d.state for d in deltas]
    configs = [s.state.config if s else None for s in states]
    conn.execute(
        _UPDATE_DEVICES,
        [
            ids,
            [d.received_at for d in deltas],
            [d.seen for d in deltas],
            [d.min_seq for d in deltas],
            [d.max_seq for d in deltas],
            [d.new_seqs for d in deltas],
            [s.at if s else None for s in states],
            [s.state.fw if s else None for s in states],
            [s.state.hw if s else None for s in states],
            [c.version if c else None for c in configs],
            [c.sha256 if c else None for c in configs],
            [c.status.value if c else None for c in configs],
            [c.reason.value if c and c.reason else None for c in configs],
            [d.presence_at for d in deltas],
            [d.online for d in deltas],
            [d.suspect_at for d in deltas],
        ],
    )
