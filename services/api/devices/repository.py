"""Device queries, always scoped by brand. Never commits: the request owns the transaction.

The reads run on the read pool (async); :func:`exists` serves the endpoints that write.
"""

from typing import Any, Final

from services.common.db import AsyncConn, Conn

SELECT: Final = """
SELECT d.id AS device_id, d.brand_id AS brand, d.model, d.user_id AS user, d.online,
       d.last_seen, d.fw, d.last_seq, d.seq_gaps, d.config_desired_version,
       d.config_reported_version,
       (SELECT count(*) FROM alerts a
         WHERE a.device_id = d.id AND a.state <> 'resolved')::integer AS open_alerts,
       d.provisioned_at, d.decommissioned_at, d.seq_reused, d.seq_reused_at, d.seq_resets,
       d.seq_reset_at
FROM devices d
"""
NAMES: Final = (
    "device_id",
    "brand",
    "model",
    "user",
    "online",
    "last_seen",
    "fw",
    "last_seq",
    "seq_gaps",
    "config_desired_version",
    "config_reported_version",
    "open_alerts",
    "provisioned_at",
    "decommissioned_at",
    "seq_reused",
    "seq_reused_at",
    "seq_resets",
    "seq_reset_at",
)


def exists(conn: Conn, brand_id: str, device_id: str) -> bool:
    """Whether the brand has the device (decommissioned or not)."""
    row = conn.execute(
        "SELECT 1 FROM devices WHERE id = %s AND brand_id = %s", [device_id, brand_id]
    ).fetchone()
    return row is not None


async def get_device(conn: AsyncConn, brand_id: str, device_id: str) -> dict[str, Any] | None:
    """The brand's device, or None (another brand's device is None too)."""
    cursor = await conn.execute(
        SELECT + " WHERE d.id = %s AND d.brand_id = %s", [device_id, brand_id]
    )
    row = await cursor.fetchone()
    return dict(zip(NAMES, row, strict=True)) if row is not None else None


async def list_devices(
    conn: AsyncConn,
    brand_id: str,
    *,
    online: bool | None,
    alerting: bool | None,
    fw: str | None,
    model: str | None,
    after_id: str | None,
    limit: int,
) -> list[dict[str, Any]]:
    """The brand's active devices in id order, after ``after_id``."""
    cursor = await conn.execute(
        SELECT  # noqa: S608 - constant text, every value is a parameter
        + """
        WHERE d.brand_id = %(brand)s AND d.decommissioned_at IS NULL
          AND (%(online)s::boolean IS NULL OR d.online = %(online)s)
          AND (%(fw)s::text IS NULL OR d.fw = %(fw)s)
          AND (%(model)s::text IS NULL OR d.model = %(model)s)
          AND (%(after)s::text IS NULL OR d.id > %(after)s)
          AND (%(alerting)s::boolean IS NULL OR %(alerting)s = EXISTS (
                SELECT 1 FROM alerts a WHERE a.device_id = d.id AND a.state <> 'resolved'))
        ORDER BY d.id LIMIT %(limit)s
        """,
        {
            "brand": brand_id,
            "online": online,
            "fw": fw,
            "model": model,
            "after": after_id,
            "alerting": alerting,
            "limit": limit,
        },
    )
    return [dict(zip(NAMES, row, strict=True)) for row in await cursor.fetchall()]


async def sessions(
    conn: AsyncConn, device_id: str, *, before: tuple[str, str] | None, limit: int
) -> list[dict[str, Any]]:
    """A device's sessions, newest start first (keyset: started_at, session)."""
    cursor = await conn.execute(
        "SELECT session, user_id, mode, level, started_at, ended_at, duration_s, end_reason,"
        " output_s, samples,"
        " CASE WHEN out_samples > 0 THEN gel_ok_samples::real / out_samples END"
        " FROM sessions WHERE device_id = %(device)s"
        " AND (%(ts)s::timestamptz IS NULL OR (coalesce(started_at, '-infinity'), session)"
        "      < (%(ts)s::timestamptz, %(session)s))"
        " ORDER BY coalesce(started_at, '-infinity') DESC, session DESC LIMIT %(limit)s",
        {
            "device": device_id,
            "ts": before[0] if before else None,
            "session": before[1] if before else None,
            "limit": limit,
        },
    )
    names = (
        "session",
        "user",
        "mode",
        "level",
        "started_at",
        "ended_at",
        "duration_s",
        "end_reason",
        "output_s",
        "samples",
        "gel_ok_share",
    )
    return [dict(zip(names, row, strict=True)) for row in await cursor.fetchall()]


async def events(
    conn: AsyncConn, device_id: str, *, before_seq: int | None, type_: str | None, limit: int
) -> list[dict[str, Any]]:
    """A device's events, newest seq first."""
    cursor = await conn.execute(
        "SELECT seq, ts, type, session, body, received_at, ts_suspect FROM events"
        " WHERE device_id = %(device)s AND (%(type)s::text IS NULL OR type = %(type)s)"
        " AND (%(before)s::bigint IS NULL OR seq < %(before)s)"
        " ORDER BY seq DESC LIMIT %(limit)s",
        {"device": device_id, "type": type_, "before": before_seq, "limit": limit},
    )
    names = ("seq", "ts", "type", "session", "body", "received_at", "ts_suspect")
    return [dict(zip(names, row, strict=True)) for row in await cursor.fetchall()]
