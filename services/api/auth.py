"""The lookup every request makes: the presented key, and whether its source address is over
its limit of failed authentications, in one statement on the request's own connection.

Folding the address's window (``rate_limit_windows``, see ``services/api/rate_limit.py``) into
the key lookup keeps the check off the hot path's round trips: it is one more index probe in a
statement the request runs anyway.
"""

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from psycopg.rows import args_row

from services.api.repository import ReadRepository, Repository
from services.common.api_keys import digest

# Always one row: the key's columns (NULL when no unrevoked key has this secret), then the
# address's failure window as stored (NULL when it has none) and the database's clock, which
# set it. Plain columns: the arithmetic is done in Python, where it costs less than in the
# statement (measured: see docs/api.md).
LOOKUP: Final = """
SELECT k.id, k.role, k.brand_id, k.name, w.window_start, w.failures, now()
FROM (VALUES (1)) AS one (n)
LEFT JOIN api_keys k ON k.key_hash = %s AND k.revoked_at IS NULL
LEFT JOIN rate_limit_windows w ON w.bucket = %s
"""

# The seconds left in a bucket's failure window once it has reached its limit.
FAILURE_WAIT: Final = """
SELECT extract(epoch FROM window_start + make_interval(secs => %(window_s)s) - now())::float8
FROM rate_limit_windows WHERE bucket = %(bucket)s AND failures >= %(failures)s
    AND window_start > now() - make_interval(secs => %(window_s)s)
"""

# The key's current role and brand, if it is still active: what a long-lived request (the
# alert stream) checks again before each thing it sends.
STILL_ACTIVE: Final = (
    "SELECT id, role, brand_id, name, NULL::timestamptz, NULL::integer, now() FROM api_keys"
    " WHERE id = %s AND revoked_at IS NULL"
)


@dataclass(frozen=True)
class Lookup:
    """A lookup's row, positionally (``args_row``: every request reads it, and by name costs
    more). ``id`` is None when no active key has the secret; ``window_start`` and
    ``failures`` are the source address's failure window (None when it has none)."""

    id: uuid.UUID | None
    role: str | None
    brand_id: str | None
    name: str | None
    window_start: datetime | None
    failures: int | None
    now: datetime

    def blocked_s(self, failures: int, window_s: float) -> float:
        """The seconds left in the address's window once it has reached ``failures``, else 0."""
        if self.window_start is None or self.failures is None or self.failures < failures:
            return 0.0
        return max(0.0, window_s - (self.now - self.window_start).total_seconds())


@dataclass(frozen=True)
class _Wait:
    seconds: float


class AuthRepository(Repository):
    """The lookup on the read-write unit."""

    def lookup(self, secret: str, address: str) -> Lookup:
        """The key with ``secret`` and ``address``'s failure window."""
        row = self.one(LOOKUP, [digest(secret), address], args_row(Lookup))
        assert row is not None  # the query always returns its one row
        return row

    def failure_wait(self, bucket: str, failures: int, window_s: float) -> float:
        """The seconds until ``bucket``'s window ends if it has reached ``failures``, else 0."""
        params = {"bucket": bucket, "failures": failures, "window_s": window_s}
        wait = self.one(FAILURE_WAIT, params, args_row(_Wait))
        return wait.seconds if wait else 0.0


class AuthReadRepository(ReadRepository):
    """The lookup on the read-only unit, and the stream's check again."""

    async def lookup(self, secret: str, address: str) -> Lookup:
        """The key with ``secret`` and ``address``'s failure window."""
        row = await self.one(LOOKUP, [digest(secret), address], args_row(Lookup))
        assert row is not None  # the query always returns its one row
        return row

    async def still_active(self, key_id: uuid.UUID) -> Lookup | None:
        """The key as it is now, or None once it has been revoked."""
        return await self.one(STILL_ACTIVE, [key_id], args_row(Lookup))
