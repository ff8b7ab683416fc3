"""``/v1/notification-channels``: a brand's webhook channels, their deliveries, and a test
notification.

A channel's secret is made here, shown once in the 201, and stored only encrypted
(``services/common/secret_box.py``); the dispatcher decrypts it to sign each delivery. The URL
is checked against the operator's outbound policy (``services/common/outbound_urls.py``) here
and again by the dispatcher at every send.
"""

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request, Response, status

from services.api.deps import CurrentKey, NotificationChannelRepo, require
from services.api.notification_channels import schemas
from services.api.notification_channels.repository import NewChannel
from services.api.pagination import MAX_KEY, KeyCursor, page
from services.api.problems import ProblemError, responses
from services.api.responses import json_response
from services.api.settings import ApiSettings
from services.common.api_keys import Role
from services.common.outbound_urls import RefusedUrl, check_url
from services.common.secret_box import SecretBox, new_webhook_secret

router = APIRouter(prefix="/v1/notification-channels", tags=["notifications"])
MAX_LIMIT = 100
MAX_DELIVERIES_LIMIT = 500
PAYLOAD_VERSION = 1
ChannelId = Annotated[int, Path(ge=1, le=MAX_KEY)]


def _not_found(channel_id: int) -> ProblemError:
    return ProblemError(404, "not-found", "Not found", f"there is no channel {channel_id}")


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
        raise ProblemError(
            422,
            "url-refused",
            "URL refused",
            f"body.url: {exc}",
            errors=[{"field": "body.url", "message": str(exc)}],
        ) from None


@router.post(
    "",
    response_model=schemas.ChannelCreated,
    status_code=status.HTTP_201_CREATED,
    responses=responses(401, 403, 422),
)
def create_channel(
    body: schemas.ChannelCreate,
    request: Request,
    channels: NotificationChannelRepo,
    key: CurrentKey,
) -> Response:
    """Create a webhook channel. The answer carries its signing secret, shown this once.
    Besides what the schema says, the URL's host must resolve, and (unless the operator
    allows it) only to public addresses: otherwise 422 `url-refused` naming `body.url`."""
    require(key, Role.ADMIN)
    url = _checked_url(request, body.url)
    secret = new_webhook_secret()
    ciphertext = _secret_box(request).encrypt(secret)
    channel = channels.add(key.brand, NewChannel(body, url, ciphertext))
    created = schemas.ChannelCreated(**channel.model_dump(), secret=secret)
    response = json_response(created, status.HTTP_201_CREATED)
    # The only answer that carries the secret: no cache on the way may keep a copy.
    response.headers["Cache-Control"] = "no-store"
    return response


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
