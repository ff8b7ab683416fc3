"""``GET /v1/devices/{id}/telemetry``: raw samples, or min/avg/max per time bucket.

Responses are bounded: a request that would return more than :data:`MAX_POINTS` points is
answered 422 with what to change (a shorter range, or a bucket), never truncated silently.

``from`` and ``to`` are epoch milliseconds up to the end of year 9999 (a larger number is a
422, as the OpenAPI document's ``maximum`` says) or RFC 3339 times with an offset. A range
with ``to`` at or before ``from`` holds no samples: its answer has no points (a generated
client cannot know the order is wrong, as JSON schema cannot compare two parameters). Device
times lie between the epoch and ``DEVICE_TIME_MAX``, so a range is cut to those bounds before
it is read, and a far time with an offset (year 1 at +23:59) never leaves Python's range.
"""

import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Final

from fastapi import APIRouter, Query, Response
from pydantic import BaseModel, Field, WithJsonSchema

from services.api.deps import ReadKey, TelemetryReadRepo
from services.api.problems import ProblemError, responses
from services.api.responses import rows_response
from services.common.protocol.limits import DEVICE_TIME_MAX

router = APIRouter(prefix="/v1/devices", tags=["telemetry"])

MAX_POINTS: Final = 10_000
METRICS: Final = ("i_ua", "i_set_ua", "v_v", "z_ohm", "t_elec_c", "t_batt_c", "batt_pct")
RAW_EXTRA: Final = ("out", "mode", "level", "charging", "session")
BUCKET_PATTERN: Final = r"^([1-9][0-9]{0,5})(s|m|h|d)$"
BUCKET_RE: Final = re.compile(BUCKET_PATTERN)
UNIT_S: Final = {"s": 1, "m": 60, "h": 3600, "d": 86_400}
EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
# The last millisecond of year 9999: Python's datetime ends there.
MAX_MS: Final = 253_402_300_799_999
RFC3339_RE: Final = re.compile(
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2})$"
)
TIME_SCHEMA: Final = {
    "anyOf": [
        {"type": "integer", "minimum": 0, "maximum": MAX_MS},
        {"type": "string", "format": "date-time"},
    ],
    "description": "epoch milliseconds, or an RFC 3339 time with an offset",
}
TimeParam = WithJsonSchema(TIME_SCHEMA)


def _fields_pattern(names: tuple[str, ...]) -> str:
    one = "(" + "|".join(names) + ")"
    return f"^{one}(,{one})*$"


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


def _invalid_time(name: str) -> ProblemError:
    return ProblemError(
        422,
        "invalid-request",
        "Invalid request",
        f"{name}: give an RFC 3339 time with an offset, or epoch milliseconds from 0 to {MAX_MS}",
    )


def parse_time(value: str, name: str) -> datetime:
    """RFC 3339 with an offset, or epoch milliseconds (0 to :data:`MAX_MS`), in UTC and
    within the times a device can report (the epoch to ``DEVICE_TIME_MAX``)."""
    if value.isascii() and value.isdigit():
        ms = int(value)
        if ms > MAX_MS:
            raise _invalid_time(name)
        moment = EPOCH + timedelta(milliseconds=ms)
    elif RFC3339_RE.match(value) is not None:
        try:
            moment = datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
        except ValueError:  # a month 13, a 25th hour: not a time
            raise _invalid_time(name) from None
        try:
            moment = moment.astimezone(UTC)
        except OverflowError:  # year 1 at +23:59, year 9999 at -23:59: far outside anyway
            moment = EPOCH if moment.year == 1 else DEVICE_TIME_MAX
    else:
        raise _invalid_time(name)
    return min(max(moment, EPOCH), DEVICE_TIME_MAX)


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


FIELDS_PATTERN: Final = _fields_pattern(METRICS + RAW_EXTRA)


def chosen_fields(fields: str | None) -> list[str]:
    """The sample fields a ``fields`` parameter names (the metrics when it names none), or a
    422 naming those a sample does not have."""
    allowed = METRICS + RAW_EXTRA
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
    return chosen


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
    from_: Annotated[str, Query(alias="from"), TimeParam],
    to: Annotated[str, Query(), TimeParam],
    bucket: Annotated[
        str | None,
        Query(pattern=BUCKET_PATTERN, description="a width: 10s, 1m, 15m, 1h, 1d; none: raw"),
    ] = None,
    fields: Annotated[
        str | None,
        Query(
            max_length=200,
            # Checked below, to name the fields that are not available.
            json_schema_extra={"pattern": FIELDS_PATTERN},
            description="comma-separated; bucketed, `out` and `charging` count as 0/1 (`avg` "
            "is the share of samples where they held) and `mode` and `session` give their "
            "least and greatest value (`avg` null)",
        ),
    ] = None,
) -> Response:
    """Samples of one device between ``from`` and ``to`` (at most 10,000 points; a range
    with ``to`` at or before ``from`` has none). Refused (422) when the range holds more than
    10,000 samples or buckets."""
    start, end = parse_time(from_, "from"), parse_time(to, "to")
    chosen = chosen_fields(fields)
    owned, refreshed_to = await samples.owned_refreshed_to(key.brand, device_id)
    if not owned:
        raise ProblemError(404, "not-found", "Not found", f"there is no device {device_id!r}")
    if end <= start:
        points: list[dict[str, Any]] = []
    elif bucket is None:
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
