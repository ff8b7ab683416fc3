"""``/v1/device-authorities``: a brand registers its factory CA, so that devices carrying a
certificate it signed can be provisioned with it (``POST /v1/devices`` with
``"auth": "certificate"`` and ``certificate``).

The broker never trusts these CAs: it maps a certificate to a device by its CN alone, so a
brand's CA trusted there could name another brand's devices. A device vouched for by one gets a
certificate from Galvani's device CA for the same key instead.
"""

from typing import Annotated

import psycopg
from fastapi import APIRouter, Query, Response, status

from services.api.deps import CurrentKey, DeviceRepo, require
from services.api.device_authorities import schemas
from services.api.device_authorities.repository import DeviceAuthorityRepository
from services.api.pagination import KeyCursor, page
from services.api.problems import ProblemError, responses
from services.api.responses import json_response
from services.common import pki
from services.common.api_keys import Role

router = APIRouter(prefix="/v1/device-authorities", tags=["devices"])
MAX_LIMIT = 100


def _not_found(authority_id: int) -> ProblemError:
    detail = f"there is no device authority {authority_id}"
    return ProblemError(404, "not-found", "Not found", detail)


@router.post(
    "",
    response_model=schemas.DeviceAuthority,
    status_code=status.HTTP_201_CREATED,
    responses=responses(401, 403, 409, 422),
)
def register(
    body: schemas.DeviceAuthorityCreate, devices: DeviceRepo, key: CurrentKey
) -> schemas.DeviceAuthority:
    """Register the brand's factory CA (a CA certificate valid now; 409 if it is registered)."""
    require(key, Role.ADMIN)
    try:
        certificate = pki.load_authority_certificate(body.certificate)
    except pki.CertificateError as exc:
        raise ProblemError(
            422,
            "invalid-authority",
            "Not a device authority",
            f"body.certificate: {exc}",
            errors=[{"field": "body.certificate", "message": str(exc)}],
        ) from None
    fingerprint = pki.fingerprint(certificate)
    authorities = DeviceAuthorityRepository(devices.session)
    try:
        with devices.conn.transaction():
            return authorities.add(
                key.brand,
                subject=certificate.subject.rfc4514_string(),
                fingerprint=fingerprint,
                certificate=pki.pem(certificate).decode(),
                not_after=certificate.not_valid_after_utc,
            )
    except psycopg.errors.UniqueViolation:
        # brand_device_authorities_fingerprint_key: one active row per brand and CA.
        raise ProblemError(
            409,
            "authority-exists",
            "Device authority exists",
            f"the brand has registered this CA already (SHA-256 {fingerprint})",
        ) from None


@router.get("", response_model=schemas.DeviceAuthorityList, responses=responses(401, 403, 422))
def list_authorities(
    devices: DeviceRepo,
    key: CurrentKey,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 50,
    cursor: KeyCursor = None,
) -> Response:
    """The brand's device authorities, oldest first."""
    rows = DeviceAuthorityRepository(devices.session).page(
        key.brand, after_id=cursor, limit=limit + 1
    )
    items, next_cursor = page(rows, limit, lambda authority: str(authority.id))
    return json_response(schemas.DeviceAuthorityList(items=items, next_cursor=next_cursor))


@router.get(
    "/{authority_id}", response_model=schemas.DeviceAuthority, responses=responses(401, 403, 404)
)
def get_authority(authority_id: int, devices: DeviceRepo, key: CurrentKey) -> Response:
    """One of the brand's device authorities."""
    authority = DeviceAuthorityRepository(devices.session).get(key.brand, authority_id)
    if authority is None:
        raise _not_found(authority_id)
    return json_response(authority)


@router.delete(
    "/{authority_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses=responses(401, 403, 404),
)
def remove(authority_id: int, devices: DeviceRepo, key: CurrentKey) -> Response:
    """Remove a device authority: devices can no longer be provisioned with a certificate it
    signed. Certificates Galvani issued on its word stay valid (revoke them by
    decommissioning the device)."""
    require(key, Role.ADMIN)
    if not DeviceAuthorityRepository(devices.session).remove(key.brand, authority_id):
        raise _not_found(authority_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
