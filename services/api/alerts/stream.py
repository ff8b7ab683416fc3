"""``GET /v1/alerts/stream``: Server-Sent Events of new and changed alerts of the brand.

Each event is ``event: alert`` with the alert (as in ``GET /v1/alerts``) as ``data`` and its
change number as ``id``. A client that reconnects with ``Last-Event-ID`` first gets every
alert changed since that number (each in its current state), then live changes. A comment
line every :data:`HEARTBEAT_S` seconds keeps proxies from closing an idle stream.
"""

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated, Final

from fastapi import APIRouter, Header, Request
from fastapi.responses import StreamingResponse
from psycopg_pool import AsyncConnectionPool

from services.api.alerts import repository
from services.api.alerts.feed import AlertFeed
from services.api.alerts.repository import AlertReadRepository, ChangedAlert
from services.api.deps import ReadKey
from services.api.problems import responses
from services.common.db import AsyncConn

HEARTBEAT_S: Final = 15.0
RETRY_MS: Final = 3000

router = APIRouter(prefix="/v1/alerts", tags=["alerts"])


async def _read(
    pool: AsyncConnectionPool[AsyncConn], brand_id: str, ids: list[int] | None, after: int | None
) -> list[tuple[int, str]]:
    """(change number, event) for the alerts with ``ids``, or for every alert changed after
    ``after``, in change order, read a page of :data:`repository.MAX_CHANGES` at a time.
    A connection is taken per read, never held while the stream waits."""
    rows: list[ChangedAlert] = []
    async with pool.connection() as conn:
        alerts = AlertReadRepository(conn)
        if ids is not None:
            for start in range(0, len(ids), repository.MAX_CHANGES):
                rows += await alerts.changed(
                    brand_id, ids=ids[start : start + repository.MAX_CHANGES]
                )
            rows.sort(key=lambda alert: alert.change_seq)
        else:
            while page := await alerts.changed(brand_id, after_seq=after):
                rows += page
                if len(page) < repository.MAX_CHANGES:
                    break
                after = page[-1].change_seq
    return [(alert.change_seq, _event(alert)) for alert in rows]


async def _newest(pool: AsyncConnectionPool[AsyncConn], brand_id: str) -> int:
    async with pool.connection() as conn:
        return await AlertReadRepository(conn).newest_change(brand_id)


def _event(alert: ChangedAlert) -> str:
    body = alert.model_dump_json(exclude={"change_seq"})
    return f"id: {alert.change_seq}\nevent: alert\ndata: {body}\n\n"


async def _events(request: Request, brand_id: str, last_event_id: int | None) -> AsyncIterator[str]:
    pool: AsyncConnectionPool[AsyncConn] = request.app.state.read_pool
    feed: AlertFeed = request.app.state.alert_feed
    subscription = feed.subscribe(brand_id)
    try:
        yield f"retry: {RETRY_MS}\n\n"
        if last_event_id is None:
            last = await _newest(pool, brand_id)
            replay = []
        else:
            last = last_event_id
            replay = await _read(pool, brand_id, None, last)
        while True:
            for seq, event in replay:
                last = max(last, seq)
                yield event
            try:
                async with asyncio.timeout(HEARTBEAT_S):
                    await subscription.wake.wait()
            except TimeoutError:
                replay = []
                yield ": keep-alive\n\n"
                continue
            ids, lost = subscription.take()
            # After the feed lost its connection, notifications may be missing: read by
            # change number instead of by id.
            replay = await _read(pool, brand_id, None if lost else ids, last if lost else None)
    finally:
        feed.unsubscribe(subscription)


@router.get(
    "/stream",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
            "description": "`event: alert` per new or changed alert; `data` is the alert as in "
            "`GET /v1/alerts`, `id` its change number (send it back as `Last-Event-ID`)",
        },
        **responses(401, 403, 422),
    },
)
async def stream_alerts(
    request: Request,
    key: ReadKey,
    last_event_id: Annotated[str | None, Header(max_length=20, pattern=r"^[0-9]+$")] = None,
) -> StreamingResponse:
    """New and changed alerts of the brand as Server-Sent Events."""
    last = int(last_event_id) if last_event_id is not None else None
    return StreamingResponse(
        _events(request, key.brand, last),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
