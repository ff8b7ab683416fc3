"""``GET /v1/devices/{id}/conflicts``: messages ingest kept aside, with the reason.

Ingest stores each message once by ``(device_id, seq)`` and each sample once by
``(device_id, ts)``. A second payload under a stored seq (a device whose counter restarted)
or a sample at a stored time with other readings cannot take the key; it is kept here whole
instead of being dropped (services/ingest/redelivery.py and conflicts.py).
"""

import base64
import json
from typing import Annotated, Any

from fastapi import APIRouter, Query, Response

from services.api.conflicts.schemas import Conflict, ConflictList, ConflictReason
from services.api.deps import ConflictReadRepo, ReadKey
from services.api.pagination import KeyCursor, page
from services.api.problems import ProblemError, responses
from services.api.responses import json_response

router = APIRouter(prefix="/v1/devices", tags=["devices"])
# A payload may be 64 KiB: a page of 100 is at most 6.4 MiB.
MAX_LIMIT = 100


@router.get(
    "/{device_id}/conflicts", response_model=ConflictList, responses=responses(401, 403, 404, 422)
)
async def list_conflicts(
    device_id: str,
    conflicts: ConflictReadRepo,
    key: ReadKey,
    reason: ConflictReason | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 50,
    cursor: KeyCursor = None,
) -> Response:
    """Conflicting messages of the device, newest first, each with its payload."""
    if not await conflicts.owns_device(key.brand, device_id):
        raise ProblemError(404, "not-found", "Not found", f"there is no device {device_id!r}")
    rows = await conflicts.page(
        device_id, reason=reason.value if reason else None, before_id=cursor, limit=limit + 1
    )
    kept, next_cursor = page(rows, limit, lambda row: str(row["id"]))
    return json_response(
        ConflictList(items=[_conflict(row) for row in kept], next_cursor=next_cursor)
    )


def _conflict(row: dict[str, Any]) -> Conflict:
    raw = row.pop("payload")
    assert isinstance(raw, bytes)  # bytea
    try:
        payload, payload_b64 = json.loads(raw), None
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        payload, payload_b64 = None, base64.b64encode(raw).decode()
    return Conflict.model_validate(
        {**row, "payload": payload, "payload_b64": payload_b64, "payload_size": len(raw)}
    )
