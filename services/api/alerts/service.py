"""The alert lifecycle as support and admins drive it: open -> acknowledged -> resolved."""

from services.api.alerts.repository import AlertRepository
from services.api.alerts.schemas import Alert, AlertState
from services.api.problems import ProblemError

MAX_LIMIT = 200


def require_alert(
    alerts: AlertRepository, brand_id: str, alert_id: int, *, for_update: bool = False
) -> Alert:
    """The brand's alert, or a 404 that does not say whether another brand has it."""
    alert = alerts.get(brand_id, alert_id, for_update=for_update)
    if alert is None:
        raise ProblemError(404, "not-found", "Not found", f"there is no alert {alert_id}")
    return alert


def _resolved(detail: str) -> ProblemError:
    return ProblemError(409, "alert-resolved", "Alert already resolved", detail)


def acknowledge(
    alerts: AlertRepository, brand_id: str, alert_id: int, actor: str, note: str | None
) -> None:
    """Acknowledge an open alert; acknowledging it again changes nothing."""
    alert = require_alert(alerts, brand_id, alert_id, for_update=True)
    if alert.state is AlertState.ACKNOWLEDGED:
        return
    if alert.state is AlertState.RESOLVED:
        raise _resolved(
            f"alert {alert_id} was resolved by {alert.resolved_by}; it cannot be acknowledged",
        )
    alerts.acknowledge(alert_id, actor)
    alerts.add_transition(alert_id, AlertState.OPEN, AlertState.ACKNOWLEDGED, actor, note)


def resolve(
    alerts: AlertRepository, brand_id: str, alert_id: int, actor: str, note: str | None
) -> None:
    """Resolve an open or acknowledged alert."""
    alert = require_alert(alerts, brand_id, alert_id, for_update=True)
    if alert.state is AlertState.RESOLVED:
        raise _resolved(f"alert {alert_id} was resolved by {alert.resolved_by}")
    alerts.resolve(alert_id, actor, note or "resolved by support")
    alerts.add_transition(alert_id, alert.state, AlertState.RESOLVED, actor, note)
