"""Fleet queries, always scoped by brand, on the read pool."""

from typing import Any

from services.common.db import AsyncConn

# One statement, one round trip. Each count reads an index of migration 0006 or 0001
# (devices_brand_active_idx, sessions_brand_started_idx, alerts_one_open_idx).
SUMMARY = """
SELECT
    d.devices,
    d.online,
    (SELECT count(*) FROM sessions
      WHERE brand_id = %(brand)s
        AND started_at >= date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'),
    ARRAY(SELECT ARRAY[severity, rule, count(*)::text] FROM alerts
           WHERE brand_id = %(brand)s AND state <> 'resolved' GROUP BY severity, rule)
FROM (SELECT count(*) AS devices, count(*) FILTER (WHERE online) AS online FROM devices
       WHERE brand_id = %(brand)s AND decommissioned_at IS NULL) d
"""


async def summary(conn: AsyncConn, brand_id: str) -> dict[str, Any]:
    """Active and online devices, sessions started today (UTC), open alerts by severity and
    rule."""
    cursor = await conn.execute(SUMMARY, {"brand": brand_id})
    row = await cursor.fetchone()
    assert row is not None  # an aggregate of scalar subqueries always returns a row
    devices, online, sessions_today, alerts = row
    by_severity: dict[str, int] = {"info": 0, "warning": 0, "critical": 0}
    by_rule: dict[str, int] = {}
    for severity, rule, count in alerts:  # type: ignore[attr-defined]
        by_severity[severity] += int(count)
        by_rule[rule] = by_rule.get(rule, 0) + int(count)
    return {
        "devices": devices,
        "online": online,
        "sessions_today": sessions_today,
        "open_alerts": {
            "total": sum(by_severity.values()),
            "by_severity": by_severity,
            "by_rule": by_rule,
        },
    }
