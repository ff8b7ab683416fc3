"""Periodic checks: rules about something *not* happening, and housekeeping.

``offline`` and ``config_unacked`` fire on the absence of messages, so no message can trigger
them; a worker runs :func:`sweep` every ``sweep_interval_s`` in a transaction of its own.
``device_flooding`` is raised there too, from the bans ingest records in ``device_throttles``
(a ban is ingest's doing, not a message's).
They use the backend's clock (receipt times), not device time: silence has no device time.
The same sweep pauses canary rollouts whose canary's critical-alert rate trips the guard
(``services/common/rollouts.py``), trims the rules' own state and finds pushes that were
recorded but never published (the process died between commit and publish, or the API could
not reach the broker).
"""

from datetime import UTC, datetime, timedelta
from typing import Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from psycopg.rows import args_row

from services.common.db import Conn
from services.common.rollouts import guard_canaries
from services.rules import metrics
from services.rules.alerts import Outcome, apply_finding
from services.rules.context import load_contexts
from services.rules.engine import checks, store

# Late messages are accepted for an hour; samples are kept twice that (by receipt).
SAMPLES_KEPT: Final = timedelta(hours=2)
# The longest window is 7 days; a day more for sessions that arrive late.
SESSIONS_KEPT: Final = timedelta(days=8)
REBOOTS_KEPT: Final = timedelta(days=1)
TRIM_BATCH: Final = 10_000
# Bans of flooding devices older than this are not raised (the rules were down for a day).
BANS_LOOKBACK: Final = timedelta(days=1)


def sweep(conn: Conn, key: Ed25519PrivateKey, now: datetime | None = None) -> Outcome:
    """Run the periodic rules in the caller's transaction."""
    now = now or datetime.now(UTC)
    outcome = Outcome()
    _offline(conn, key, now, outcome)
    _unacked(conn, key, now, outcome)
    _flooding(conn, key, now, outcome)
    outcome.paused_rollouts.extend(guard_canaries(conn))
    metrics.SWEEPS.inc()
    return outcome


def _offline(conn: Conn, key: Ed25519PrivateKey, now: datetime, outcome: Outcome) -> None:
    # Thresholds are per brand (and can only be tightened), so every silent device with a
    # session on record is a candidate, judged with its brand's values.
    rows = (
        conn.cursor(row_factory=args_row(_silence))
        .execute(
            "SELECT d.id, greatest(d.presence_at, d.last_seen) AS silent_since,"
            " (SELECT max(s.started_at) FROM rule_sessions s WHERE s.device_id = d.id)"
            " FROM devices d"
            " WHERE NOT d.online AND d.decommissioned_at IS NULL"
            " AND greatest(d.presence_at, d.last_seen) IS NOT NULL",
        )
        .fetchall()
    )
    candidates = [row for row in rows if row[2] is not None]
    contexts = load_contexts(conn, [c[0] for c in candidates])
    for device_id, silent_since, last_session in candidates:
        context = contexts.get(device_id)
        if context is None or last_session is None:
            continue
        finding = checks.offline(context, silent_since, last_session, now)
        if finding is not None:
            apply_finding(conn, key, context, finding, outcome)


def _unacked(conn: Conn, key: Ed25519PrivateKey, now: datetime, outcome: Outcome) -> None:
    # Only each device's newest push can still be answered; online time is summed from the
    # presence log since the push was published.
    rows = (
        conn.cursor(row_factory=args_row(_unanswered))
        .execute(
            """
        SELECT p.device_id, p.version, p.published_at,
            (SELECT coalesce(sum(extract(epoch FROM
                        least(coalesce(x.next_at, %(now)s), %(now)s)
                        - greatest(x.at, p.published_at))), 0)
             FROM (SELECT l.received_at AS at, l.online,
                          lead(l.received_at) OVER (ORDER BY l.received_at, l.id) AS next_at
                   FROM presence_log l WHERE l.device_id = p.device_id) x
             WHERE x.online AND coalesce(x.next_at, %(now)s) > p.published_at)::float8
                AS online_s
        FROM config_pushes p JOIN devices d ON d.id = p.device_id
        WHERE p.published_at IS NOT NULL AND p.answer_status IS NULL
          AND d.decommissioned_at IS NULL
          AND p.version = (SELECT max(q.version) FROM config_pushes q
                           WHERE q.device_id = p.device_id)
          AND (d.config_reported_version IS NULL OR d.config_reported_version < p.version)
        """,
            {"now": now},
        )
        .fetchall()
    )
    contexts = load_contexts(conn, [row[0] for row in rows])
    for device_id, version, published_at, online_s in rows:
        context = contexts.get(device_id)
        if context is None:
            continue
        finding = checks.config_unacked(context, version, published_at, online_s, now)
        if finding is not None:
            apply_finding(conn, key, context, finding, outcome)


def _flooding(conn: Conn, key: Ed25519PrivateKey, now: datetime, outcome: Outcome) -> None:
    # Ingest records each ban of a flooding device; each counts once (keyed by the ban).
    bans = store.unraised_bans(conn, now - BANS_LOOKBACK)
    contexts = load_contexts(conn, sorted({ban.device_id for ban in bans}))
    for ban in bans:
        context = contexts.get(ban.device_id)
        if context is not None:
            apply_finding(conn, key, context, checks.device_flooding(context, ban), outcome)


# Row shapes of the statements above (psycopg builds each row with them).
def _silence(
    device_id: str, silent_since: datetime, last_session: datetime | None
) -> tuple[str, datetime, datetime | None]:
    return device_id, silent_since, last_session


def _unanswered(
    device_id: str, version: int, published_at: datetime, online_s: float
) -> tuple[str, int, datetime, float]:
    return device_id, version, published_at, online_s


def trim(conn: Conn, now: datetime | None = None) -> int:
    """Delete up to TRIM_BATCH expired rows of each rules table (call until it returns less
    than TRIM_BATCH, each call in a short transaction of its own)."""
    now = now or datetime.now(UTC)
    trimmed = 0
    for sql, cutoff in (
        (
            "DELETE FROM rule_samples WHERE ctid = ANY(ARRAY(SELECT ctid FROM rule_samples"
            " WHERE received_at < %s LIMIT %s))",
            now - SAMPLES_KEPT,
        ),
        (
            "DELETE FROM rule_sessions WHERE ctid = ANY(ARRAY(SELECT ctid FROM rule_sessions"
            " WHERE coalesce(started_at, ended_at) < %s LIMIT %s))",
            now - SESSIONS_KEPT,
        ),
        (
            "DELETE FROM rule_reboots WHERE ctid = ANY(ARRAY(SELECT ctid FROM rule_reboots"
            " WHERE ts < %s LIMIT %s))",
            now - REBOOTS_KEPT,
        ),
    ):
        trimmed = max(trimmed, conn.execute(sql, [cutoff, TRIM_BATCH]).rowcount)
    return trimmed
