"""``/v1/notification-channels``: a brand's channels (webhook, Slack, PagerDuty, e-mail),
their deliveries, and a test notification.

A webhook channel's secret is made here, shown once in the 201, and stored only encrypted
(``services/common/secret_box.py``); the dispatcher decrypts it to sign each delivery. A
Slack channel's incoming-webhook URL and a PagerDuty routing key are the brand's own
credentials: stored encrypted the same way and never shown (a Slack channel shows a masked
form of its URL). Every URL is checked against the operator's outbound policy
(``services/common/outbound_urls.py``) here and again by the dispatcher at every send.
"""

from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any
from urllib.parse import urlsplit

import psycopg
from fastapi import APIRouter, Body, Path, Query, Request, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute

from services.api.deps import CurrentKey, NotificationChannelRepo, require
from services.api.notification_channels import schemas
from services.api.notification_channels.repository import (
    ChannelLimitReached,
    NewChannel,
    quiet_hours_columns,
)
from services.api.pagination import MAX_KEY, KeyCursor, page
from services.api.problems import ProblemError, responses
from services.api.responses import json_response
from services.api.settings import ApiSettings
from services.common.api_keys import Role
from services.common.outbound_urls import RefusedUrl, check_url
from services.common.secret_box import SecretBox, new_webhook_secret

KINDS = frozenset(kind.value for kind in schemas.ChannelKind)
# pydantic's errors for a missing or unknown tag of a discriminated union.
TAG_ERRORS = frozenset({"union_tag_not_found", "union_tag_invalid"})


def _as_written(errors: Sequence[Any]) -> list[Any]:
    """``errors`` located as the client wrote the body: pydantic puts a discriminated
    union's tag in the location (``body.slack.url``), and an unknown or missing tag at the
    body itself."""
    located = []
    for error in errors:
        loc = tuple(error.get("loc", ()))
        if len(loc) >= 2 and loc[0] == "body" and loc[1] in KINDS:
            loc = (loc[0], *loc[2:])
        elif loc == ("body",) and error.get("type") in TAG_ERRORS:
            loc = ("body", "kind")
        located.append({**error, "loc": loc})
    return located


class _ChannelRoute(APIRoute):
    """A route whose invalid bodies name their fields as written (:func:`_as_written`)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                raise RequestValidationError(
                    _as_written(exc.errors()), body=exc.body, endpoint_ctx=exc.endpoint_ctx
                ) from None

        return route


router = APIRouter(
    prefix="/v1/notification-channels", tags=["notifications"], route_class=_ChannelRoute
)
MAX_LIMIT = 100
MAX_DELIVERIES_LIMIT = 500
PAYLOAD_VERSION = 1
ChannelId = Annotated[int, Path(ge=1, le=MAX_KEY)]


def _not_found(channel_id: int) -> ProblemError:
    return ProblemError(404, "not-found", "Not found", f"there is no channel {channel_id}")


def _invalid(field: str, message: str, kind: str = "invalid-request") -> ProblemError:
    title = "URL refused" if kind == "url-refused" else "Invalid request"
    return ProblemError(
        422, kind, title, f"{field}: {message}", errors=[{"field": field, "message": message}]
    )


def _secret_box(request: Request) -> SecretBox:
    """The process's box, made on first use (which creates the key file if need be)."""
    box: SecretBox | None = getattr(request.app.state, "secret_box", None)
    if box is None:
        settings: ApiSettings = request.app.state.settings
        box = SecretBox.from_file(settings.notify_secret_key_path())
        request.app.state.secret_box = box
    return box


def _checked_url(request: Request, url: str) -> str:
    settings: ApiSettings = request.app.state.settings
    try:
        return check_url(url, settings.outbound_policy()).url
    except RefusedUrl as exc:
        raise _invalid("body.url", str(exc), "url-refused") from None


def masked(url: str) -> str:
    """What a Slack channel shows of its incoming-webhook URL (a checked one): the scheme,
    host and port, and the first segment of its path when more follow; never the rest
    (``https://hooks.slack.com/services/…``), where the credential is."""
    parts = urlsplit(url)
    segments = [segment for segment in parts.path.split("/") if segment]
    shown = f"{segments[0]}/" if len(segments) > 1 else ""
    return f"{parts.scheme}://{parts.netloc}/{shown}…"


def _pagerduty_url(request: Request, url: str) -> str:
    """A PagerDuty channel's endpoint: PagerDuty's own is not the brand's choice (and its
    name need not resolve here), so only another is checked."""
    return url if url == schemas.PAGERDUTY_EVENTS_URL else _checked_url(request, url)


def _target(
    request: Request, body: schemas.ChannelCreate
) -> tuple[str | None, bytes | None, str | None]:
    """A new channel's (url column, encrypted secret, secret shown once) by its kind."""
    match body:
        case schemas.WebhookChannelCreate():
            secret = new_webhook_secret()
            return _checked_url(request, body.url), _secret_box(request).encrypt(secret), secret
        case schemas.SlackChannelCreate():
            url = _checked_url(request, body.url)
            return masked(url), _secret_box(request).encrypt(url), None
        case schemas.PagerDutyChannelCreate():
            return (
                _pagerduty_url(request, body.url),
                _secret_box(request).encrypt(body.routing_key),
                None,
            )
        case schemas.EmailChannelCreate():
            return None, None, None


def _unknown_zone(exc: psycopg.errors.InvalidParameterValue) -> ProblemError:
    """The zone Python's tz database knows and PostgreSQL's does not (the table's CHECK)."""
    return _invalid(
        "body.quiet_hours.time_zone",
        f"the database does not know this time zone ({str(exc).splitlines()[0]})",
    )


@router.post(
    "",
    response_model=schemas.ChannelCreated,
    status_code=status.HTTP_201_CREATED,
    responses=responses(401, 403, 409, 422),
)
def create_channel(
    body: Annotated[schemas.ChannelCreate, Body()],
    request: Request,
    channels: NotificationChannelRepo,
    key: CurrentKey,
) -> Response:
    """Create a channel of any kind. A webhook's answer carries its signing secret, shown
    this once. Besides what the schema says, a URL's host must resolve, and (unless the
    operator allows it) only to public addresses: otherwise 422 `url-refused` naming
    `body.url`. A brand has at most `GALVANI_API_NOTIFY_CHANNELS_PER_BRAND` (50) live
    channels: beyond, 409 `channel-limit`."""
    require(key, Role.ADMIN)
    settings: ApiSettings = request.app.state.settings
    url, ciphertext, secret = _target(request, body)
    try:
        channel = channels.add(
            key.brand, NewChannel(body, url, ciphertext), limit=settings.notify_channels_per_brand
        )
    except ChannelLimitReached as exc:
        raise ProblemError(409, "channel-limit", "Too many channels", str(exc)) from None
    except psycopg.errors.InvalidParameterValue as exc:
        raise _unknown_zone(exc) from None
    created = schemas.ChannelCreated(**channel.model_dump(), secret=secret)
    response = json_response(created, status.HTTP_201_CREATED)
    # The answer that may carry the secret: no cache on the way may keep a copy.
    response.headers["Cache-Control"] = "no-store"
    return response


@router.patch(
    "/{channel_id}", response_model=schemas.Channel, responses=responses(401, 403, 404, 422)
)
def update_channel(
    channel_id: ChannelId,
    body: schemas.ChannelUpdate,
    request: Request,
    channels: NotificationChannelRepo,
    key: CurrentKey,
) -> Response:
    """Change a channel's name, filter, concurrency, quiet hours (null clears them), target
    URL (webhook, slack, pagerduty; checked as on create) or recipients (email). Only the
    fields given change; its kind and secret never do. Notifications already queued keep
    their schedule (one held by the old quiet hours is still sent when they ended)."""
    require(key, Role.ADMIN)
    given = body.model_fields_set
    channel = channels.get_for_update(key.brand, channel_id)
    if channel is None:
        raise _not_found(channel_id)
    kind = channel.kind
    columns: dict[str, Any] = {}
    # Only rules, models and quiet_hours may be null (every rule, every model, none); the
    # others are None only when left out.
    for name in ("name", "rules", "models", "max_concurrency"):
        if name in given:
            columns[name] = getattr(body, name)
    if body.min_severity is not None:
        columns["min_severity"] = body.min_severity.value
    if body.transitions is not None:
        columns["transitions"] = [t.value for t in body.transitions]
    if "quiet_hours" in given:
        columns.update(quiet_hours_columns(body.quiet_hours))
    if body.recipients is not None:
        if kind is not schemas.ChannelKind.EMAIL:
            raise _invalid("body.recipients", f"a {kind} channel has no recipients")
        columns["recipients"] = list(body.recipients)
    if body.url is not None:
        if kind is schemas.ChannelKind.EMAIL:
            raise _invalid("body.url", "an email channel has no url (it has recipients)")
        if kind is schemas.ChannelKind.PAGERDUTY:
            url = _pagerduty_url(request, body.url)
        else:
            url = _checked_url(request, body.url)
        if kind is schemas.ChannelKind.SLACK:
            columns["url"] = masked(url)
            columns["secret_ciphertext"] = _secret_box(request).encrypt(url)
        else:
            columns["url"] = url
    if not columns:
        return json_response(channel)
    try:
        updated = channels.update(key.brand, channel_id, columns)
    except psycopg.errors.InvalidParameterValue as exc:
        raise _unknown_zone(exc) from None
    assert updated is not None  # the row is locked by this transaction
    return json_response(updated)


@router.get("", response_model=schemas.ChannelList, responses=responses(401, 403, 422))
def list_channels(
    channels: NotificationChannelRepo,
    key: CurrentKey,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 50,
    cursor: KeyCursor = None,
) -> Response:
    """The brand's channels, oldest first (never their secrets)."""
    rows = channels.page(key.brand, after_id=cursor, limit=limit + 1)
    items, next_cursor = page(rows, limit, lambda channel: str(channel.id))
    return json_response(schemas.ChannelList(items=items, next_cursor=next_cursor))


@router.get(
    "/{channel_id}", response_model=schemas.Channel, responses=responses(401, 403, 404, 422)
)
def get_channel(
    channel_id: ChannelId, channels: NotificationChannelRepo, key: CurrentKey
) -> Response:
    """One of the brand's channels (never its secret)."""
    channel = channels.get(key.brand, channel_id)
    if channel is None:
        raise _not_found(channel_id)
    return json_response(channel)


@router.delete(
    "/{channel_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses=responses(401, 403, 404, 422),
)
def delete_channel(
    channel_id: ChannelId, channels: NotificationChannelRepo, key: CurrentKey
) -> Response:
    """Delete a channel: nothing more is queued for it; its delivery log is kept."""
    require(key, Role.ADMIN)
    if not channels.delete(key.brand, channel_id):
        raise _not_found(channel_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get(
    "/{channel_id}/deliveries",
    response_model=schemas.DeliveryList,
    responses=responses(401, 403, 404, 422),
)
def list_deliveries(
    channel_id: ChannelId,
    channels: NotificationChannelRepo,
    key: CurrentKey,
    status: schemas.DeliveryStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_DELIVERIES_LIMIT)] = 50,
    cursor: KeyCursor = None,
) -> Response:
    """The channel's notifications, newest first: status, attempts, the last error and
    status code, and the latency from queueing to delivery."""
    if channels.get(key.brand, channel_id) is None:
        raise _not_found(channel_id)
    rows = channels.deliveries(
        key.brand,
        channel_id,
        status=status.value if status else None,
        before_id=cursor,
        limit=limit + 1,
    )
    items, next_cursor = page(rows, limit, lambda delivery: str(delivery.id))
    return json_response(schemas.DeliveryList(items=items, next_cursor=next_cursor))


@router.post(
    "/{channel_id}/test",
    response_model=schemas.QueuedNotification,
    status_code=status.HTTP_202_ACCEPTED,
    responses=responses(401, 403, 404, 422),
)
def send_test(
    channel_id: ChannelId, channels: NotificationChannelRepo, key: CurrentKey
) -> Response:
    """Queue a test notification (`"event": "test"`, `"alert": null`) for the dispatcher; its
    outcome shows in the channel's deliveries."""
    require(key, Role.ADMIN)
    if channels.get(key.brand, channel_id) is None:
        raise _not_found(channel_id)
    payload: dict[str, Any] = {
        "v": PAYLOAD_VERSION,
        "event": "test",
        "occurred_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "brand": key.brand,
        "alert": None,
        "dashboard_url": None,
    }
    queued = channels.queue_test(key.brand, channel_id, payload)
    return json_response(queued, status.HTTP_202_ACCEPTED)
