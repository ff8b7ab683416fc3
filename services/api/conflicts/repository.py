"""A device's conflicting messages, on the read-only unit. A brand reaches them through its
devices (``owns_device``)."""

from typing import Any, Final

from psycopg.rows import dict_row

from services.api.repository import ReadRepository

CONFLICTS: Final = """
SELECT id, reason, channel, seq, ts, received_at, detail, payload
FROM message_conflicts WHERE device_id = %(device)s
  AND (%(reason)s::text IS NULL OR reason = %(reason)s)
  AND (%(before)s::bigint IS NULL OR id < %(before)s)
ORDER BY id DESC LIMIT %(limit)s
"""


class ConflictReadRepository(ReadRepository):
    """Conflicts on the read-only unit."""

    async def page(
        self, device_id: str, *, reason: str | None, before_id: int | None, limit: int
    ) -> list[dict[str, Any]]:
        """A device's conflicts, newest first (by id), ids below ``before_id``, at most
        ``limit``; each ``payload`` as the bytes stored."""
        params = {"device": device_id, "reason": reason, "before": before_id, "limit": limit}
        return await self.all(CONFLICTS, params, dict_row)
