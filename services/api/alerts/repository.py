"""Alert queries, always scoped by brand. Never commits: the request owns the transaction."""

from typing import Any, Final

from services.common.db import Conn

COLUMNS: Final = (
    "id, device_id, rule, rule_version, severity, state, count, first_seen, last_seen,"
    " explanation, acknowledged_at, acknowledged_by, resolved_at, resolved_by, resolution"
)
NAMES: Final = tuple(name.strip() for name in COLUMNS.split(","))


def _row(values: tuple[Any, ...]) -> dict[str, Any]:
    return dict(zip(NAMES, values, strict=True))


def list_alerts(
    conn: Conn,
    brand_id: str,
    *,
    device: str | None,
    rule: str | None,
    state: str | None,
    severity: str | None,
    before_id: int | None,
    limit: int,
) -> list[dict[str, Any]]:
    """Newest first (by id), at most ``limit``, ids below ``before_id``."""
    rows = conn.execute(
        f"SELECT {COLUMNS} FROM alerts"  # noqa: S608 - constant column list
        " WHERE brand_id = %(brand)s"
        " AND (%(device)s::text IS NULL OR device_id = %(device)s)"
        " AND (%(rule)s::text IS NULL OR rule = %(rule)s)"
        " AND (%(state)s::text IS NULL OR state = %(state)s)"
        " AND (%(severity)s::text IS NULL OR severity = %(severity)s)"
        " AND (%(before)s::bigint IS NULL OR id < %(before)s)"
        " ORDER BY id DESC LIMIT %(limit)s",
        {
            "brand": brand_id,
            "device": device,
            "rule": rule,
            "state": state,
            "severity": severity,
            "before": before_id,
            "limit": limit,
        },
    ).fetchall()
    return [_row(row) for row in rows]


def get_alert(
    conn: Conn, brand_id: str, alert_id: int, *, for_update: bool = False
) -> dict[str, Any] | None:
    """One alert of the brand, or None (another brand's alert is None too)."""
    lock = " FOR UPDATE" if for_update else ""
    row = conn.execute(
        f"SELECT {COLUMNS} FROM alerts WHERE id = %s AND brand_id = %s{lock}",  # noqa: S608
        [alert_id, brand_id],
    ).fetchone()
    return _row(row) if row is not None else None


def transitions(conn: Conn, alert_id: int) -> list[dict[str, Any]]:
    rows = conn.execute(
        "SELECT from_state, to_state, actor, at, note FROM alert_transitions"
        " WHERE alert_id = %s ORDER BY at, id",
        [alert_id],
    ).fetchall()
    return [
        dict(zip(("from_state", "to_state", "actor", "at", "note"), r, strict=True)) for r in rows
    ]


def acknowledge(conn: Conn, alert_id: int, actor: str) -> None:
    conn.execute(
        "UPDATE alerts SET state = 'acknowledged', acknowledged_at = now(),"
        " acknowledged_by = %s, updated_at = now() WHERE id = %s",
        [actor, alert_id],
    )


def resolve(conn: Conn, alert_id: int, actor: str, resolution: str) -> None:
    conn.execute(
        "UPDATE alerts SET state = 'resolved', resolved_at = now(), resolved_by = %s,"
        " resolution = %s, updated_at = now() WHERE id = %s",
        [actor, resolution, alert_id],
    )


def add_transition(
    conn: Conn, alert_id: int, from_state: str, to_state: str, actor: str, note: str | None
) -> None:
    conn.execute(
        "INSERT INTO alert_transitions (alert_id, from_state, to_state, actor, note)"
        " VALUES (%s, %s, %s, %s, %s)",
        [alert_id, from_state, to_state, actor, note],
    )
