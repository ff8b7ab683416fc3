"""``/v1/alerts``: list and filter, details with the explanation, acknowledge, resolve."""

from typing import Annotated

from fastapi import APIRouter, Body, Query, Response

from services.api.alerts import repository, service
from services.api.alerts.schemas import (
    AlertAction,
    AlertDetail,
    AlertList,
    AlertState,
    Severity,
    Transition,
)
from services.api.deps import ConnDep, CurrentKey, ReadConnDep, ReadKey, require
from services.api.pagination import decode_int_cursor, encode_cursor
from services.api.problems import responses
from services.api.responses import json_response, rows_response
from services.common.api_keys import Role

router = APIRouter(prefix="/v1/alerts", tags=["alerts"])


@router.get("", response_model=AlertList, responses=responses(401, 403, 422))
async def list_alerts(
    conn: ReadConnDep,
    key: ReadKey,
    device: Annotated[str | None, Query(max_length=64)] = None,
    rule: Annotated[str | None, Query(max_length=64)] = None,
    state: AlertState | None = None,
    severity: Severity | None = None,
    limit: Annotated[int, Query(ge=1, le=service.MAX_LIMIT)] = 50,
    cursor: Annotated[str | None, Query(max_length=100)] = None,
) -> Response:
    """The brand's alerts, newest first."""
    rows = await repository.list_alerts(
        conn,
        key.brand,
        device=device,
        rule=rule,
        state=state.value if state else None,
        severity=severity.value if severity else None,
        before_id=decode_int_cursor("a", cursor) if cursor else None,
        limit=limit + 1,
    )
    more = len(rows) > limit
    rows = rows[:limit]
    # The rows are the Alert model's columns as stored (the schema tests hold them to it).
    return rows_response(
        {"items": rows, "next_cursor": encode_cursor("a", str(rows[-1]["id"])) if more else None}
    )


@router.get("/{alert_id}", response_model=AlertDetail, responses=responses(401, 403, 404))
def get_alert(alert_id: int, conn: ConnDep, key: CurrentKey) -> Response:
    """One alert with its explanation and every transition (who and when)."""
    alert = service.require_alert(conn, key.brand, alert_id)
    return json_response(
        AlertDetail.model_validate(
            {
                **alert,
                "transitions": [
                    Transition.model_validate(t) for t in repository.transitions(conn, alert_id)
                ],
            }
        )
    )


@router.post("/{alert_id}/ack", response_model=AlertDetail, responses=responses(401, 403, 404, 409))
def acknowledge(
    alert_id: int,
    conn: ConnDep,
    key: CurrentKey,
    action: Annotated[AlertAction | None, Body()] = None,
) -> Response:
    """Acknowledge: a person is on it."""
    require(key, Role.ADMIN, Role.SUPPORT)
    service.acknowledge(conn, key.brand, alert_id, key.actor, action.note if action else None)
    return get_alert(alert_id, conn, key)


@router.post(
    "/{alert_id}/resolve", response_model=AlertDetail, responses=responses(401, 403, 404, 409)
)
def resolve(
    alert_id: int,
    conn: ConnDep,
    key: CurrentKey,
    action: Annotated[AlertAction | None, Body()] = None,
) -> Response:
    """Resolve: the matter is closed (a repeat opens a new alert)."""
    require(key, Role.ADMIN, Role.SUPPORT)
    service.resolve(conn, key.brand, alert_id, key.actor, action.note if action else None)
    return get_alert(alert_id, conn, key)
