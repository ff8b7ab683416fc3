"""``GET /v1/fleet/summary`` and ``GET /v1/dead-letters``."""

import base64
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query, Response
from pydantic import BaseModel, Field

from services.api.deps import ConnDep, CurrentKey, ReadConnDep, ReadKey, brand_scope, require
from services.api.fleet import repository
from services.api.pagination import decode_int_cursor, encode_cursor
from services.api.problems import responses
from services.api.responses import json_response
from services.common.api_keys import Role

router = APIRouter(prefix="/v1", tags=["fleet"])
MAX_LIMIT = 200
PAYLOAD_PREVIEW_BYTES = 512


class OpenAlerts(BaseModel):
    total: int
    by_severity: dict[str, int]
    by_rule: dict[str, int]


class FleetSummary(BaseModel):
    devices: int
    online: int
    sessions_today: int = Field(description="sessions started since 00:00 UTC")
    open_alerts: OpenAlerts


@router.get("/fleet/summary", response_model=FleetSummary, responses=responses(401, 403))
async def fleet_summary(conn: ReadConnDep, key: ReadKey) -> Response:
    """Devices online, sessions today, open alerts by severity and rule."""
    return json_response(FleetSummary.model_validate(await repository.summary(conn, key.brand)))


class DeadLetter(BaseModel):
    id: int
    topic: str
    device_id: str | None
    channel: str | None
    reason: str
    detail: str
    payload_size: int
    payload_preview_b64: str = Field(
        description=f"the first {PAYLOAD_PREVIEW_BYTES} bytes as stored, base64"
    )
    received_at: datetime


class DeadLetterList(BaseModel):
    items: list[DeadLetter]
    next_cursor: str | None


@router.get("/dead-letters", response_model=DeadLetterList, responses=responses(401, 403, 404, 422))
def dead_letters(
    conn: ConnDep,
    key: CurrentKey,
    brand: Annotated[str | None, Query(description="operator keys: the brand to show")] = None,
    reason: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 50,
    cursor: Annotated[str | None, Query(max_length=100)] = None,
) -> Response:
    """Messages that could not be stored, newest first: a brand's devices' (admin), or any
    brand's, or those of no known device (operator, without ``brand``)."""
    require(key, Role.OPERATOR, Role.ADMIN)
    scope = brand_scope(conn, key, brand) if key.brand_id is not None or brand is not None else None
    before = decode_int_cursor("l", cursor) if cursor else None
    rows = conn.execute(
        "SELECT l.id, l.topic, l.device_id, l.channel, l.reason, l.detail, l.payload_size,"
        " substring(l.payload FROM 1 FOR %(preview)s), l.received_at"
        " FROM dead_letters l LEFT JOIN devices d ON d.id = l.device_id"
        " WHERE (%(brand)s::text IS NULL OR d.brand_id = %(brand)s)"
        " AND (%(reason)s::text IS NULL OR l.reason = %(reason)s)"
        " AND (%(before)s::bigint IS NULL OR l.id < %(before)s)"
        " ORDER BY l.id DESC LIMIT %(limit)s",
        {
            "preview": PAYLOAD_PREVIEW_BYTES,
            "brand": scope,
            "reason": reason,
            "before": before,
            "limit": limit + 1,
        },
    ).fetchall()
    more = len(rows) > limit
    rows = rows[:limit]
    items = [
        DeadLetter(
            id=int(str(r[0])),
            topic=str(r[1]),
            device_id=r[2],
            channel=r[3],
            reason=str(r[4]),
            detail=str(r[5]),
            payload_size=int(str(r[6])),
            payload_preview_b64=base64.b64encode(_bytes(r[7])).decode(),
            received_at=r[8],
        )
        for r in rows
    ]
    next_cursor = encode_cursor("l", str(items[-1].id)) if more else None
    return json_response(DeadLetterList(items=items, next_cursor=next_cursor))


def _bytes(value: object) -> bytes:
    assert isinstance(value, bytes | memoryview)  # bytea
    return bytes(value)
