"""``GET /v1/alerts/stream``: Server-Sent Events of new and changed alerts of the brand.

Each event is ``event: alert`` with the alert (as in ``GET /v1/alerts``) as ``data`` and its
change number as ``id``. A client that reconnects with ``Last-Event-ID`` first gets the alerts
changed since that number (each in its current state; at most ``alert_replay_max_changes``,
the newest, after an ``event: replay-truncated`` when there were more), then live changes. A
comment line every :data:`HEARTBEAT_S` seconds keeps proxies from closing an idle stream.

Every read is a page of :data:`repository.MAX_CHANGES` on a connection taken for that page
only, sent before the next page is read: a stream holds at most one page in memory and no
connection while it waits or while a slow client drains. Before each wake's reads (an alert
changed, the heartbeat, the key revoked) the stream checks its key again; a key that has been
revoked, or whose role or brand is no longer the one it connected with, ends the stream.
Streams are capped per key and per process (``StreamSlots``): beyond, 429 ``rate-limited``.
"""

import asyncio
import json
import threading
import uuid
import weakref
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated, Final

from fastapi import APIRouter, Header, Request
from fastapi.responses import StreamingResponse
from psycopg_pool import AsyncConnectionPool

from services.api.alerts import repository
from services.api.alerts.feed import AlertFeed
from services.api.alerts.repository import AlertReadRepository, ChangedAlert
from services.api.auth import AuthReadRepository
from services.api.deps import ApiKey, ReadKey
from services.api.pagination import MAX_KEY
from services.api.problems import ProblemError, responses
from services.api.rate_limit import retry_after_header
from services.common.db import AsyncConn

HEARTBEAT_S: Final = 15.0
RETRY_MS: Final = 3000
FULL_RETRY_S: Final = 30.0  # Retry-After when every stream slot is taken

router = APIRouter(prefix="/v1/alerts", tags=["alerts"])


@dataclass
class StreamSlots:
    """The open streams of this process, per key and in all, against their caps."""

    per_key: int
    per_process: int
    _open: Counter[uuid.UUID] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def acquire(self, key_id: uuid.UUID) -> "Slot | None":
        """A slot for a new stream of ``key_id``, or None when a cap is reached."""
        with self._lock:
            if self._open[key_id] >= self.per_key or self._open.total() >= self.per_process:
                return None
            self._open[key_id] += 1
        return Slot(self, key_id)

    def open_streams(self, key_id: uuid.UUID | None = None) -> int:
        """Streams open now (of ``key_id``, or in all)."""
        with self._lock:
            return self._open.total() if key_id is None else self._open[key_id]

    def _release(self, key_id: uuid.UUID) -> None:
        with self._lock:
            self._open[key_id] -= 1
            if self._open[key_id] <= 0:
                del self._open[key_id]


@dataclass(eq=False)
class Slot:
    """One stream's place; released once, however the stream ends."""

    slots: StreamSlots
    key_id: uuid.UUID
    _released: bool = False

    def release(self) -> None:
        """Give the place back (again: nothing)."""
        with self.slots._lock:
            if self._released:
                return
            self._released = True
        self.slots._release(self.key_id)


async def _pages(
    pool: AsyncConnectionPool[AsyncConn],
    brand_id: str,
    *,
    ids: list[int] | None = None,
    after: int | None = None,
) -> AsyncIterator[list[ChangedAlert]]:
    """The alerts with ``ids``, or every alert changed after ``after``, a page at a time, each
    page in change order. A connection is taken per page and returned before it is yielded."""
    size = repository.MAX_CHANGES
    if ids is not None:
        for start in range(0, len(ids), size):
            async with pool.connection() as conn:
                page = await AlertReadRepository(conn).changed(
                    brand_id, ids=ids[start : start + size]
                )
            if page:
                yield sorted(page, key=lambda alert: alert.change_seq)
        return
    while True:
        async with pool.connection() as conn:
            page = await AlertReadRepository(conn).changed(brand_id, after_seq=after)
        if page:
            yield page
        if len(page) < size:
            return
        after = page[-1].change_seq


async def _newest(pool: AsyncConnectionPool[AsyncConn], brand_id: str) -> int:
    async with pool.connection() as conn:
        return await AlertReadRepository(conn).newest_change(brand_id)


async def _replay_from(
    pool: AsyncConnectionPool[AsyncConn], brand_id: str, after: int, max_changes: int
) -> int | None:
    async with pool.connection() as conn:
        return await AlertReadRepository(conn).replay_from(brand_id, after, max_changes)


async def _still_allowed(pool: AsyncConnectionPool[AsyncConn], key: ApiKey) -> bool:
    """Whether ``key`` is still active with the role and brand it connected with."""
    async with pool.connection() as conn:
        now = await AuthReadRepository(conn).still_active(key.id)
    return now is not None and (now.role, now.brand_id) == (key.role.value, key.brand_id)


def _event(alert: ChangedAlert) -> str:
    body = alert.model_dump_json(exclude={"change_seq"})
    return f"id: {alert.change_seq}\nevent: alert\ndata: {body}\n\n"


@dataclass(frozen=True)
class _Stream:
    pool: AsyncConnectionPool[AsyncConn]
    feed: AlertFeed
    key: ApiKey
    brand_id: str
    max_replay: int


REVOKED: Final = ": the API key was revoked\n\n"


async def _events(stream: _Stream, last_event_id: int | None) -> AsyncIterator[str]:
    pool, brand_id = stream.pool, stream.brand_id
    subscription = stream.feed.subscribe(brand_id, stream.key.id)
    try:
        yield f"retry: {RETRY_MS}\n\n"
        pages = None
        if last_event_id is None:
            last = await _newest(pool, brand_id)
        else:
            last = last_event_id
            start = await _replay_from(pool, brand_id, last, stream.max_replay)
            if start is not None:
                truncated = {"replayed": stream.max_replay, "changed_after": start}
                yield f"event: replay-truncated\ndata: {json.dumps(truncated)}\n\n"
                last = start
            pages = _pages(pool, brand_id, after=last)
        checked = True  # the key was checked at connect, and is again at every wake
        while True:
            if pages is not None:
                async for page in pages:
                    if not checked and not await _still_allowed(pool, stream.key):
                        yield REVOKED
                        return
                    checked = False
                    for alert in page:
                        last = max(last, alert.change_seq)
                        yield _event(alert)
            try:
                async with asyncio.timeout(HEARTBEAT_S):
                    await subscription.wake.wait()
                woken = True
            except TimeoutError:
                woken = False
            ids, lost = subscription.take()
            if not await _still_allowed(pool, stream.key):
                yield REVOKED
                return
            checked = True
            pages = None
            if not woken:
                yield ": keep-alive\n\n"
            elif lost:
                # After the feed lost its connection, notifications may be missing: read by
                # change number instead of by id.
                pages = _pages(pool, brand_id, after=last)
            elif ids:
                pages = _pages(pool, brand_id, ids=ids)
    finally:
        stream.feed.unsubscribe(subscription)


@router.get(
    "/stream",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
            "description": "`event: alert` per new or changed alert; `data` is the alert as in "
            "`GET /v1/alerts`, `id` its change number (send it back as `Last-Event-ID`)",
        },
        **responses(401, 403, 422, 429),
    },
)
async def stream_alerts(
    request: Request,
    key: ReadKey,
    last_event_id: Annotated[
        int | None, Header(ge=0, le=MAX_KEY, description="the `id` of the last event received")
    ] = None,
) -> StreamingResponse:
    """New and changed alerts of the brand as Server-Sent Events."""
    brand_id = key.brand  # refuses the operator before a slot is taken
    slots: StreamSlots = request.app.state.alert_streams
    slot = slots.acquire(key.id)
    if slot is None:
        raise ProblemError(
            429,
            "rate-limited",
            "Too many requests",
            f"too many open alert streams (at most {slots.per_key} per key and"
            f" {slots.per_process} in all per API process); close one, or retry in"
            f" {FULL_RETRY_S:.0f} s",
            headers={"Retry-After": retry_after_header(FULL_RETRY_S)},
        )
    last = last_event_id
    stream = _Stream(
        request.app.state.read_pool,
        request.app.state.alert_feed,
        key,
        brand_id,
        request.app.state.settings.alert_replay_max_changes,
    )
    body = _released(_events(stream, last), slot)
    # However the response ends (the stream returns, the client goes, or the body is never
    # started because sending the headers failed), the slot comes back: at the body's end or
    # when it is collected.
    weakref.finalize(body, slot.release)
    return StreamingResponse(
        body,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


async def _released(events: AsyncIterator[str], slot: Slot) -> AsyncIterator[str]:
    try:
        async for event in events:
            yield event
    finally:
        slot.release()
