"""``GET /v1/devices/{id}/telemetry``: raw samples, or min/avg/max per time bucket.

Responses are bounded: a request that would return more than :data:`MAX_POINTS` points is
answered 422 with what to change (a shorter range, or a bucket), never truncated silently.
"""

import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Final

from fastapi import APIRouter, Query, Response
from pydantic import BaseModel, Field

from services.api.deps import ReadKey, TelemetryReadRepo
from services.api.problems import ProblemError, responses
from services.api.responses import rows_response

router = APIRouter(prefix="/v1/devices", tags=["telemetry"])

MAX_POINTS: Final = 10_000
METRICS: Final = ("i_ua", "i_set_ua", "v_v", "z_ohm", "t_elec_c", "t_batt_c", "batt_pct")
RAW_EXTRA: Final = ("out", "mode", "level", "charging", "session")
BUCKET_RE: Final = re.compile(r"^([1-9][0-9]{0,5})(s|m|h|d)$")
UNIT_S: Final = {"s": 1, "m": 60, "h": 3600, "d": 86_400}


class Telemetry(BaseModel):
    device_id: str
    from_: datetime = Field(alias="from")
    to: datetime
    bucket: str | None = Field(description="null: raw samples")
    fields: list[str]
    points: list[dict[str, Any]] = Field(
        description="raw: one object per sample with `ts` and the fields; bucketed: `ts` (the "
        "bucket's start), `n` (samples) and `{min, avg, max}` per field"
    )


def parse_time(value: str, name: str) -> datetime:
    """RFC 3339, or epoch milliseconds."""
    if value.isdigit():
        return datetime.fromtimestamp(int(value) / 1000, tz=UTC)
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ProblemError(
            422,
            "invalid-request",
            "Invalid request",
            f"{name}: give an RFC 3339 time or epoch milliseconds",
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def parse_bucket(value: str) -> timedelta:
    match = BUCKET_RE.match(value)
    if match is None:
        raise ProblemError(
            422,
            "invalid-request",
            "Invalid request",
            "bucket: a width such as 10s, 1m, 15m, 1h or 1d",
        )
    return timedelta(seconds=int(match.group(1)) * UNIT_S[match.group(2)])


def too_many(detail: str) -> ProblemError:
    return ProblemError(422, "too-many-points", "Too many points", detail)


@router.get(
    "/{device_id}/telemetry",
    response_model=Telemetry,
    response_model_by_alias=True,
    responses=responses(401, 403, 404, 422),
)
async def telemetry(
    device_id: str,
    samples: TelemetryReadRepo,
    key: ReadKey,
    from_: Annotated[str, Query(alias="from", max_length=40)],
    to: Annotated[str, Query(max_length=40)],
    bucket: Annotated[str | None, Query(max_length=10)] = None,
    fields: Annotated[str | None, Query(max_length=200)] = None,
) -> Response:
    """Samples of one device between ``from`` and ``to`` (at most 10,000 points)."""
    start, end = parse_time(from_, "from"), parse_time(to, "to")
    if end <= start:
        raise ProblemError(422, "invalid-request", "Invalid request", "to: must be after from")
    allowed = METRICS if bucket else METRICS + RAW_EXTRA
    chosen = [f.strip() for f in fields.split(",")] if fields else list(METRICS)
    unknown = [f for f in chosen if f not in allowed]
    if unknown or not chosen:
        raise ProblemError(
            422,
            "invalid-request",
            "Invalid request",
            f"fields: {', '.join(unknown) or 'none'} not available; choose from "
            + ", ".join(allowed),
        )
    owned, refreshed_to = await samples.owned_refreshed_to(key.brand, device_id)
    if not owned:
        raise ProblemError(404, "not-found", "Not found", f"there is no device {device_id!r}")
    if bucket is None:
        points = await samples.raw_samples(device_id, start, end, chosen, MAX_POINTS + 1)
        if len(points) > MAX_POINTS:
            raise too_many(
                f"more than {MAX_POINTS} samples between from and to: narrow the range or "
                "ask for a bucket (e.g. bucket=1m)"
            )
    else:
        width = parse_bucket(bucket)
        count = (end - start) / width
        if count > MAX_POINTS:
            smallest = (end - start).total_seconds() / MAX_POINTS
            raise too_many(
                f"{int(count)} buckets of {bucket} between from and to: use a bucket of at "
                f"least {smallest:.0f} s or a shorter range"
            )
        rows = await samples.buckets(device_id, start, end, width, chosen, refreshed_to)
        points = []
        for row in rows:
            point: dict[str, Any] = {"ts": row[0], "n": row[1]}
            for i, name in enumerate(chosen):
                low, mean, high = row[2 + 3 * i : 5 + 3 * i]
                point[name] = {"min": low, "avg": mean, "max": high}
            points.append(point)
    # Up to 10,000 points: encoded straight from the rows (the schema tests hold the shape).
    return rows_response(
        {
            "device_id": device_id,
            "from": start,
            "to": end,
            "bucket": bucket,
            "fields": chosen,
            "points": points,
        }
    )
