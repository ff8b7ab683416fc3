"""``/v1/devices``: provision (broker credentials at once), list, details, decommission."""

import time
from typing import Annotated

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import APIRouter, Body, Query, Request, Response, status

from services.api import deps
from services.api.deps import CurrentKey, DeviceReadRepo, DeviceRepo, ReadKey, require
from services.api.devices import schemas, service
from services.api.devices.repository import DeviceReadRepository, DeviceRepository
from services.api.pagination import (
    DeviceCursor,
    KeyCursor,
    SessionCursor,
    decode_session_cursor,
    page,
    session_cursor,
)
from services.api.problems import ProblemError, constraint_problem, responses
from services.api.responses import json_response
from services.api.settings import ApiSettings
from services.common import provisioning, rollouts
from services.common.api_keys import Role
from services.common.broker import BrokerKind
from services.common.broker_auth import BrokerFiles, sync_device_credentials
from services.common.config_push import record_push
from services.common.db import Conn
from services.common.protocol.topics import device_prefix

router = APIRouter(prefix="/v1/devices", tags=["devices"])
MAX_LIMIT = 500
LISTED = responses(401, 403, 404, 422)  # a list of one device's records


def _sync_broker(request: Request) -> None:
    settings: ApiSettings = request.app.state.settings
    files = BrokerFiles(settings.mosquitto_dir())

    def sync(conn: Conn) -> None:
        sync_device_credentials(conn, files)

    deps.after_commit(request, sync)


def _not_found(device_id: str) -> ProblemError:
    return ProblemError(404, "not-found", "Not found", f"there is no device {device_id!r}")


@router.post(
    "",
    response_model=schemas.ProvisionedDevice,
    status_code=status.HTTP_201_CREATED,
    responses=responses(401, 403, 404, 409, 422, 503),
)
def provision(
    body: schemas.DeviceCreate, request: Request, devices: DeviceRepo, key: CurrentKey
) -> schemas.ProvisionedDevice:
    """Create a device and its broker credentials; it can connect as soon as this returns.

    With ``"auth": "certificate"`` and a CSR (or a factory certificate of the brand's device
    authority), the answer carries the device's certificate instead of a password, and the
    certificate listener's port. A CSR or certificate Galvani will not sign is a 422 naming
    the field (``csr`` or ``certificate``) and why."""
    require(key, Role.ADMIN, Role.OPERATOR)
    brand = deps.brand_scope(devices, key, body.brand)
    conflicts = deps.ProvisionConflicts.of(request, devices, key)
    settings: ApiSettings = request.app.state.settings
    issued: provisioning.IssuedCertificate | None = None
    password: str | None = None
    try:
        if body.auth == "certificate":
            # A malformed request is the client's error (422) even where no device CA is
            # configured (503).
            enrolment = provisioning.CertificateRequest(body.csr, body.certificate)
            provisioning.check_readable(enrolment)
            issued = provisioning.provision_certificate_device(
                devices.conn, service.device_authority(settings), enrolment,
                device_id=body.device_id, brand_id=brand, model=body.model, user_id=body.user,
                days=settings.device_certificate_days,
            )  # fmt: skip
        else:
            password = provisioning.provision_device(
                devices.conn, device_id=body.device_id, brand_id=brand, model=body.model,
                user_id=body.user,
            ).password  # fmt: skip
    except provisioning.ReservedDeviceIdError as exc:
        raise ProblemError(422, "reserved-device-id", "Reserved device id", str(exc)) from None
    except provisioning.DeviceIdTakenError as exc:
        raise conflicts.refuse(str(exc)) from None
    except provisioning.CertificateRefusedError as exc:
        raise service.refused(exc) from None
    except provisioning.ProvisioningError as exc:
        # The constraint's error is the cause: its SQLSTATE and name say which it was.
        invalid = ProblemError(422, "invalid-device", "Device not provisioned", str(exc))
        raise constraint_problem(exc.__cause__, str(exc)) or invalid from None
    credentials = schemas.MqttCredentials(
        host=settings.device_mqtt_host,
        port=settings.device_mqtt_port if issued is None else settings.device_cert_mqtt_port,
        username=body.device_id,
        password=password,
        client_id=body.device_id,
        topic_prefix=device_prefix(body.device_id),
    )
    if issued is None:
        _sync_broker(request)
        return schemas.ProvisionedDevice(
            device_id=body.device_id, auth="password", mqtt=credentials
        )
    return schemas.ProvisionedDevice(
        device_id=body.device_id,
        auth="certificate",
        mqtt=credentials,
        certificate=issued.pem,
        not_after=issued.not_after,
    )


@router.get("", response_model=schemas.DeviceList, responses=responses(401, 403, 422))
async def list_devices(
    devices: DeviceReadRepo,
    key: ReadKey,
    online: bool | None = None,
    alerting: bool | None = None,
    fw: Annotated[str | None, Query(max_length=64)] = None,
    model: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100,
    cursor: DeviceCursor = None,
) -> Response:
    """The brand's active devices, in id order."""
    after_id = cursor
    rows = await devices.page(
        key.brand, online=online, alerting=alerting, fw=fw, model=model, after_id=after_id,
        limit=limit + 1,
    )  # fmt: skip
    items, next_cursor = page(rows, limit, lambda device: device.device_id)
    return json_response(schemas.DeviceList(items=items, next_cursor=next_cursor))


@router.get("/{device_id}", response_model=schemas.Device, responses=responses(401, 403, 404))
async def get_device(device_id: str, devices: DeviceReadRepo, key: ReadKey) -> Response:
    """Presence, firmware, config versions, open alerts, last seq and gaps, and how it
    authenticates (with its certificate's expiry)."""
    device = await devices.get(key.brand, device_id)
    if device is None:
        raise _not_found(device_id)
    return json_response(device)


@router.delete(
    "/{device_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses=responses(401, 403, 404, 503),
)
def decommission(
    device_id: str, request: Request, devices: DeviceRepo, key: CurrentKey
) -> Response:
    """Revoke the device's credentials; the broker disconnects it at once.

    A password device's password is removed from the broker's file (on the NATS cluster its
    live session is ended, as the callout refuses it from then on). A certificate device's
    certificates are revoked: the broker's revocation list names them before this answers
    (new connections fail at the handshake), and its live session is ended."""
    require(key, Role.ADMIN)
    state = devices.auth_state(key.brand, device_id)
    if state is None:
        raise _not_found(device_id)
    settings: ApiSettings = request.app.state.settings
    authority = (
        service.device_authority(settings)
        if state.auth == provisioning.DeviceAuth.CERTIFICATE
        else None
    )
    provisioning.revoke_device(devices.conn, device_id)
    if authority is None:
        _sync_broker(request)
        if settings.broker is BrokerKind.NATS:
            # The cluster's auth callout refuses the device's next login, but nothing like
            # Mosquitto's reload drops the connection it has: a takeover ends it.
            deps.after_commit(request, service.end_session(settings, device_id))
    else:
        # Each in a transaction of its own: the list's writers queue on a lock that the
        # takeover (up to session_end_timeout_s) does not hold.
        deps.after_commit(request, service.publish_revocations(settings, authority))
        deps.after_commit(request, service.end_session(settings, device_id))
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/{device_id}/certificate",
    response_model=schemas.IssuedCertificate,
    status_code=status.HTTP_201_CREATED,
    responses=responses(401, 403, 404, 409, 422, 503),
)
def renew_certificate(
    device_id: str,
    body: schemas.CertificateRequestBody,
    request: Request,
    devices: DeviceRepo,
    key: CurrentKey,
) -> schemas.IssuedCertificate:
    """A new certificate for a certificate device, from a new CSR (or its factory
    certificate): for rotation before expiry. The certificates it has stay valid until their
    not_after, so the device switches when it has stored the new one."""
    require(key, Role.ADMIN)
    state = devices.auth_state(key.brand, device_id)
    if state is None:
        raise _not_found(device_id)
    if state.decommissioned_at is not None:
        raise ProblemError(
            409, "decommissioned", "Device decommissioned",
            f"device {device_id!r} is decommissioned: it gets no new certificate",
        )  # fmt: skip
    if state.auth != provisioning.DeviceAuth.CERTIFICATE:
        raise ProblemError(
            409, "not-a-certificate-device", "Not a certificate device",
            f"device {device_id!r} authenticates with a password, not a certificate",
        )  # fmt: skip
    settings: ApiSettings = request.app.state.settings
    try:
        enrolment = provisioning.CertificateRequest(body.csr, body.certificate)
        provisioning.check_readable(enrolment)
        issued = provisioning.renew_certificate(
            devices.conn, service.device_authority(settings), enrolment,
            device_id=device_id, brand_id=key.brand, days=settings.device_certificate_days,
        )  # fmt: skip
    except provisioning.CertificateRefusedError as exc:
        raise service.refused(exc) from None
    return schemas.IssuedCertificate(
        device_id=device_id,
        certificate=issued.pem,
        serial=f"{issued.serial:x}",
        fingerprint=issued.fingerprint,
        not_before=issued.not_before,
        not_after=issued.not_after,
    )


@router.get(
    "/{device_id}/certificates", response_model=schemas.DeviceCertificateList, responses=LISTED
)
async def list_certificates(
    device_id: str,
    devices: DeviceReadRepo,
    key: ReadKey,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 50,
    cursor: KeyCursor = None,
) -> Response:
    """The certificates Galvani issued to the device, newest first, with their revocation."""
    await _require_device(devices, key.brand, device_id)
    rows = await devices.certificates(device_id, before_id=cursor, limit=limit + 1)
    items, next_cursor = page(rows, limit, lambda certificate: str(certificate.id))
    return json_response(schemas.DeviceCertificateList(items=items, next_cursor=next_cursor))


async def _require_device(devices: DeviceReadRepository, brand: str, device_id: str) -> None:
    if not await devices.owns_device(brand, device_id):
        raise _not_found(device_id)


@router.get("/{device_id}/sessions", response_model=schemas.SessionList, responses=LISTED)
async def list_sessions(
    device_id: str,
    devices: DeviceReadRepo,
    key: ReadKey,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 50,
    cursor: SessionCursor = None,
) -> Response:
    """Sessions with mode, level, duration, end reason and contact quality, newest first."""
    await _require_device(devices, key.brand, device_id)
    before = decode_session_cursor(cursor) if cursor else None
    rows = await devices.sessions(device_id, before=before, limit=limit + 1)
    items, next_cursor = page(rows, limit, lambda s: session_cursor(s.started_at, s.session))
    return json_response(schemas.SessionList(items=items, next_cursor=next_cursor))


@router.get("/{device_id}/events", response_model=schemas.EventList, responses=LISTED)
async def list_events(
    device_id: str,
    devices: DeviceReadRepo,
    key: ReadKey,
    type: Annotated[str | None, Query(max_length=32)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 50,
    cursor: KeyCursor = None,
) -> Response:
    """Events, newest first."""
    await _require_device(devices, key.brand, device_id)
    rows = await devices.events(device_id, before_seq=cursor, type_=type, limit=limit + 1)
    items, next_cursor = page(rows, limit, lambda event: str(event.seq))
    return json_response(schemas.EventList(items=items, next_cursor=next_cursor))


def _config(devices: DeviceRepository, brand: str, device_id: str) -> Response:
    state = devices.config(brand, device_id)
    if state is None:
        raise _not_found(device_id)
    desired_version = state.desired_version
    drift = desired_version is not None and not (
        state.reported_version == desired_version
        and state.reported_status == "applied"
        and state.reported_sha256 == state.desired_sha256
    )
    return json_response(
        schemas.DeviceConfig(
            desired_version=desired_version,
            desired=state.desired if isinstance(state.desired, dict) else None,
            reported_version=state.reported_version,
            reported_status=state.reported_status,
            reported_reason=state.reported_reason,
            reported_sha256=state.reported_sha256,
            drift=drift,
            history=devices.pushes(device_id),
        )
    )


@router.get(
    "/{device_id}/config", response_model=schemas.DeviceConfig, responses=responses(401, 403, 404)
)
def device_config(device_id: str, devices: DeviceRepo, key: CurrentKey) -> Response:
    """Desired vs reported mode table, drift, and every push with the device's answer."""
    return _config(devices, key.brand, device_id)


@router.post(
    "/{device_id}/clear",
    response_model=schemas.DeviceConfig,
    responses=responses(401, 403, 404, 409, 422),
)
def clear_device(
    device_id: str,
    request: Request,
    devices: DeviceRepo,
    key: CurrentKey,
    action: Annotated[schemas.DeviceClear | None, Body()] = None,
) -> Response:
    """Lift a rule's restriction (SAFE only, or every mode locked) once support has checked
    the device: it gets the last table it applied of the brand's choosing (or the factory
    table) as a new version. Later rollouts no longer carry the rule's locks to it."""
    require(key, Role.ADMIN, Role.SUPPORT)
    locked = devices.lock(key.brand, device_id)
    if locked is None:
        raise _not_found(device_id)
    if locked.decommissioned_at is not None:
        raise ProblemError(
            409,
            "decommissioned",
            "Device decommissioned",
            f"device {device_id!r} is decommissioned: no table can be pushed to it",
        )
    restore = rollouts.clearance(devices.conn, device_id)
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
        devices.conn,
        signing_key,
        device_id=device_id,
        table=table,
        source="api",
        source_ref=key.actor,
        mode_table_id=restore.mode_table_id,
    )
    deps.publish_after_commit(request, [push])
    return _config(devices, key.brand, device_id)
