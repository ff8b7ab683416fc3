"""``/v1/devices``: provision (broker credentials at once), list, details, decommission."""

import time
from typing import Annotated

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import APIRouter, Body, Query, Request, Response, status

from services.api.deps import (
    ConnDep,
    CurrentKey,
    ReadConnDep,
    ReadKey,
    after_commit,
    brand_scope,
    require,
)
from services.api.devices import repository
from services.api.devices.schemas import (
    Device,
    DeviceClear,
    DeviceConfig,
    DeviceCreate,
    DeviceList,
    Event,
    EventList,
    MqttCredentials,
    ProvisionedDevice,
    PushRecord,
    Session,
    SessionList,
)
from services.api.pagination import decode_cursor, decode_int_cursor, encode_cursor
from services.api.problems import ProblemError, responses
from services.api.publisher import ConfigPublisher
from services.api.responses import json_response
from services.api.settings import ApiSettings
from services.common import rollouts
from services.common.api_keys import Role
from services.common.broker_auth import BrokerFiles, sync_device_credentials
from services.common.config_push import record_push
from services.common.db import AsyncConn, Conn
from services.common.provisioning import (
    ProvisioningError,
    ReservedDeviceIdError,
    provision_device,
    revoke_device,
)

router = APIRouter(prefix="/v1/devices", tags=["devices"])
MAX_LIMIT = 500
TOPIC_PREFIX = "galvani/v1/d"


def _sync_broker(request: Request) -> None:
    settings: ApiSettings = request.app.state.settings
    files = BrokerFiles(settings.mosquitto_dir())

    def sync(conn: Conn) -> None:
        sync_device_credentials(conn, files)

    after_commit(request, sync)


def _not_found(device_id: str) -> ProblemError:
    return ProblemError(404, "not-found", "Not found", f"there is no device {device_id!r}")


@router.post(
    "",
    response_model=ProvisionedDevice,
    status_code=status.HTTP_201_CREATED,
    responses=responses(401, 403, 404, 409, 422),
)
def provision(
    body: DeviceCreate, request: Request, conn: ConnDep, key: CurrentKey
) -> ProvisionedDevice:
    """Create a device and its broker credentials; it can connect as soon as this returns."""
    require(key, Role.ADMIN, Role.OPERATOR)
    brand = brand_scope(conn, key, body.brand)
    try:
        device = provision_device(
            conn, device_id=body.device_id, brand_id=brand, model=body.model, user_id=body.user
        )
    except ReservedDeviceIdError as exc:
        raise ProblemError(422, "reserved-device-id", "Reserved device id", str(exc)) from None
    except ProvisioningError as exc:
        exists = "already exists" in str(exc)
        raise ProblemError(
            409 if exists else 422,
            "device-exists" if exists else "invalid-device",
            "Device not provisioned",
            str(exc),
        ) from None
    _sync_broker(request)
    settings: ApiSettings = request.app.state.settings
    return ProvisionedDevice(
        device_id=device.device_id,
        mqtt=MqttCredentials(
            host=settings.device_mqtt_host,
            port=settings.device_mqtt_port,
            username=device.device_id,
            password=device.password,
            client_id=device.device_id,
            topic_prefix=f"{TOPIC_PREFIX}/{device.device_id}",
        ),
    )


@router.get("", response_model=DeviceList, responses=responses(401, 403, 422))
async def list_devices(
    conn: ReadConnDep,
    key: ReadKey,
    online: bool | None = None,
    alerting: bool | None = None,
    fw: Annotated[str | None, Query(max_length=64)] = None,
    model: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> Response:
    """The brand's active devices, in id order."""
    rows = await repository.list_devices(
        conn,
        key.brand,
        online=online,
        alerting=alerting,
        fw=fw,
        model=model,
        after_id=decode_cursor("d", cursor, 1)[0] if cursor else None,
        limit=limit + 1,
    )
    more = len(rows) > limit
    rows = rows[:limit]
    return json_response(
        DeviceList(
            items=[Device.model_validate(row) for row in rows],
            next_cursor=encode_cursor("d", rows[-1]["device_id"]) if more else None,
        )
    )


@router.get("/{device_id}", response_model=Device, responses=responses(401, 403, 404))
async def get_device(device_id: str, conn: ReadConnDep, key: ReadKey) -> Response:
    """Presence, firmware, config versions, open alerts, last seq and gaps."""
    row = await repository.get_device(conn, key.brand, device_id)
    if row is None:
        raise _not_found(device_id)
    return json_response(Device.model_validate(row))


@router.delete(
    "/{device_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses=responses(401, 403, 404),
)
def decommission(device_id: str, request: Request, conn: ConnDep, key: CurrentKey) -> Response:
    """Revoke the device's credentials; the broker disconnects it at once."""
    require(key, Role.ADMIN)
    if not repository.exists(conn, key.brand, device_id):
        raise _not_found(device_id)
    revoke_device(conn, device_id)
    _sync_broker(request)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


async def _require_device(conn: AsyncConn, brand: str, device_id: str) -> None:
    if await repository.get_device(conn, brand, device_id) is None:
        raise _not_found(device_id)


@router.get(
    "/{device_id}/sessions", response_model=SessionList, responses=responses(401, 403, 404, 422)
)
async def list_sessions(
    device_id: str,
    conn: ReadConnDep,
    key: ReadKey,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 50,
    cursor: Annotated[str | None, Query(max_length=300)] = None,
) -> Response:
    """Sessions with mode, level, duration, end reason and contact quality, newest first."""
    await _require_device(conn, key.brand, device_id)
    before = decode_cursor("s", cursor, 2) if cursor else None
    rows = await repository.sessions(
        conn, device_id, before=(before[0], before[1]) if before else None, limit=limit + 1
    )
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = None
    if more:
        last = rows[-1]
        started = last["started_at"].isoformat() if last["started_at"] else "-infinity"
        next_cursor = encode_cursor("s", started, last["session"])
    return json_response(
        SessionList(items=[Session.model_validate(r) for r in rows], next_cursor=next_cursor)
    )


@router.get(
    "/{device_id}/events", response_model=EventList, responses=responses(401, 403, 404, 422)
)
async def list_events(
    device_id: str,
    conn: ReadConnDep,
    key: ReadKey,
    type: Annotated[str | None, Query(max_length=32)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 50,
    cursor: Annotated[str | None, Query(max_length=100)] = None,
) -> Response:
    """Events, newest first."""
    await _require_device(conn, key.brand, device_id)
    rows = await repository.events(
        conn,
        device_id,
        before_seq=decode_int_cursor("e", cursor) if cursor else None,
        type_=type,
        limit=limit + 1,
    )
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = encode_cursor("e", str(rows[-1]["seq"])) if more else None
    return json_response(
        EventList(items=[Event.model_validate(r) for r in rows], next_cursor=next_cursor)
    )


@router.get("/{device_id}/config", response_model=DeviceConfig, responses=responses(401, 403, 404))
def device_config(device_id: str, conn: ConnDep, key: CurrentKey) -> Response:
    """Desired vs reported mode table, drift, and every push with the device's answer."""
    row = conn.execute(
        "SELECT d.config_desired_version, p.payload, p.sha256, d.config_reported_version,"
        " d.config_reported_status, d.config_reported_reason, d.config_reported_sha256"
        " FROM devices d LEFT JOIN config_pushes p"
        "   ON p.device_id = d.id AND p.version = d.config_desired_version"
        " WHERE d.id = %s AND d.brand_id = %s",
        [device_id, key.brand],
    ).fetchone()
    if row is None:
        raise _not_found(device_id)
    desired_version, desired, desired_sha, version, status_, reason, sha = row
    history = conn.execute(
        "SELECT version, source, reason, sha256, issued_at, expires_at, published_at,"
        " superseded_at, answer_status, answer_reason, answered_at"
        " FROM config_pushes WHERE device_id = %s ORDER BY version DESC LIMIT 100",
        [device_id],
    ).fetchall()
    names = (
        "version",
        "source",
        "reason",
        "sha256",
        "issued_at",
        "expires_at",
        "published_at",
        "superseded_at",
        "answer_status",
        "answer_reason",
        "answered_at",
    )
    drift = desired_version is not None and not (
        version == desired_version and status_ == "applied" and sha == desired_sha
    )
    return json_response(
        DeviceConfig(
            desired_version=desired_version,
            desired=desired if isinstance(desired, dict) else None,
            reported_version=version,
            reported_status=status_,
            reported_reason=reason,
            reported_sha256=sha,
            drift=drift,
            history=[PushRecord.model_validate(dict(zip(names, h, strict=True))) for h in history],
        )
    )


@router.post(
    "/{device_id}/clear",
    response_model=DeviceConfig,
    responses=responses(401, 403, 404, 409, 422),
)
def clear_device(
    device_id: str,
    request: Request,
    conn: ConnDep,
    key: CurrentKey,
    action: Annotated[DeviceClear | None, Body()] = None,
) -> Response:
    """Lift a rule's restriction (SAFE only, or every mode locked) once support has checked
    the device: it gets the last table it applied of the brand's choosing (or the factory
    table) as a new version. Later rollouts no longer carry the rule's locks to it."""
    require(key, Role.ADMIN, Role.SUPPORT)
    if not repository.exists(conn, key.brand, device_id):
        raise _not_found(device_id)
    row = conn.execute(
        "SELECT decommissioned_at FROM devices WHERE id = %s FOR UPDATE", [device_id]
    ).fetchone()
    if row is not None and row[0] is not None:
        raise ProblemError(
            409,
            "decommissioned",
            "Device decommissioned",
            f"device {device_id!r} is decommissioned: no table can be pushed to it",
        )
    restore = rollouts.clearance(conn, device_id)
    if restore is None:
        raise ProblemError(
            409, "not-restricted", "Not restricted", f"no rule restricts device {device_id!r}"
        )
    note = action.note if action and action.note else None
    table = rollouts.rollout_table(
        restore.body,
        issued_at_ms=int(time.time() * 1000),
        expires_at_ms=None,
        reason=f"cleared by {key.actor}" + (f": {note}" if note else ""),
        rule_lock=None,
    )
    signing_key: Ed25519PrivateKey = request.app.state.signing_key
    push = record_push(
        conn,
        signing_key,
        device_id=device_id,
        table=table,
        source="api",
        source_ref=key.actor,
        mode_table_id=restore.mode_table_id,
    )
    publisher: ConfigPublisher = request.app.state.config_publisher

    def publish(_: Conn) -> None:
        publisher.submit([push])

    after_commit(request, publish)
    return device_config(device_id, conn, key)
