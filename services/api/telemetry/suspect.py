"""``GET /v1/devices/{id}/telemetry/suspect``: the samples a device sent with a suspect clock.

Ingest keeps a sample whose device time is outside ``[received - 30 days, received + 5
minutes]`` apart from the others (``suspect_samples``, docs/protocol.md "Device time"): its
time cannot place it among them, in rollups or in ``GET …/telemetry``. Here they are read by
the time they were received, each with the time the device gave it, and kept for the raw
retention period after receipt. Bounded as the raw telemetry read is: more than
:data:`~services.api.telemetry.endpoints.MAX_POINTS` samples is a 422, never a silent cut.
"""

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Response
from pydantic import BaseModel, Field

from services.api.deps import ReadKey, TelemetryReadRepo
from services.api.problems import ProblemError, responses
from services.api.responses import rows_response
from services.api.telemetry.endpoints import (
    FIELDS_PATTERN,
    MAX_POINTS,
    TimeParam,
    chosen_fields,
    parse_time,
    too_many,
)

router = APIRouter(prefix="/v1/devices", tags=["telemetry"])


class SuspectTelemetry(BaseModel):
    device_id: str
    from_: datetime = Field(alias="from", description="receipt time, from (inclusive)")
    to: datetime = Field(description="receipt time, to (exclusive)")
    fields: list[str]
    points: list[dict[str, Any]] = Field(
        description="one object per sample, by receipt time: `received_at`, `ts` (the device's "
        "time as sent), `seq` and `idx` (the message and the sample's place in it) and the "
        "fields"
    )


@router.get(
    "/{device_id}/telemetry/suspect",
    response_model=SuspectTelemetry,
    response_model_by_alias=True,
    responses=responses(401, 403, 404, 422),
)
async def suspect_telemetry(
    device_id: str,
    samples: TelemetryReadRepo,
    key: ReadKey,
    from_: Annotated[str, Query(alias="from", description="receipt time"), TimeParam],
    to: Annotated[str, Query(description="receipt time"), TimeParam],
    fields: Annotated[
        str | None, Query(max_length=200, json_schema_extra={"pattern": FIELDS_PATTERN})
    ] = None,
) -> Response:
    """Samples of one device with a suspect clock, received between ``from`` and ``to`` (at
    most 10,000; a range with ``to`` at or before ``from`` has none)."""
    start, end = parse_time(from_, "from"), parse_time(to, "to")
    chosen = chosen_fields(fields)
    owned, _ = await samples.owned_refreshed_to(key.brand, device_id)
    if not owned:
        raise ProblemError(404, "not-found", "Not found", f"there is no device {device_id!r}")
    points: list[dict[str, Any]] = []
    if start < end:
        points = await samples.suspect_samples(device_id, start, end, chosen, MAX_POINTS + 1)
    if len(points) > MAX_POINTS:
        raise too_many(f"more than {MAX_POINTS} samples received between from and to: narrow it")
    return rows_response(
        {"device_id": device_id, "from": start, "to": end, "fields": chosen, "points": points}
    )
