"""Conflict queries on the read pool. A brand reaches conflicts through its devices."""

from typing import Any, Final

from services.common.db import AsyncConn

NAMES: Final = ("id", "reason", "channel", "seq", "ts", "received_at", "detail", "payload")


async def owns(conn: AsyncConn, brand_id: str, device_id: str) -> bool:
    """Whether the brand has the device (another brand's device is not found either)."""
    cursor = await conn.execute(
        "SELECT 1 FROM devices WHERE id = %s AND brand_id = %s", [device_id, brand_id]
    )
    return await cursor.fetchone() is not None


async def conflicts(
    conn: AsyncConn, device_id: str, *, reason: str | None, before_id: int | None, limit: int
) -> list[dict[str, Any]]:
    """A device's conflicts, newest first (by id), ids below ``before_id``, at most ``limit``."""
    cursor = await conn.execute(
        "SELECT id, reason, channel, seq, ts, received_at, detail, payload"
        " FROM message_conflicts WHERE device_id = %(device)s"
        " AND (%(reason)s::text IS NULL OR reason = %(reason)s)"
        " AND (%(before)s::bigint IS NULL OR id < %(before)s)"
        " ORDER BY id DESC LIMIT %(limit)s",
        {"device": device_id, "reason": reason, "before": before_id, "limit": limit},
    )
    return [dict(zip(NAMES, row, strict=True)) for row in await cursor.fetchall()]
