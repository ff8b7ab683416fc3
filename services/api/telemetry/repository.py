"""Telemetry queries, on the read pool.

Bucketed reads whose width is a rollup's (``1m``: ``samples_1m``, ``1h``: ``samples_1h``)
take the buckets the maintenance job has completed from the rollup and only the rest from raw
samples: the partial bucket at ``from`` when it is not on a bucket boundary, and everything
from the last refresh (``galvani_meta.rollups_refreshed_to``, rounded down to a bucket) to
``to``. Each bucket of the answer comes whole from one side, so the numbers are those of
computing it from raw samples: the same count, min and max, and the mean as a ``real``, which
is what the rollup stores (samples are ``real`` too). A sample that arrives after a refresh
for an hour already refreshed is counted once the job has recomputed that hour (ingest marks
it), one maintenance interval later.

Widths that are multiples of a rollup's are read raw: combining rollup means needs each
bucket's count of non-null values per field, which the rollups do not keep.
"""

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from psycopg.rows import class_row, dict_row, tuple_row

from services.api.repository import ReadRepository

EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
# Rollup table by its bucket width. Hour and minute boundaries are the same whether counted
# from the Unix epoch or from time_bucket's origin (Monday 2000-01-03 00:00 UTC).
ROLLUPS: Final = {timedelta(minutes=1): "samples_1m", timedelta(hours=1): "samples_1h"}


def _floor(moment: datetime, width: timedelta) -> datetime:
    return EPOCH + ((moment - EPOCH) // width) * width


def _ceil(moment: datetime, width: timedelta) -> datetime:
    floor = _floor(moment, width)
    return floor if floor == moment else floor + width


# Fields that are not numbers, bucketed: booleans as 0/1 (``avg`` is the share of samples where
# it held), texts by their least and greatest value (no mean).
BOOLEANS: Final = frozenset({"out", "charging"})
TEXTS: Final = frozenset({"mode", "session"})


def _aggregate(field: str) -> str:
    if field in BOOLEANS:
        value = f"{field}::int"
        return f"min({value})::real, avg({value})::real, max({value})::real"
    if field in TEXTS:
        return f"min({field}), NULL::real, max({field})"
    return f"min({field})::real, avg({field})::real, max({field})::real"


def _raw_buckets(fields: list[str], lo: str, hi: str) -> str:
    """Buckets from raw samples in ``[%(lo)s, %(hi)s)``, typed as the rollup columns are."""
    aggregates = ", ".join(_aggregate(f) for f in fields)
    return (
        f"SELECT time_bucket(%(width)s, ts) AS b, count(*)::integer, {aggregates}"  # noqa: S608
        f" FROM samples WHERE device_id = %(device)s AND ts >= %({lo})s AND ts < %({hi})s"
        " GROUP BY b"
    )


@dataclass(frozen=True)
class _Rollups:
    refreshed_to: str | None  # galvani_meta holds text: an ISO 8601 time


class TelemetryReadRepository(ReadRepository):
    """Samples and rollups on the read-only unit."""

    async def owned_refreshed_to(
        self, brand_id: str, device_id: str
    ) -> tuple[bool, datetime | None]:
        """Whether the brand owns the device, and how far the rollups are complete (one
        query)."""
        row = await self.one(
            "SELECT (SELECT value FROM galvani_meta WHERE key = 'rollups_refreshed_to')"
            " AS refreshed_to FROM devices WHERE id = %s AND brand_id = %s",
            [device_id, brand_id],
            class_row(_Rollups),
        )
        if row is None:
            return False, None
        refreshed = row.refreshed_to
        return True, datetime.fromisoformat(refreshed) if refreshed is not None else None

    async def raw_samples(
        self, device_id: str, start: datetime, end: datetime, fields: list[str], limit: int
    ) -> list[dict[str, Any]]:
        """``{ts, *fields}`` of each sample in ``[start, end)``, in time order, at most
        ``limit``."""
        columns = ", ".join(fields)  # the endpoint checks every name against a fixed list
        return await self.all(
            f"SELECT ts, {columns} FROM samples"  # noqa: S608 - names checked against a list
            " WHERE device_id = %s AND ts >= %s AND ts < %s ORDER BY ts LIMIT %s",
            [device_id, start, end, limit],
            dict_row,
        )

    async def suspect_samples(
        self, device_id: str, start: datetime, end: datetime, fields: list[str], limit: int
    ) -> list[dict[str, Any]]:
        """``{received_at, ts, seq, idx, *fields}`` of each suspect-clock sample received in
        ``[start, end)``, in receipt order, at most ``limit``."""
        columns = ", ".join(fields)  # the endpoint checks every name against a fixed list
        return await self.all(
            f"SELECT received_at, ts, seq, idx, {columns} FROM suspect_samples"  # noqa: S608
            " WHERE device_id = %s AND received_at >= %s AND received_at < %s"
            " ORDER BY received_at, seq, idx LIMIT %s",
            [device_id, start, end, limit],
            dict_row,
        )

    async def buckets(
        self,
        device_id: str,
        start: datetime,
        end: datetime,
        width: timedelta,
        fields: list[str],
        refreshed_to: datetime | None,
    ) -> list[tuple[Any, ...]]:
        """``(bucket, n, min, avg, max per field...)`` per bucket with samples, in time
        order."""
        # The rollups hold the numeric fields only.
        rolled_up = not (BOOLEANS | TEXTS | {"level"}) & set(fields)
        table = ROLLUPS.get(width) if rolled_up else None
        lo = _ceil(start, width)
        cut = min(_floor(end, width), _floor(refreshed_to, width)) if refreshed_to else lo
        if table is None or cut <= lo:
            return await self.all(
                _raw_buckets(fields, "start", "end") + " ORDER BY b",
                {"width": width, "device": device_id, "start": start, "end": end},
                tuple_row,
            )
        rolled = ", ".join(f"{f}_min, {f}_avg, {f}_max" for f in fields)
        parts = [
            f"SELECT bucket, n, {rolled} FROM {table}"  # noqa: S608 - names from fixed lists
            " WHERE device_id = %(device)s AND bucket >= %(lo)s AND bucket < %(cut)s"
        ]
        params: dict[str, Any] = {"width": width, "device": device_id, "lo": lo, "cut": cut}
        if start < lo:  # the partial first bucket
            parts.append(_raw_buckets(fields, "start", "lo"))
            params["start"] = start
        if cut < end:  # what the rollups do not hold yet
            parts.append(_raw_buckets(fields, "cut", "end"))
            params["end"] = end
        return await self.all(" UNION ALL ".join(parts) + " ORDER BY 1", params, tuple_row)
