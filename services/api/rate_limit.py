"""Rate limits shared by every API process, kept in PostgreSQL (migration 0011).

* **Per key**: a token bucket per API key in ``rate_limit_buckets``: ``burst`` requests at
  once, ``rate_per_s`` a second after that, counted across every API process. A process
  leases tokens in one UPSERT, :data:`LEASE_SHARE` of the burst at a time (at least one), and
  spends them locally for at most :data:`LEASE_TTL_S`; tokens it has not spent by then are
  dropped, never returned. So a key costs one statement per lease, not per request, and the
  fleet-wide limit is never exceeded: it errs on the strict side by at most one lease per
  process.
* **Failures**: fixed windows in ``rate_limit_windows``, counted by one UPSERT per failure:
  failed authentications per source address and per presented key prefix, and provisioning
  conflicts per key. The address's window is read by the key lookup every request already
  makes (``services/api/auth.py``), so checking it costs no extra round trip.

The leases and the failures use this module's own small pool of writable autocommit
connections: the read-only unit's connection refuses writes, and the read-write unit's
transaction rolls back when the request fails (which is exactly when a failure is counted).
A failure that cannot be counted (the pool busy, the database down) answers 429: failing
callers are refused rather than counted for free.
"""

import math
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Final

import psycopg
from psycopg.rows import args_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from services.common.db import AsyncConn

LEASE_SHARE: Final = 0.1  # of a key's burst, leased at a time
LEASE_TTL_S: Final = 1.0
POOL_SIZE: Final = 4
POOL_TIMEOUT_S: Final = 2.0
CLEANUP_INTERVAL_S: Final = 60.0
IDLE_BUCKET_S: Final = 3600.0  # an idle bucket is full again long before this
UNCOUNTED_RETRY_S: Final = 1.0

# Take up to %(want)s whole tokens from the key's bucket after refilling it for the time since
# its last update; a new bucket starts full. last_granted is how many were taken.
LEASE: Final = """
INSERT INTO rate_limit_buckets AS b (bucket, tokens, updated_at, last_granted)
VALUES (%(bucket)s, %(burst)s - least(%(want)s, %(burst)s), now(),
    least(%(want)s, %(burst)s)::integer)
ON CONFLICT (bucket) DO UPDATE SET
    tokens = least(%(burst)s, b.tokens
        + extract(epoch FROM now() - b.updated_at)::float8 * %(rate)s)
        - least(%(want)s, floor(least(%(burst)s, b.tokens
        + extract(epoch FROM now() - b.updated_at)::float8 * %(rate)s))),
    last_granted = least(%(want)s, floor(least(%(burst)s, b.tokens
        + extract(epoch FROM now() - b.updated_at)::float8 * %(rate)s)))::integer,
    updated_at = now()
RETURNING last_granted, tokens
"""

# Count a failure in each bucket: a new window when the last one has ended.
COUNT_FAILURE: Final = """
INSERT INTO rate_limit_windows AS w (bucket, window_start, failures)
SELECT bucket, now(), 1 FROM unnest(%(buckets)s::text[]) AS bucket
ON CONFLICT (bucket) DO UPDATE SET
    failures = CASE WHEN w.window_start > now() - make_interval(secs => %(window_s)s)
        THEN w.failures + 1 ELSE 1 END,
    window_start = CASE WHEN w.window_start > now() - make_interval(secs => %(window_s)s)
        THEN w.window_start ELSE now() END
RETURNING failures,
    extract(epoch FROM w.window_start + make_interval(secs => %(window_s)s) - now())::float8
"""


@dataclass(frozen=True)
class FailureLimit:
    """At most ``failures`` in a window of ``window_s`` seconds; beyond, 429 until it ends."""

    failures: int
    window_s: float


@dataclass
class _Lease:
    tokens: int
    expires: float


def address_bucket(host: str) -> str:
    """The failure bucket of a source address."""
    return f"addr:{host}"


def prefix_bucket(presented: str) -> str:
    """The failure bucket of a presented key: its first characters, as ``api_keys.key_prefix``
    stores them (never the whole secret)."""
    return f"prefix:{presented[:10]}"


def conflict_bucket(key_id: uuid.UUID) -> str:
    """The bucket of a key's provisioning conflicts."""
    return f"conflict:{key_id}"


class SharedLimits:
    """The API process's side of the shared limits: its pool, and the keys' local leases."""

    def __init__(self, database_url: str, *, rate_per_s: float, burst: int) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.lease_size = max(1, math.floor(burst * LEASE_SHARE))
        self._leases: dict[uuid.UUID, _Lease] = {}
        self._lock = threading.Lock()  # sync endpoints take tokens from the thread pool
        self._cleaned = time.monotonic()
        self._longest_window_s = 0.0
        self.pool: AsyncConnectionPool[AsyncConn] = AsyncConnectionPool(
            database_url,
            min_size=1,
            max_size=POOL_SIZE,
            open=False,
            timeout=POOL_TIMEOUT_S,
            name="api-rate-limits",
            kwargs={"autocommit": True, "options": "-c TimeZone=UTC"},
        )

    async def open(self) -> None:
        """Open the pool without waiting: a database that is down fails requests, not the start."""
        await self.pool.open(wait=False)

    async def close(self) -> None:
        """Close the pool."""
        await self.pool.close()

    def take_local(self, key_id: uuid.UUID) -> bool:
        """Spend a token of the key's current lease, if it has one."""
        now = time.monotonic()
        with self._lock:
            lease = self._leases.get(key_id)
            if lease is None or lease.tokens < 1 or lease.expires <= now:
                return False
            lease.tokens -= 1
            return True

    async def take(self, key_id: uuid.UUID) -> float:
        """Spend one of the key's tokens: 0 if allowed, else the seconds until one is free."""
        if self.take_local(key_id):
            return 0.0
        params = {
            "bucket": f"key:{key_id}",
            "want": self.lease_size,
            "burst": float(self.burst),
            "rate": self.rate_per_s,
        }
        async with self.pool.connection() as conn:
            cursor = conn.cursor(row_factory=args_row(_Granted))
            granted = await (await cursor.execute(LEASE, params)).fetchone()
            await self._clean(conn)
        assert granted is not None  # INSERT ... ON CONFLICT DO UPDATE returns its row
        if granted.count < 1:
            return (1 - granted.tokens) / self.rate_per_s
        with self._lock:
            self._leases[key_id] = _Lease(granted.count - 1, time.monotonic() + LEASE_TTL_S)
        return 0.0

    async def count_failure(self, limit: FailureLimit, *buckets: str) -> float:
        """Count a failure in each bucket: 0 while every bucket is within ``limit``, else the
        seconds until the fullest window ends (and :data:`UNCOUNTED_RETRY_S` when the failure
        could not be counted)."""
        self._longest_window_s = max(self._longest_window_s, limit.window_s)
        params = {"buckets": list(buckets), "window_s": limit.window_s}
        try:
            async with self.pool.connection() as conn:
                cursor = conn.cursor(row_factory=args_row(_Window))
                windows = await (await cursor.execute(COUNT_FAILURE, params)).fetchall()
                await self._clean(conn)
        except (psycopg.OperationalError, PoolTimeout):
            return UNCOUNTED_RETRY_S
        over = [window.left_s for window in windows if window.failures > limit.failures]
        return max(over, default=0.0)

    async def _clean(self, conn: AsyncConn) -> None:
        """Delete ended windows and idle buckets, at most every :data:`CLEANUP_INTERVAL_S`."""
        now = time.monotonic()
        if now - self._cleaned < CLEANUP_INTERVAL_S:
            return
        self._cleaned = now
        idle_s = max(IDLE_BUCKET_S, self.burst / self.rate_per_s)
        await conn.execute(
            "DELETE FROM rate_limit_buckets WHERE updated_at < now() - make_interval(secs => %s)",
            [idle_s],
        )
        await conn.execute(
            "DELETE FROM rate_limit_windows WHERE window_start < now() - make_interval(secs => %s)",
            [max(self._longest_window_s, IDLE_BUCKET_S)],
        )


@dataclass(frozen=True)
class _Granted:
    count: int
    tokens: float


@dataclass(frozen=True)
class _Window:
    failures: int
    left_s: float


def retry_after_header(wait_s: float) -> str:
    """Whole seconds, at least 1 (RFC 9110 delay-seconds)."""
    return str(max(1, math.ceil(wait_s)))
