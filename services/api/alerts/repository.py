"""Alert queries, always scoped by brand. Never commits: the request owns the transaction."""

from typing import Any, Final

from services.api.responses import jsonb_passed_through
from services.common.db import AsyncConn, Conn

COLUMNS: Final = (
    "id, device_id, rule, rule_version, severity, state, count, first_seen, last_seen,"
    " explanation, acknowledged_at, acknowledged_by, resolved_at, resolved_by, resolution"
)
NAMES: Final = tuple(name.strip() for name in COLUMNS.split(","))
MAX_CHANGES: Final = 500


def _row(values: tuple[Any, ...]) -> dict[str, Any]:
    return dict(zip(NAMES, values, strict=True))


async def list_alerts(
    conn: AsyncConn,
    brand_id: str,
    *,
    device: str | None,
    rule: str | None,
    state: str | None,
    severity: str | None,
    before_id: int | None,
    limit: int,
) -> list[dict[str, Any]]:
    """Newest first (by id), at most ``limit``, ids below ``before_id``; each explanation as
    the JSON text stored (for :func:`rows_response`)."""
    async with conn.cursor() as cursor:
        jsonb_passed_through(cursor)
        await cursor.execute(
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
        )
        return [_row(row) for row in await cursor.fetchall()]


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


def changed(
    conn: Conn, brand_id: str, *, ids: list[int] | None = None, after_seq: int | None = None
) -> list[tuple[int, dict[str, Any]]]:
    """The brand's alerts with ``ids``, or changed after ``after_seq``: (change_seq, alert),
    in change order, at most :data:`MAX_CHANGES`."""
    rows = conn.execute(
        f"SELECT change_seq, {COLUMNS} FROM alerts"  # noqa: S608 - constant column list
        " WHERE brand_id = %(brand)s"
        " AND (%(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s))"
        " AND (%(after)s::bigint IS NULL OR change_seq > %(after)s)"
        " ORDER BY change_seq LIMIT %(limit)s",
        {"brand": brand_id, "ids": ids, "after": after_seq, "limit": MAX_CHANGES},
    ).fetchall()
    return [(int(str(row[0])), _row(row[1:])) for row in rows]


def newest_change(conn: Conn, brand_id: str) -> int:
    """The brand's highest change number (0 when it has no alerts)."""
    row = conn.execute(
        "SELECT coalesce(max(change_seq), 0) FROM alerts WHERE brand_id = %s", [brand_id]
    ).fetchone()
    return int(str(row[0])) if row else 0


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
