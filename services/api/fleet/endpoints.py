"""``GET /v1/fleet/summary`` and ``GET /v1/dead-letters``."""

from typing import Annotated

from fastapi import APIRouter, Query, Response

from services.api.deps import CurrentKey, FleetReadRepo, FleetRepo, ReadKey, brand_scope, require
from services.api.fleet.schemas import DeadLetterList, FleetSummary
from services.api.pagination import KeyCursor, page
from services.api.problems import responses
from services.api.responses import json_response
from services.common.api_keys import Role
from services.common.protocol.topics import DEVICE_ID_PATTERN

router = APIRouter(prefix="/v1", tags=["fleet"])
MAX_LIMIT = 200


@router.get("/fleet/summary", response_model=FleetSummary, responses=responses(401, 403))
async def fleet_summary(fleet: FleetReadRepo, key: ReadKey) -> Response:
    """Devices online, sessions today, open alerts by severity and rule."""
    return json_response(await fleet.summary(key.brand))


@router.get("/dead-letters", response_model=DeadLetterList, responses=responses(401, 403, 404, 422))
def dead_letters(
    fleet: FleetRepo,
    key: CurrentKey,
    brand: Annotated[str | None, Query(description="operator keys: the brand to show")] = None,
    device: Annotated[
        str | None,
        Query(
            pattern=DEVICE_ID_PATTERN,
            description="only this device's letters (none for another brand's device)",
        ),
    ] = None,
    reason: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 50,
    cursor: KeyCursor = None,
) -> Response:
    """Messages that could not be stored, newest first: a brand's devices' (admin), or any
    brand's, or those of no known device (operator, without ``brand``); ``device`` narrows
    them to one device, within the brand."""
    require(key, Role.OPERATOR, Role.ADMIN)
    scope = (
        brand_scope(fleet, key, brand) if key.brand_id is not None or brand is not None else None
    )
    rows = fleet.dead_letters(
        scope, device_id=device, reason=reason, before_id=cursor, limit=limit + 1
    )
    items, next_cursor = page(rows, limit, lambda letter: str(letter.id))
    return json_response(DeadLetterList(items=items, next_cursor=next_cursor))
