"""Rollouts shared by the API (which starts and steers them) and the rules sweep (which pauses
a canary that hurts people): the table a target receives, progress, and the canary guard.

A rollout never lifts a rule's restriction: a device a rule switched to SAFE (or locked
entirely) keeps those modes locked in every table a rollout sends it, with the SAFE spec it
runs now, until support clears the device (safety.md: "the other modes are locked until
support clears the device").
"""

import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from psycopg.rows import class_row

from services.common.db import Conn
from services.common.mode_tables import DEFAULT_MODES, PROTOCOL_VERSION

# The guard (issue 6): pause when the canary's critical-alert rate is at least twice the rest
# of the fleet's, once the canary has at least this many critical alerts.
GUARD_RATE_FACTOR: Final = 2.0
GUARD_MIN_ALERTS: Final = 3
PROGRESS_STATES: Final = (
    "waiting",
    "pending",
    "offline",
    "applied",
    "rejected",
    "superseded",
    "decommissioned",
)


def canary_size(targets: int, share: float) -> int:
    """How many of ``targets`` get the table first: the share rounded up, leaving at least one."""
    return min(targets - 1, max(1, math.ceil(targets * share)))


def rollout_table(
    body: Mapping[str, Any],
    *,
    issued_at_ms: int,
    expires_at_ms: int | None,
    reason: str,
    rule_lock: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The unsigned table for one target (``version`` is set when it is recorded).

    ``rule_lock`` is the device's newest table pushed by a rule, if any: its locked modes stay
    locked, and its SAFE spec is kept so the device can still run SAFE.
    """
    modes = dict(body["modes"])
    locked = set(body.get("locked_modes", []))
    if rule_lock is not None:
        locked |= set(rule_lock.get("locked_modes", []))
        rule_modes = rule_lock.get("modes", {})
        modes["SAFE"] = rule_modes.get("SAFE", DEFAULT_MODES["SAFE"])
    return {
        "v": PROTOCOL_VERSION,
        "version": 0,
        "issued_at": issued_at_ms,
        "expires_at": expires_at_ms,
        "reason": reason,
        "locked_modes": sorted(locked),
        "modes": modes,
    }


def rule_locks(conn: Conn, device_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The newest rule-pushed table of each device a rule has restricted and support has not
    cleared since (a clearance is a push with source ``api``, see :func:`clearance_table`)."""
    rows = conn.execute(
        "SELECT DISTINCT ON (r.device_id) r.device_id, r.payload FROM config_pushes r"
        " WHERE r.source = 'rule' AND r.device_id = ANY(%s)"
        " AND NOT EXISTS (SELECT 1 FROM config_pushes c WHERE c.device_id = r.device_id"
        "                 AND c.source = 'api' AND c.version > r.version)"
        " ORDER BY r.device_id, r.version DESC",
        [list(device_ids)],
    ).fetchall()
    return {str(device_id): payload for device_id, payload in rows if isinstance(payload, dict)}


FACTORY: Final[dict[str, Any]] = {"modes": dict(DEFAULT_MODES), "locked_modes": []}


@dataclass(frozen=True)
class Restorable:
    """A table a device ran, as its brand chose it: the mode table (``None``: the factory
    table) and its body, without any rule's locks."""

    mode_table_id: str | None
    body: dict[str, Any]


def last_applied(conn: Conn, device_ids: Sequence[str]) -> dict[str, Restorable]:
    """The newest table each device applied that was not a rule's, as its brand chose it.

    Every push but a rule's names the mode table it was built from (``NULL``: the factory
    table), so the rule locks a rollout or a restoration carried are not carried further.
    Devices without one are absent: they run the factory table.
    """
    rows = conn.execute(
        "SELECT DISTINCT ON (p.device_id) p.device_id, p.mode_table_id, t.body"
        " FROM config_pushes p LEFT JOIN mode_tables t ON t.id = p.mode_table_id"
        " WHERE p.device_id = ANY(%s) AND p.source <> 'rule' AND p.answer_status = 'applied'"
        " ORDER BY p.device_id, p.version DESC",
        [list(device_ids)],
    ).fetchall()
    found = {}
    for device_id, table_id, body in rows:
        if table_id is None:
            found[str(device_id)] = Restorable(None, FACTORY)
        else:
            assert isinstance(body, dict)
            found[str(device_id)] = Restorable(str(table_id), body)
    return found


def clearance(conn: Conn, device_id: str) -> Restorable | None:
    """What clears a rule's restriction: the device's last applied table of its brand's
    choosing (or the factory table); ``None`` when no rule restriction is in force."""
    if device_id not in rule_locks(conn, [device_id]):
        return None
    return last_applied(conn, [device_id]).get(device_id, Restorable(None, FACTORY))


@dataclass(frozen=True)
class CanaryHealth:
    """Critical alerts raised since the canary started: on canary devices and on the rest of
    the brand's fleet."""

    canary_devices: int
    canary_alerts: int
    rest_devices: int
    rest_alerts: int

    @property
    def canary_rate(self) -> float:
        """Critical alerts per canary device."""
        return self.canary_alerts / self.canary_devices if self.canary_devices else 0.0

    @property
    def rest_rate(self) -> float:
        """Critical alerts per device of the rest of the fleet."""
        return self.rest_alerts / self.rest_devices if self.rest_devices else 0.0

    @property
    def alarming(self) -> bool:
        """The guard's condition: at least 3 canary alerts at twice the rest's rate or more."""
        return (
            self.canary_alerts >= GUARD_MIN_ALERTS
            and self.canary_rate >= GUARD_RATE_FACTOR * self.rest_rate
        )

    def describe(self) -> str:
        """One sentence for ``status_reason``."""
        return (
            f"canary critical-alert rate {self.canary_rate:.3f} per device "
            f"({self.canary_alerts} alerts on {self.canary_devices} devices) is at least "
            f"{GUARD_RATE_FACTOR:g} times the rest of the fleet's {self.rest_rate:.3f} "
            f"({self.rest_alerts} alerts on {self.rest_devices} devices)"
        )


# Critical alerts per group (see :func:`canary_health`). sum(bigint) is numeric: the sums
# are cast back to bigint so that they read as int.
CANARY_HEALTH: Final = """
    WITH canary AS (
        SELECT device_id FROM rollout_devices WHERE rollout_id = %(rollout)s AND canary
    ), raised AS (
        SELECT device_id, count(*) AS n FROM alerts
        WHERE brand_id = %(brand)s AND severity = 'critical' AND first_seen >= %(since)s
        GROUP BY device_id
    )
    SELECT count(*) FILTER (WHERE c.device_id IS NOT NULL) AS canary_devices,
           coalesce(sum(r.n) FILTER (WHERE c.device_id IS NOT NULL), 0)::bigint AS canary_alerts,
           count(*) FILTER (WHERE c.device_id IS NULL) AS rest_devices,
           coalesce(sum(r.n) FILTER (WHERE c.device_id IS NULL), 0)::bigint AS rest_alerts
    FROM devices d
    LEFT JOIN canary c ON c.device_id = d.id
    LEFT JOIN raised r ON r.device_id = d.id
    WHERE d.brand_id = %(brand)s AND d.decommissioned_at IS NULL"""


def canary_health(
    conn: Conn, rollout_id: uuid.UUID, brand_id: str, since: datetime
) -> CanaryHealth:
    """Critical alerts first seen since ``since``, canary devices against the brand's others."""
    with conn.cursor(row_factory=class_row(CanaryHealth)) as cur:
        params = {"rollout": rollout_id, "brand": brand_id, "since": since}
        health = cur.execute(CANARY_HEALTH, params).fetchone()
    assert health is not None  # an aggregate without GROUP BY returns one row
    return health


def guard_canaries(conn: Conn) -> list[tuple[uuid.UUID, str]]:
    """Pause every canary whose critical-alert rate trips the guard; what was paused and why.

    Run periodically (the rules sweep). Rows are locked so a concurrent promotion through the
    API either happens first (and the rollout is no longer a canary) or waits and then finds
    it paused.
    """
    rows = conn.execute(
        "SELECT id, brand_id, canary_started_at FROM rollouts"
        " WHERE status = 'canary' FOR UPDATE SKIP LOCKED"
    ).fetchall()
    paused = []
    for rollout_id, brand_id, started in rows:
        assert isinstance(rollout_id, uuid.UUID)
        assert isinstance(started, datetime)
        health = canary_health(conn, rollout_id, str(brand_id), started)
        if not health.alarming:
            continue
        reason = "auto-paused: " + health.describe()
        conn.execute(
            "UPDATE rollouts SET status = 'paused', paused_from = 'canary',"
            " status_reason = %s, updated_at = now() WHERE id = %s",
            [reason, rollout_id],
        )
        paused.append((rollout_id, reason))
    return paused
