"""Fleet-wide reads: the brand's summary (read-only unit) and dead letters (read-write unit)."""

from dataclasses import dataclass
from typing import Final

from psycopg.rows import class_row

from services.api.fleet.schemas import PAYLOAD_PREVIEW_BYTES, DeadLetter, FleetSummary, OpenAlerts
from services.api.repository import ReadRepository, Repository

# One statement, one round trip. Each count reads an index of migration 0006 or 0001
# (devices_brand_active_idx, sessions_brand_started_idx, alerts_one_open_idx).
SUMMARY: Final = """
SELECT
    d.devices,
    d.online,
    (SELECT count(*) FROM sessions
      WHERE brand_id = %(brand)s
        AND started_at >= date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC')
        AS sessions_today,
    ARRAY(SELECT ARRAY[severity, rule, count(*)::text] FROM alerts
           WHERE brand_id = %(brand)s AND state <> 'resolved' GROUP BY severity, rule)
        AS open_alerts
FROM (SELECT count(*) AS devices, count(*) FILTER (WHERE online) AS online FROM devices
       WHERE brand_id = %(brand)s AND decommissioned_at IS NULL) d
"""
# PostgreSQL's base64 breaks lines every 76 characters; the API's has no line breaks.
DEAD_LETTERS: Final = """
SELECT l.id, l.topic, l.device_id, l.channel, l.reason, l.detail, l.payload_size,
       translate(encode(substring(l.payload FROM 1 FOR %(preview)s), 'base64'), E'\\n', '')
           AS payload_preview_b64,
       l.received_at
FROM dead_letters l LEFT JOIN devices d ON d.id = l.device_id
WHERE (%(brand)s::text IS NULL OR d.brand_id = %(brand)s)
  AND (%(device)s::text IS NULL OR l.device_id = %(device)s)
  AND (%(reason)s::text IS NULL OR l.reason = %(reason)s)
  AND (%(before)s::bigint IS NULL OR l.id < %(before)s)
ORDER BY l.id DESC LIMIT %(limit)s
"""


@dataclass(frozen=True)
class SummaryRow:
    """The summary's counts; ``open_alerts`` as ``[severity, rule, count]`` per group."""

    devices: int
    online: int
    sessions_today: int
    open_alerts: list[list[str]]


class FleetReadRepository(ReadRepository):
    """The fleet summary on the read-only unit."""

    async def summary(self, brand_id: str) -> FleetSummary:
        """Active and online devices, sessions started today (UTC), open alerts by severity
        and rule."""
        row = await self.one(SUMMARY, {"brand": brand_id}, class_row(SummaryRow))
        assert row is not None  # an aggregate of scalar subqueries always returns a row
        by_severity: dict[str, int] = {"info": 0, "warning": 0, "critical": 0}
        by_rule: dict[str, int] = {}
        for severity, rule, count in row.open_alerts:
            by_severity[severity] += int(count)
            by_rule[rule] = by_rule.get(rule, 0) + int(count)
        return FleetSummary(
            devices=row.devices,
            online=row.online,
            sessions_today=row.sessions_today,
            open_alerts=OpenAlerts(
                total=sum(by_severity.values()), by_severity=by_severity, by_rule=by_rule
            ),
        )


class FleetRepository(Repository):
    """Dead letters on the read-write unit."""

    def dead_letters(
        self,
        brand_id: str | None,
        *,
        device_id: str | None,
        reason: str | None,
        before_id: int | None,
        limit: int,
    ) -> list[DeadLetter]:
        """Messages that could not be stored, newest first: of the brand's devices, or any
        (``brand_id`` None); of one device if ``device_id`` is given (within the brand, so
        another brand's device has none, as an unknown one)."""
        params = {
            "preview": PAYLOAD_PREVIEW_BYTES,
            "brand": brand_id,
            "device": device_id,
            "reason": reason,
            "before": before_id,
            "limit": limit,
        }
        return self.all(DEAD_LETTERS, params, class_row(DeadLetter))
