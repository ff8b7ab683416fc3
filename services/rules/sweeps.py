"""Periodic checks: rules about something *not* happening, and housekeeping.

``offline`` and ``config_unacked`` fire on the absence of messages, so no message can trigger
them; a worker runs :func:`sweep` every ``sweep_interval_s`` in a transaction of its own.
``device_flooding`` is raised there too, from the bans ingest records in ``device_throttles``
(a ban is ingest's doing, not a message's), and ``certificate_expiring`` from the device
certificates the API issued (``device_certificates``), resolved once a newer one is issued.
They use the backend's clock (receipt times), not device time: silence has no device time.
The same sweep pauses canary rollouts whose canary's critical-alert rate trips the guard
(``services/common/rollouts.py``), trims the rules' own state and finds pushes that were
recorded but never published (the process died between commit and publish, or the API could
not reach the broker).
"""

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from psycopg.rows import args_row

from services.common.db import Conn
from services.common.rollouts import guard_canaries
from services.rules import metrics
from services.rules.alerts import Outcome, apply_finding, resolve
from services.rules.catalogue import BY_ID
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
# Certificates are looked at from this long before their expiry (the longest lead time a
# brand may set) until this long after it (a certificate that expired while the rules were
# down is still raised, as expired).
CERTIFICATE_LOOKAHEAD: Final = timedelta(
    days=BY_ID["certificate_expiring"].param("days_before").tightest
)
CERTIFICATE_LOOKBACK: Final = timedelta(days=7)
# The most expiring certificates one sweep raises (the rest wait for the next sweep).
CERTIFICATES_PER_SWEEP: Final = 1000
# Each certificate device's newest unrevoked certificate, for the devices with one expiring in
# the window, that no certificate_expiring occurrence has counted yet.
EXPIRING: Final = """
SELECT n.device_id, n.serial, n.not_after
FROM (SELECT DISTINCT ON (c.device_id) c.device_id, c.serial, c.not_after
      FROM device_certificates c
      WHERE c.revoked_at IS NULL AND c.device_id IN (
          SELECT e.device_id FROM device_certificates e
          WHERE e.revoked_at IS NULL AND e.not_after >= %(since)s AND e.not_after < %(until)s)
      ORDER BY c.device_id, c.not_after DESC) n
JOIN devices d ON d.id = n.device_id AND d.decommissioned_at IS NULL
WHERE n.not_after >= %(since)s AND n.not_after < %(until)s
  AND NOT EXISTS (SELECT 1 FROM alert_triggers t
                  WHERE t.device_id = n.device_id AND t.rule = 'certificate_expiring'
                    AND t.key = 'cert:' || n.serial::text)
ORDER BY n.not_after LIMIT %(limit)s
"""
# Open certificate_expiring alerts, with whether the device is decommissioned and when its
# newest unrevoked certificate expires.
EXPIRY_ALERTS: Final = """
SELECT a.id, a.device_id, d.decommissioned_at IS NOT NULL,
       (SELECT max(c.not_after) FROM device_certificates c
         WHERE c.device_id = a.device_id AND c.revoked_at IS NULL)
FROM alerts a JOIN devices d ON d.id = a.device_id
WHERE a.rule = 'certificate_expiring' AND a.state <> 'resolved'
"""


def sweep(conn: Conn, key: Ed25519PrivateKey, now: datetime | None = None) -> Outcome:
    """Run the periodic rules in the caller's transaction."""
    now = now or datetime.now(UTC)
    outcome = Outcome()
    _offline(conn, key, now, outcome)
    _unacked(conn, key, now, outcome)
    _flooding(conn, key, now, outcome)
    _certificates(conn, key, now, outcome)
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


def _certificates(conn: Conn, key: Ed25519PrivateKey, now: datetime, outcome: Outcome) -> None:
    # A newer certificate resolves the alert; each certificate is raised once (by its serial).
    open_alerts = conn.cursor(row_factory=args_row(_expiry_alert)).execute(EXPIRY_ALERTS).fetchall()
    contexts = load_contexts(conn, sorted({row[1] for row in open_alerts if not row[2]}))
    for alert_id, device_id, decommissioned, newest in open_alerts:
        context = contexts.get(device_id)
        if decommissioned:
            reason = "the device was decommissioned"
        elif context is not None and newest and checks.certificate_renewed(context, newest, now):
            reason = f"a certificate valid until {newest.isoformat()} was issued"
        else:
            continue
        if resolve(conn, alert_id, reason):
            outcome.resolved += 1
    params = {
        "since": now - CERTIFICATE_LOOKBACK,
        "until": now + CERTIFICATE_LOOKAHEAD,
        "limit": CERTIFICATES_PER_SWEEP,
    }
    rows = conn.cursor(row_factory=args_row(_certificate)).execute(EXPIRING, params).fetchall()
    contexts = load_contexts(conn, sorted({row.device_id for row in rows}))
    for certificate in rows:
        context = contexts.get(certificate.device_id)
        if context is None:
            continue
        finding = checks.certificate_expiring(context, certificate, now)
        if finding is not None:
            apply_finding(conn, key, context, finding, outcome)


# Row shapes of the statements above (psycopg builds each row with them).
def _certificate(device_id: str, serial: Decimal, not_after: datetime) -> checks.CertificateRow:
    return checks.CertificateRow(device_id, int(serial), not_after)


def _expiry_alert(
    alert_id: int, device_id: str, decommissioned: bool, newest: datetime | None
) -> tuple[int, str, bool, datetime | None]:
    return alert_id, device_id, decommissioned, newest


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
