"""Per-key rate limiting: a token bucket per API key, in this process.

Each key may make ``burst`` requests at once and ``rate_per_s`` a second after that; beyond,
the API answers 429 with ``Retry-After``. Buckets live in the API process: with several API
processes behind a balancer each enforces its own share (a shared store would be needed for
an exact fleet-wide limit).
"""

import math
import threading
import time
import uuid
from dataclasses import dataclass


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """Token buckets keyed by API key id."""

    def __init__(self, rate_per_s: float, burst: int) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._buckets: dict[uuid.UUID, _Bucket] = {}
        self._lock = threading.Lock()  # FastAPI runs sync endpoints on a thread pool

    def take(self, key_id: uuid.UUID) -> float:
        """Spend one token; return 0 if allowed, else the seconds until one is available."""
        now = time.monotonic()
        with self._lock:
            bucket = self._buckets.get(key_id)
            if bucket is None:
                bucket = self._buckets[key_id] = _Bucket(float(self.burst), now)
            bucket.tokens = min(
                float(self.burst), bucket.tokens + (now - bucket.updated) * self.rate_per_s
            )
            bucket.updated = now
            if bucket.tokens >= 1:
                bucket.tokens -= 1
                return 0.0
            return (1 - bucket.tokens) / self.rate_per_s


def retry_after_header(wait_s: float) -> str:
    """Whole seconds, at least 1 (RFC 9110 delay-seconds)."""
    return str(max(1, math.ceil(wait_s)))
