"""Device provisioning: broker credentials are created with the device row and revoked with it.

The caller owns the transaction; after it commits, call
:func:`services.common.broker_auth.sync_device_credentials` so the broker admits (or
disconnects) the device at once.
"""

import re
from dataclasses import dataclass

from psycopg import errors

from services.common.broker_auth import (
    RESERVED_CLIENT_ID_PREFIX,
    hash_password,
    is_reserved_client_id,
    new_device_password,
)
from services.common.db import Conn
from services.common.errors import GalvaniError
from services.common.protocol.topics import DEVICE_ID_PATTERN

DEVICE_ID_RE = re.compile(DEVICE_ID_PATTERN)


class ProvisioningError(GalvaniError):
    """A device could not be provisioned or revoked; the message says why."""


class ReservedDeviceIdError(ProvisioningError):
    """The device id starts with the prefix of the backend's own MQTT client ids."""


class DeviceIdTakenError(ProvisioningError):
    """The device id is taken: by a device of this brand or of another, decommissioned or not.
    The message is the same in every case, so it says nothing about whose it is."""


@dataclass(frozen=True)
class ProvisionedDevice:
    """A new device and its broker password (shown once, stored only as a hash)."""

    device_id: str
    password: str


def provision_device(
    conn: Conn,
    *,
    device_id: str,
    brand_id: str,
    model: str,
    user_id: str | None = None,
) -> ProvisionedDevice:
    """Create the device with fresh credentials in the caller's transaction."""
    if not DEVICE_ID_RE.fullmatch(device_id):
        raise ProvisioningError(
            f"device id {device_id!r} must match {DEVICE_ID_RE.pattern} "
            "(lower-case letters, digits and '-', 3 to 64 characters)"
        )
    if is_reserved_client_id(device_id):
        raise ReservedDeviceIdError(
            f"device id {device_id!r} starts with {RESERVED_CLIENT_ID_PREFIX!r}, which is "
            "reserved for the backend's own MQTT clients: choose an id with another prefix"
        )
    password = new_device_password()
    try:
        with conn.transaction():
            # Inside the savepoint: a brand that does not exist fails the user's row first.
            if user_id is not None:
                conn.execute(
                    "INSERT INTO users (brand_id, id) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                    [brand_id, user_id],
                )
            conn.execute(
                "INSERT INTO devices (id, brand_id, model, user_id, credential_hash)"
                " VALUES (%s, %s, %s, %s, %s)",
                [device_id, brand_id, model, user_id, hash_password(password)],
            )
    except errors.UniqueViolation as exc:
        # Device ids are MQTT client ids, one namespace for every brand: the id cannot be
        # given twice, but the answer must not tell a brand whether another brand holds it.
        raise DeviceIdTakenError(
            f"device id {device_id!r} is not available: device ids are MQTT client ids, unique"
            " across the platform; choose another"
        ) from exc
    except errors.ForeignKeyViolation as exc:
        raise ProvisioningError(f"brand {brand_id} does not exist") from exc
    return ProvisionedDevice(device_id=device_id, password=password)


def revoke_device(conn: Conn, device_id: str) -> bool:
    """Remove the device's credentials and mark it decommissioned; False if unknown."""
    row = conn.execute(
        "UPDATE devices SET credential_hash = NULL,"
        " decommissioned_at = coalesce(decommissioned_at, now()), online = false"
        " WHERE id = %s RETURNING id",
        [device_id],
    ).fetchone()
    return row is not None
