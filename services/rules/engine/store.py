"""The engine's SQL: advisory locks, and what the rules store and read back to judge windows.

Every function runs in the caller's transaction and never commits. Writes ignore duplicates by
key (``(device_id, ts)`` for samples, ``(device_id, session)`` for sessions, ``(device_id,
seq)`` for reboots), so a redelivered message changes nothing. Rows come back typed through
psycopg row factories: the columns of each statement, in order, are the fields of its row
class.
"""

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from typing import Final, LiteralString, TypeVar

from psycopg import Cursor
from psycopg.abc import Params
from psycopg.rows import args_row

from services.common.db import Conn
from services.common.protocol.models import SessionEnd, SessionStart
from services.rules.conditions import Bit, SampleIn
from services.rules.context import DeviceContext

# How long after a session's start its battery reading counts as "at the start".
START_BATTERY_WINDOW: Final = timedelta(seconds=2)

T = TypeVar("T")

# The columns of rule_samples the rules read: the fields of SampleIn, in order.
SAMPLE_NAMES: Final = tuple(f.name for f in fields(SampleIn))
SAMPLE_FIELDS: Final = ", ".join(SAMPLE_NAMES)


def lock(conn: Conn, names: Sequence[str]) -> None:
    """Take transaction-scoped advisory locks on ``names``, in the order given."""
    if names:
        conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended('galvani-rules:' || name, 0))"
            " FROM unnest(%s::text[]) WITH ORDINALITY AS n(name, i) ORDER BY i",
            [list(names)],
        )


# --- samples -------------------------------------------------------------------------------


def store_samples(
    conn: Conn, device_id: str, samples: Sequence[SampleIn], received: Mapping[datetime, datetime]
) -> Cursor[datetime]:
    """Insert the samples not stored yet; the cursor returns the times of those that were new."""
    columns = [[getattr(s, name) for s in samples] for name in SAMPLE_NAMES]
    return conn.cursor(row_factory=args_row(_time)).execute(
        f"INSERT INTO rule_samples (device_id, {SAMPLE_FIELDS}, received_at)"  # noqa: S608
        " SELECT %s, * FROM unnest(%s::timestamptz[], %s::text[], %s::text[], %s::boolean[],"
        " %s::real[], %s::real[], %s::real[], %s::real[], %s::real[], %s::smallint[],"
        " %s::boolean[], %s::integer[], %s::timestamptz[])"
        " ON CONFLICT (device_id, ts) DO NOTHING RETURNING ts",
        [device_id, *columns, [received[s.ts] for s in samples]],
    )


def load_samples(conn: Conn, device_id: str, lo: datetime, hi: datetime) -> Cursor[SampleIn]:
    """The stored samples of a device between ``lo`` and ``hi``, in time order."""
    return conn.cursor(row_factory=args_row(SampleIn)).execute(
        f"SELECT {SAMPLE_FIELDS} FROM rule_samples"  # noqa: S608 - constant columns
        " WHERE device_id = %s AND ts BETWEEN %s AND %s ORDER BY ts",
        [device_id, lo, hi],
    )


@dataclass(frozen=True)
class NoGelTotal:
    """A session's stored samples with the no-gel condition: how many, when, how dry."""

    samples: int
    first: datetime | None
    last: datetime | None
    high_z_ohm: float | None


def no_gel_total(conn: Conn, device_id: str, session: str) -> NoGelTotal:
    """The no-gel samples stored for a session."""
    return _one(
        conn,
        NoGelTotal,
        "SELECT count(*), min(ts), max(ts),"
        " max(z_ohm) FROM rule_samples"
        " WHERE device_id = %s AND session = %s AND mask & %s <> 0",
        [device_id, session, int(Bit.NO_GEL)],
    )


def first_contact_after(conn: Conn, device_id: str, after: datetime) -> datetime | None:
    """The first stored sample after ``after`` with output on and skin contact."""
    return _one(
        conn,
        _maybe_time,
        "SELECT min(ts) FROM rule_samples WHERE device_id = %s AND ts > %s AND out"
        " AND mask & %s = 0",
        [device_id, after, int(Bit.NO_CONTACT)],
    )


# --- sessions ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SessionInfo:
    """What the rules know of a session's start: its event (if seen) and its first sample."""

    event_start: datetime | None
    event_mode: str | None
    first_sample: datetime | None
    sample_mode: str | None

    @property
    def started_at(self) -> datetime | None:
        """The start event's time, else the first sample's."""
        return self.event_start or self.first_sample

    @property
    def mode(self) -> str | None:
        """The start event's mode, else the first sample's."""
        return self.event_mode or self.sample_mode

    def in_start(self, ts: datetime) -> bool:
        """Whether ``ts`` is within the first moments after the start event."""
        start = self.event_start
        return start is not None and start <= ts <= start + START_BATTERY_WINDOW


def session_info(conn: Conn, device_id: str, session: str) -> Cursor[SessionInfo]:
    """A cursor with one row, whatever is known: the session's :class:`SessionInfo`."""
    return conn.cursor(row_factory=args_row(SessionInfo)).execute(
        "SELECT s.started_at, s.mode, first.ts, first.mode"
        " FROM (SELECT 1) one"
        " LEFT JOIN rule_sessions s ON s.device_id = %s AND s.session = %s"
        " LEFT JOIN LATERAL (SELECT ts, mode FROM rule_samples r"
        "   WHERE r.device_id = %s AND r.session = %s ORDER BY ts LIMIT 1) first ON true",
        [device_id, session, device_id, session],
    )


def one(cursor: Cursor[SessionInfo]) -> SessionInfo:
    """The row of a :func:`session_info` cursor."""
    row = cursor.fetchone()
    assert row is not None  # one row whatever is known
    return row


@dataclass(frozen=True)
class SessionSoFar:
    """A session's stored samples: the last with output on, the lowest battery at its start."""

    last_out: datetime | None
    low_batt: int | None


def session_so_far(conn: Conn, device_id: str, session: str, start: datetime) -> SessionSoFar:
    """What the samples already stored for a session say about its start at ``start``."""
    return _one(
        conn,
        SessionSoFar,
        "SELECT max(ts) FILTER (WHERE out)_out,"
        " min(batt_pct) FILTER (WHERE ts BETWEEN %s AND %s)"
        " FROM rule_samples WHERE device_id = %s AND session = %s",
        [start, start + START_BATTERY_WINDOW, device_id, session],
    )


def store_start(
    conn: Conn, context: DeviceContext, event: SessionStart, started: datetime, user_key: str
) -> datetime | None:
    """Record a session's start; return its end's time if the end arrived first."""
    return _one(
        conn,
        _maybe_time,
        "INSERT INTO rule_sessions (device_id, session, brand_id, user_key, mode, level,"
        " started_at) VALUES (%s, %s, %s, %s, %s, %s, %s)"
        " ON CONFLICT (device_id, session) DO UPDATE SET user_key = EXCLUDED.user_key,"
        " mode = EXCLUDED.mode, level = EXCLUDED.level, started_at = EXCLUDED.started_at"
        " RETURNING ended_at",
        [
            context.device_id,
            event.session,
            context.brand_id,
            user_key,
            event.mode.value,
            event.level,
            started,
        ],
    )


def store_end(
    conn: Conn, context: DeviceContext, event: SessionEnd, ended: datetime
) -> tuple[str, datetime | None]:
    """Record a session's end; return the user it counts for (its start's, once that arrived)
    and its start's time."""
    return _one(
        conn,
        _user_and_start,
        "INSERT INTO rule_sessions (device_id, session, brand_id, user_key, ended_at,"
        " duration_s, end_reason) VALUES (%s, %s, %s, %s, %s, %s, %s)"
        " ON CONFLICT (device_id, session) DO UPDATE SET ended_at = EXCLUDED.ended_at,"
        " duration_s = EXCLUDED.duration_s, end_reason = EXCLUDED.end_reason"
        " RETURNING user_key, started_at",
        [
            context.device_id,
            event.session,
            context.brand_id,
            context.user_key(),
            ended,
            event.duration_s,
            event.reason.value,
        ],
    )


def started_users(conn: Conn, ends: Sequence[tuple[str, str]]) -> list[str]:
    """``u:<brand>:<user_key>`` of the stored starts of the given (device, session) ends."""
    return _all(
        conn,
        _user_lock,
        "SELECT brand_id, user_key FROM rule_sessions"
        " WHERE (device_id, session) IN (SELECT * FROM unnest(%s::text[], %s::text[]))"
        " AND started_at IS NOT NULL",
        [[d for d, _ in ends], [s for _, s in ends]],
    )


@dataclass(frozen=True)
class StartRow:
    """A session's start as the usage windows count it."""

    device_id: str
    session: str
    mode: str | None
    started_at: datetime
    duration_s: int | None  # from the session's end, when it has arrived


def starts(conn: Conn, brand_id: str, user_key: str, lo: datetime, hi: datetime) -> list[StartRow]:
    """A user's session starts between ``lo`` and ``hi``, in time order."""
    return _all(
        conn,
        StartRow,
        "SELECT device_id, session, mode, started_at, duration_s FROM rule_sessions"
        " WHERE brand_id = %s AND user_key = %s AND started_at BETWEEN %s AND %s"
        " ORDER BY started_at, device_id, session",
        [brand_id, user_key, lo, hi],
    )


@dataclass(frozen=True)
class EndedRow:
    """A session that ended, as the cooldown judges the start after it."""

    session: str
    mode: str | None
    ended_at: datetime
    duration_s: int


def long_sessions_before(
    conn: Conn, brand_id: str, user_key: str, start: StartRow, since: datetime, long_s: float
) -> list[EndedRow]:
    """The user's other sessions longer than ``long_s`` that ended in (``since``, the start],
    latest first."""
    return _all(
        conn,
        EndedRow,
        "SELECT session, mode, ended_at, duration_s FROM rule_sessions"
        " WHERE brand_id = %s AND user_key = %s AND ended_at <= %s AND ended_at > %s"
        " AND duration_s > %s AND started_at IS NOT NULL"
        " AND NOT (device_id = %s AND session = %s)"
        " ORDER BY ended_at DESC",
        [
            brand_id,
            user_key,
            start.started_at,
            since,
            long_s,
            start.device_id,
            start.session,
        ],
    )


# --- reboots and alerts --------------------------------------------------------------------


@dataclass(frozen=True)
class RebootRow:
    """An unexpected reboot the reboot loop counts."""

    seq: int
    ts: datetime
    reason: str


def store_reboot(conn: Conn, device_id: str, seq: int, ts: datetime, reason: str) -> None:
    """Record an unexpected reboot (a redelivered one is ignored)."""
    conn.execute(
        "INSERT INTO rule_reboots (device_id, seq, ts, reason) VALUES (%s, %s, %s, %s)"
        " ON CONFLICT DO NOTHING",
        [device_id, seq, ts, reason],
    )


def reboots(conn: Conn, device_id: str, lo: datetime, hi: datetime) -> list[RebootRow]:
    """A device's unexpected reboots between ``lo`` and ``hi``, in time order."""
    return _all(
        conn,
        RebootRow,
        "SELECT seq, ts, reason FROM rule_reboots WHERE device_id = %s"
        " AND ts BETWEEN %s AND %s ORDER BY ts, seq",
        [device_id, lo, hi],
    )


@dataclass(frozen=True)
class BanRow:
    """A ban of a flooding device, as ingest recorded it in ``device_throttles``."""

    id: int
    device_id: str
    banned_at: datetime
    until: datetime
    messages_over_budget: int
    budget: int
    window_s: float


# The most bans one sweep raises (the rest wait for the next sweep).
BANS_PER_SWEEP: Final = 1000


def unraised_bans(conn: Conn, since: datetime) -> list[BanRow]:
    """Bans since ``since`` that no ``device_flooding`` occurrence has counted yet, oldest
    first."""
    return _all(
        conn,
        BanRow,
        "SELECT b.id, b.device_id, b.banned_at, b.until, b.messages_over_budget, b.budget,"
        " b.window_s FROM device_throttles b"
        " WHERE b.banned_at >= %s AND NOT EXISTS (SELECT 1 FROM alert_triggers t"
        "   WHERE t.device_id = b.device_id AND t.rule = 'device_flooding'"
        "   AND t.key = 'ban:' || b.id)"
        " ORDER BY b.id LIMIT %s",
        [since, BANS_PER_SWEEP],
    )


def unacked_alerts(conn: Conn, device_id: str) -> list[tuple[int, int]]:
    """A device's open config_unacked alerts, with the newest table version each is about."""
    return _all(
        conn,
        _ids,
        "SELECT a.id, max(substr(t.key, 2)::bigint) FROM alerts a"
        " JOIN alert_triggers t ON t.alert_id = a.id"
        " WHERE a.device_id = %s AND a.rule = 'config_unacked' AND a.state <> 'resolved'"
        " GROUP BY a.id",
        [device_id],
    )


def offline_alerts(conn: Conn, device_id: str) -> list[tuple[int, datetime]]:
    """A device's open offline alerts, with the start of each silence."""
    return _all(
        conn,
        _id_and_time,
        "SELECT id, first_seen FROM alerts WHERE device_id = %s AND rule = 'offline'"
        " AND state <> 'resolved'",
        [device_id],
    )


def _all(conn: Conn, make: Callable[..., T], query: LiteralString, params: Params) -> list[T]:
    """The rows of ``query``, each built by ``make`` from its columns in order."""
    return conn.cursor(row_factory=args_row(make)).execute(query, params).fetchall()


def _one(conn: Conn, make: Callable[..., T], query: LiteralString, params: Params) -> T:
    """The one row of ``query`` (an aggregate, an upsert's RETURNING), built by ``make``."""
    # fetchall, not fetchone: a row made of one NULL is None too.
    [row] = conn.cursor(row_factory=args_row(make)).execute(query, params).fetchall()
    return row


# Row shapes of the statements above whose rows are a value or two.
def _time(ts: datetime) -> datetime:
    return ts


def _maybe_time(ts: datetime | None) -> datetime | None:
    return ts


def _user_and_start(user_key: str, started_at: datetime | None) -> tuple[str, datetime | None]:
    return user_key, started_at


def _user_lock(brand_id: str, user_key: str) -> str:
    return f"u:{brand_id}:{user_key}"


def _ids(alert_id: int, version: int) -> tuple[int, int]:
    return alert_id, version


def _id_and_time(alert_id: int, moment: datetime) -> tuple[int, datetime]:
    return alert_id, moment
