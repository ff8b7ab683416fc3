"""Raising, counting and resolving alerts; taking a rule's action. In the caller's transaction.

An occurrence of a rule is a :class:`Finding`. It counts once: a keyed finding (a session,
an event's seq, a pushed version) is unique in ``alert_triggers``; a finding over a run of
samples merges with any stored occurrence whose interval it touches. Only a new occurrence
raises the alert: the partial unique index ``alerts_one_open_idx`` makes the upsert open one
alert per (device, rule) however many workers race, and a repeat raises ``count`` and
``last_seen``.
"""

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from psycopg.rows import args_row, class_row
from psycopg.types.json import Jsonb

from services.common.config_push import Push, PushError, record_push
from services.common.db import Conn
from services.common.mode_tables import ALL_MODES, restricted_table
from services.rules import explain, metrics
from services.rules.catalogue import BY_ID, SEVERITY_RANK, Action, Severity
from services.rules.conditions import MAX_GAP
from services.rules.context import DeviceContext, user_devices
from services.rules.timeutil import from_ms

log = logging.getLogger(__name__)

ACTOR: Final = "galvani-rules"
SAFE_LOCKS: Final = frozenset(mode for mode in ALL_MODES if mode != "SAFE")
ALL_LOCKS: Final = frozenset(ALL_MODES)


@dataclass(frozen=True)
class Finding:
    """One occurrence of a rule on a device, with everything its explanation needs; its
    severity and action are the catalogue's (the rule's minor grade if ``minor``)."""

    rule: str
    device_id: str
    started_at: datetime
    ended_at: datetime
    threshold: Mapping[str, Any]
    observed: Mapping[str, Any]
    text: str
    variant: str = ""
    key: str | None = None
    session: str | None = None
    user_key: str | None = None
    minor: bool = False

    @property
    def severity(self) -> Severity:
        """The catalogue's severity for this occurrence."""
        return BY_ID[self.rule].grade(self.minor).severity

    @property
    def action(self) -> Action:
        """The catalogue's action for this occurrence."""
        return BY_ID[self.rule].grade(self.minor).action


def event_finding(
    device_id: str,
    ts_ms: int,
    rule: str,
    key: str,
    threshold: Mapping[str, Any],
    observed: Mapping[str, Any],
    text: str,
    **more: Any,
) -> Finding:
    """An occurrence at one moment of device time (an event's ``ts``), keyed by the event;
    ``more`` sets the finding's other fields (variant, minor, session, user_key)."""
    ts = from_ms(ts_ms)
    return Finding(rule, device_id, ts, ts, threshold, observed, text, key=key, **more)


@dataclass
class Outcome:
    """What a transaction did, reported (and counted in metrics) once it has committed."""

    raised: list[tuple[int, str, str]] = field(default_factory=list)  # alert id, rule, severity
    pushes: list[Push] = field(default_factory=list)
    push_kinds: list[tuple[str, str]] = field(default_factory=list)  # rule, safe | lock_all
    resolved: int = 0
    failed: list[Any] = field(default_factory=list)  # messages that could not be evaluated
    paused_rollouts: list[tuple[Any, str]] = field(default_factory=list)  # rollout id, reason

    def extend(self, other: "Outcome") -> None:
        """Add what another transaction did."""
        self.raised.extend(other.raised)
        self.pushes.extend(other.pushes)
        self.push_kinds.extend(other.push_kinds)
        self.resolved += other.resolved
        self.failed.extend(other.failed)
        self.paused_rollouts.extend(other.paused_rollouts)

    def count(self) -> None:
        """Record in the metrics (call after the commit, so a retried batch counts once)."""
        for _, rule, severity in self.raised:
            metrics.ALERTS.labels(rule, severity).inc()
        for rule, kind in self.push_kinds:
            metrics.PUSHES.labels(rule, kind).inc()
        if self.resolved:
            metrics.RESOLVED.labels("auto").inc(self.resolved)
        for rollout_id, reason in self.paused_rollouts:
            metrics.ROLLOUTS_PAUSED.inc()
            log.warning("rollout %s %s", rollout_id, reason)


def apply_finding(
    conn: Conn, key: Ed25519PrivateKey, context: DeviceContext, finding: Finding, outcome: Outcome
) -> None:
    """Count ``finding`` once: raise its alert and take its action if it is new."""
    claimed: int | None = None
    if finding.key is not None:
        # Claim the key first: of two workers (or a replay) only one gets the row.
        claimed = (
            conn.cursor(row_factory=args_row(_int))
            .execute(
                "INSERT INTO alert_triggers (device_id, rule, variant, key, started_at, ended_at,"
                " observed) VALUES (%s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (device_id, rule, key) WHERE key IS NOT NULL DO NOTHING RETURNING id",
                [
                    finding.device_id,
                    finding.rule,
                    finding.variant,
                    finding.key,
                    finding.started_at,
                    finding.ended_at,
                    Jsonb({**finding.observed, "session": finding.session}),
                ],
            )
            .fetchone()
        )
        if claimed is None:
            return
    elif _merge_run(conn, finding):
        return
    action_text, pushes = _act(conn, key, context, finding)
    explanation = explain.explanation(
        finding.rule,
        finding.variant,
        finding.threshold,
        finding.observed,
        (finding.started_at, finding.ended_at),
        finding.session,
        finding.text,
        action_text,
    )
    row = (
        conn.cursor(row_factory=args_row(_upserted))
        .execute(
            """
        INSERT INTO alerts AS a (brand_id, device_id, rule, rule_version, severity,
                                 first_seen, last_seen, explanation)
        VALUES (%(brand)s, %(device)s, %(rule)s, %(version)s, %(severity)s,
                %(start)s, %(end)s, %(explanation)s)
        ON CONFLICT (device_id, rule) WHERE state <> 'resolved' DO UPDATE SET
            count = a.count + 1,
            first_seen = least(a.first_seen, EXCLUDED.first_seen),
            last_seen = greatest(a.last_seen, EXCLUDED.last_seen),
            severity = CASE WHEN array_position(%(ranks)s, EXCLUDED.severity)
                                 > array_position(%(ranks)s, a.severity)
                            THEN EXCLUDED.severity ELSE a.severity END,
            -- The explanation of the most severe, then the latest, occurrence in event time.
            explanation = CASE
                WHEN (array_position(%(ranks)s, EXCLUDED.severity), EXCLUDED.last_seen)
                     >= (array_position(%(ranks)s, a.severity), a.last_seen)
                THEN EXCLUDED.explanation ELSE a.explanation END,
            updated_at = now()
        RETURNING id, xmax = 0
        """,
            {
                "brand": context.brand_id,
                "device": finding.device_id,
                "rule": finding.rule,
                "version": BY_ID[finding.rule].version,
                "severity": finding.severity.value,
                "start": finding.started_at,
                "end": finding.ended_at,
                "explanation": Jsonb(explanation),
                "ranks": list(SEVERITY_RANK),
            },
        )
        .fetchone()
    )
    assert row is not None
    alert_id, created = row
    if created:
        conn.execute(
            "INSERT INTO alert_transitions (alert_id, from_state, to_state, actor, note)"
            " VALUES (%s, NULL, 'open', %s, %s)",
            [alert_id, ACTOR, explanation["text"]],
        )
    if claimed is not None:
        conn.execute("UPDATE alert_triggers SET alert_id = %s WHERE id = %s", [alert_id, claimed])
    else:
        conn.execute(
            "INSERT INTO alert_triggers (alert_id, device_id, rule, variant, key, started_at,"
            " ended_at, observed) VALUES (%s, %s, %s, %s, NULL, %s, %s, %s)",
            [
                alert_id,
                finding.device_id,
                finding.rule,
                finding.variant,
                finding.started_at,
                finding.ended_at,
                Jsonb({**finding.observed, "session": finding.session}),
            ],
        )
    outcome.raised.append((alert_id, finding.rule, finding.severity.value))
    outcome.pushes.extend(pushes)
    kind = "lock_all" if finding.action is not Action.PUSH_SAFE else "safe"
    outcome.push_kinds.extend((finding.rule, kind) for _ in pushes)


def _merge_run(conn: Conn, finding: Finding) -> bool:
    """Fold a run into a stored occurrence it touches; True if there was one."""
    rows = (
        conn.cursor(row_factory=class_row(_Trigger))
        .execute(
            "SELECT id, alert_id, started_at, ended_at FROM alert_triggers"
            " WHERE device_id = %s AND rule = %s AND variant = %s AND key IS NULL"
            " AND started_at <= %s AND ended_at >= %s ORDER BY id",
            [
                finding.device_id,
                finding.rule,
                finding.variant,
                finding.ended_at + MAX_GAP,
                finding.started_at - MAX_GAP,
            ],
        )
        .fetchall()
    )
    if not rows:
        return False
    keep, alert_id = rows[0].id, rows[0].alert_id
    start = min([finding.started_at, *(row.started_at for row in rows)])
    end = max([finding.ended_at, *(row.ended_at for row in rows)])
    conn.execute(
        "UPDATE alert_triggers SET started_at = %s, ended_at = %s WHERE id = %s",
        [start, end, keep],
    )
    # Two partial runs counted before the samples joining them arrived are one occurrence.
    merged = [row.id for row in rows[1:] if row.alert_id == alert_id]
    if merged:
        conn.execute("DELETE FROM alert_triggers WHERE id = ANY(%s)", [merged])
        conn.execute(
            "UPDATE alerts SET count = greatest(1, count - %s), updated_at = now() WHERE id = %s",
            [len(merged), alert_id],
        )
    conn.execute(
        "UPDATE alerts SET last_seen = greatest(last_seen, %s),"
        " first_seen = least(first_seen, %s) WHERE id = %s",
        [end, start, alert_id],
    )
    return True


def _act(
    conn: Conn, key: Ed25519PrivateKey, context: DeviceContext, finding: Finding
) -> tuple[str, list[Push]]:
    """Take the finding's action; return the sentence that says what was done, and pushes."""
    action = finding.action
    if action is Action.ALERT:
        return "no action was taken on the device", []
    if action is Action.PUSH_SAFE:
        return _restrict(conn, key, context, finding, lock_all=False)
    if action is Action.LOCK_DEVICE:
        return _restrict(conn, key, context, finding, lock_all=True)
    # The user's registered devices and the one in use (it may be registered to someone else);
    # in id order, so workers lock device rows in one order.
    devices = sorted(
        {*user_devices(conn, context.brand_id, finding.user_key or ""), finding.device_id}
    )
    pushes: list[Push] = []
    for device_id in devices:
        _, pushed = _restrict_device(conn, key, device_id, finding, lock_all=True)
        pushes.extend(pushed)
    if not pushes:
        return f"all modes were already locked on the user's {len(devices)} device(s)", []
    return (
        f"all modes have been locked on {len(pushes)} of the user's {len(devices)} device(s)",
        pushes,
    )


def _restrict(
    conn: Conn, key: Ed25519PrivateKey, context: DeviceContext, finding: Finding, *, lock_all: bool
) -> tuple[str, list[Push]]:
    return _restrict_device(conn, key, context.device_id, finding, lock_all=lock_all)


def _restrict_device(
    conn: Conn, key: Ed25519PrivateKey, device_id: str, finding: Finding, *, lock_all: bool
) -> tuple[str, list[Push]]:
    wanted = ALL_LOCKS if lock_all else SAFE_LOCKS
    row = conn.execute(
        "SELECT d.config_desired_version, desired.payload, applied.payload,"
        " desired.answer_status"
        " FROM devices d"
        " LEFT JOIN config_pushes desired"
        "   ON desired.device_id = d.id AND desired.version = d.config_desired_version"
        " LEFT JOIN config_pushes applied"
        "   ON applied.device_id = d.id AND applied.version = d.config_reported_version"
        "  AND d.config_reported_status = 'applied'"
        " WHERE d.id = %s",
        [device_id],
    ).fetchone()
    if row is None:
        return "the device is not registered, so nothing was pushed", []
    desired_version, desired, applied, answer = row
    if answer == "rejected":
        desired = None  # the device refused it: what it runs is the applied table
    locked = (
        frozenset(desired.get("locked_modes", [])) if isinstance(desired, dict) else frozenset()
    )
    what = "all modes have been locked" if lock_all else "it has been switched to safe mode"
    if wanted <= locked:
        already = "all modes were already locked" if lock_all else "it was already in safe mode"
        return f"{already} (mode table v{desired_version})", []
    base = desired if isinstance(desired, dict) else applied if isinstance(applied, dict) else None
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    table = restricted_table(
        base, version=0, issued_at_ms=now_ms, reason=f"{finding.rule}", lock_all=lock_all
    )
    table.pop("sig", None)
    if table.get("expires_at") is None:
        table.pop("expires_at", None)
    try:
        push = record_push(
            conn, key, device_id=device_id, table=table, source="rule", source_ref=finding.rule
        )
    except PushError as exc:
        log.exception("cannot push a restricted table to %s", device_id)
        return f"the restricted table could not be pushed ({exc})", []
    return f"{what} (mode table v{push.version})", [push]


def resolve(conn: Conn, alert_id: int, resolution: str) -> bool:
    """Resolve an unresolved alert because its condition cleared; False if it was not open."""
    row = conn.execute(
        "WITH old AS (SELECT id, state FROM alerts WHERE id = %s AND state <> 'resolved'"
        "             FOR UPDATE)"
        " UPDATE alerts a SET state = 'resolved', resolved_at = now(), resolved_by = %s,"
        " resolution = %s, updated_at = now() FROM old WHERE a.id = old.id RETURNING old.state",
        [alert_id, ACTOR, resolution],
    ).fetchone()
    if row is None:
        return False
    conn.execute(
        "INSERT INTO alert_transitions (alert_id, from_state, to_state, actor, note)"
        " VALUES (%s, %s, 'resolved', %s, %s)",
        [alert_id, row[0], ACTOR, resolution],
    )
    return True


def open_alerts(conn: Conn, device_id: str, rule: str) -> list[tuple[int, datetime]]:
    """Unresolved alerts of ``rule`` on a device, with the end of their latest occurrence."""
    return (
        conn.cursor(row_factory=args_row(_id_and_time))
        .execute(
            "SELECT a.id, max(t.ended_at) FROM alerts a"
            " JOIN alert_triggers t ON t.alert_id = a.id"
            " WHERE a.device_id = %s AND a.rule = %s AND a.state <> 'resolved' GROUP BY a.id",
            [device_id, rule],
        )
        .fetchall()
    )


# Row shapes of the statements above: psycopg builds each row with these, so the columns are
# typed where they are read.
def _int(value: int) -> int:
    return value


def _upserted(alert_id: int, created: bool) -> tuple[int, bool]:
    return alert_id, created


def _id_and_time(alert_id: int, moment: datetime) -> tuple[int, datetime]:
    return alert_id, moment


@dataclass(frozen=True)
class _Trigger:
    id: int
    alert_id: int | None
    started_at: datetime
    ended_at: datetime
