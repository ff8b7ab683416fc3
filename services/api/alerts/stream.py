"""``GET /v1/alerts/stream``: Server-Sent Events of new and changed alerts of the brand.

Each event is ``event: alert`` with the alert (as in ``GET /v1/alerts``) as ``data`` and its
change number as ``id``. A client that reconnects with ``Last-Event-ID`` first gets every
alert changed since that number (each in its current state), then live changes. A comment
line every :data:`HEARTBEAT_S` seconds keeps proxies from closing an idle stream.
"""

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated, Any, Final

from fastapi import APIRouter, Header, Request
from fastapi.responses import StreamingResponse
from sqlalchemy import Engine
from starlette.concurrency import run_in_threadpool

from services.api.alerts import repository
from services.api.alerts.feed import AlertFeed
from services.api.alerts.schemas import Alert
from services.api.database import raw_connection_of
from services.api.deps import CurrentKey
from services.api.problems import responses

HEARTBEAT_S: Final = 15.0
RETRY_MS: Final = 3000

router = APIRouter(prefix="/v1/alerts", tags=["alerts"])


def _read(
    engine: Engine, brand_id: str, ids: list[int] | None, after: int | None
) -> list[tuple[int, str]]:
    """(change number, event) for the alerts with ``ids``, or for every alert changed after
    ``after``, in change order, read a page of :data:`repository.MAX_CHANGES` at a time."""
    rows: list[tuple[int, dict[str, Any]]] = []
    with engine.connect() as connection:
        conn = raw_connection_of(connection)
        if ids is not None:
            for start in range(0, len(ids), repository.MAX_CHANGES):
                chunk = ids[start : start + repository.MAX_CHANGES]
                rows += repository.changed(conn, brand_id, ids=chunk)
            rows.sort(key=lambda row: row[0])
        else:
            while page := repository.changed(conn, brand_id, after_seq=after):
                rows += page
                if len(page) < repository.MAX_CHANGES:
                    break
                after = page[-1][0]
        connection.rollback()
    return [(seq, _event(seq, alert)) for seq, alert in rows]


def _newest(engine: Engine, brand_id: str) -> int:
    with engine.connect() as connection:
        newest = repository.newest_change(raw_connection_of(connection), brand_id)
        connection.rollback()
    return newest


def _event(seq: int, alert: dict[str, Any]) -> str:
    body = Alert.model_validate(alert).model_dump_json()
    return f"id: {seq}\nevent: alert\ndata: {body}\n\n"


async def _events(request: Request, brand_id: str, last_event_id: int | None) -> AsyncIterator[str]:
    engine: Engine = request.app.state.engine
    feed: AlertFeed = request.app.state.alert_feed
    subscription = feed.subscribe(brand_id)
    try:
        yield f"retry: {RETRY_MS}\n\n"
        if last_event_id is None:
            last = await run_in_threadpool(_newest, engine, brand_id)
            replay = []
        else:
            last = last_event_id
            replay = await run_in_threadpool(_read, engine, brand_id, None, last)
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
            replay = await run_in_threadpool(
                _read, engine, brand_id, None if lost else ids, last if lost else None
            )
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
    key: CurrentKey,
    last_event_id: Annotated[str | None, Header(max_length=20, pattern=r"^[0-9]+$")] = None,
) -> StreamingResponse:
    """New and changed alerts of the brand as Server-Sent Events."""
    last = int(last_event_id) if last_event_id is not None else None
    return StreamingResponse(
        _events(request, key.brand, last),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
