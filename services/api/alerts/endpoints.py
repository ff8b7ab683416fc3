"""``/v1/alerts``: list and filter, details with the explanation, acknowledge, resolve."""

from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Body, Query, Response

from services.api.alerts import service
from services.api.alerts.repository import AlertRepository
from services.api.alerts.schemas import AlertAction, AlertDetail, AlertList, AlertState, Severity
from services.api.deps import AlertReadRepo, AlertRepo, ApiKey, CurrentKey, ReadKey, require
from services.api.pagination import AlertId, KeyCursor, page
from services.api.problems import responses
from services.api.responses import json_response, rows_response
from services.common.api_keys import Role

router = APIRouter(prefix="/v1/alerts", tags=["alerts"])
ActionBody = Annotated[AlertAction | None, Body()]
# (alerts, brand, alert id, actor, note): a step of the lifecycle in alerts/service.py.
Step = Callable[[AlertRepository, str, int, str, str | None], None]


@router.get("", response_model=AlertList, responses=responses(401, 403, 422))
async def list_alerts(
    alerts: AlertReadRepo,
    key: ReadKey,
    device: Annotated[str | None, Query(max_length=64)] = None,
    rule: Annotated[str | None, Query(max_length=64)] = None,
    state: AlertState | None = None,
    severity: Severity | None = None,
    limit: Annotated[int, Query(ge=1, le=service.MAX_LIMIT)] = 50,
    cursor: KeyCursor = None,
) -> Response:
    """The brand's alerts, newest first."""
    rows = await alerts.page(
        key.brand,
        device=device,
        rule=rule,
        state=state.value if state else None,
        severity=severity.value if severity else None,
        before_id=cursor,
        limit=limit + 1,
    )
    items, next_cursor = page(rows, limit, lambda row: str(row["id"]))
    # The rows are the Alert model's columns as stored (the schema tests hold them to it).
    return rows_response({"items": items, "next_cursor": next_cursor})


@router.get("/{alert_id}", response_model=AlertDetail, responses=responses(401, 403, 404))
def get_alert(alert_id: AlertId, alerts: AlertRepo, key: CurrentKey) -> Response:
    """One alert with its explanation and every transition (who and when)."""
    alert = service.require_alert(alerts, key.brand, alert_id)
    transitions = alerts.transitions(alert_id)
    return json_response(AlertDetail.model_validate({**dict(alert), "transitions": transitions}))


def _take(
    step: Step, alert_id: int, alerts: AlertRepository, key: ApiKey, action: AlertAction | None
) -> Response:
    require(key, Role.ADMIN, Role.SUPPORT)
    step(alerts, key.brand, alert_id, key.actor, action.note if action else None)
    return get_alert(alert_id, alerts, key)


@router.post("/{alert_id}/ack", response_model=AlertDetail, responses=responses(401, 403, 404, 409))
def acknowledge(
    alert_id: AlertId, alerts: AlertRepo, key: CurrentKey, action: ActionBody = None
) -> Response:
    """Acknowledge: a person is on it."""
    return _take(service.acknowledge, alert_id, alerts, key, action)


@router.post(
    "/{alert_id}/resolve", response_model=AlertDetail, responses=responses(401, 403, 404, 409)
)
def resolve(
    alert_id: AlertId, alerts: AlertRepo, key: CurrentKey, action: ActionBody = None
) -> Response:
    """Resolve: the matter is closed (a repeat opens a new alert)."""
    return _take(service.resolve, alert_id, alerts, key, action)
