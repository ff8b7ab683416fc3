"""The alert lifecycle as support and admins drive it: open -> acknowledged -> resolved."""

from typing import Any

from services.api.alerts import repository
from services.api.problems import ProblemError
from services.common.db import Conn

MAX_LIMIT = 200


def require_alert(
    conn: Conn, brand_id: str, alert_id: int, *, for_update: bool = False
) -> dict[str, Any]:
    """The brand's alert, or a 404 that does not say whether another brand has it."""
    alert = repository.get_alert(conn, brand_id, alert_id, for_update=for_update)
    if alert is None:
        raise ProblemError(404, "not-found", "Not found", f"there is no alert {alert_id}")
    return alert


def acknowledge(conn: Conn, brand_id: str, alert_id: int, actor: str, note: str | None) -> None:
    """Acknowledge an open alert; acknowledging it again changes nothing."""
    alert = require_alert(conn, brand_id, alert_id, for_update=True)
    if alert["state"] == "acknowledged":
        return
    if alert["state"] == "resolved":
        raise ProblemError(
            409,
            "alert-resolved",
            "Alert already resolved",
            f"alert {alert_id} was resolved by {alert['resolved_by']}; it cannot be acknowledged",
        )
    repository.acknowledge(conn, alert_id, actor)
    repository.add_transition(conn, alert_id, "open", "acknowledged", actor, note)


def resolve(conn: Conn, brand_id: str, alert_id: int, actor: str, note: str | None) -> None:
    """Resolve an open or acknowledged alert."""
    alert = require_alert(conn, brand_id, alert_id, for_update=True)
    if alert["state"] == "resolved":
        raise ProblemError(
            409,
            "alert-resolved",
            "Alert already resolved",
            f"alert {alert_id} was resolved by {alert['resolved_by']}",
        )
    repository.resolve(conn, alert_id, actor, note or "resolved by support")
    repository.add_transition(conn, alert_id, alert["state"], "resolved", actor, note)
