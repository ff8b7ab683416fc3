"""Who may log in to the NATS cluster: devices from the database, backend services from the
broker directory's service password file.

Nothing is cached across logins but the parsed service password file, which is read again
whenever its modification time or size changes: a provisioning, a decommission or a ban
(database rows) applies at the very next CONNECT, and a rotated service password at the next
CONNECT after the file is replaced.
"""

import base64
import hashlib
import hmac
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from services.broker_access.callout import (
    AuthRequest,
    Decision,
    Refusal,
    device_grant,
    service_grant,
)
from services.common.broker_auth import SERVICE_PASSWD_FILE, ServiceAccount, is_reserved_client_id
from services.common.db import Conn
from services.common.protocol.topics import DEVICE_ID_PATTERN

log = logging.getLogger(__name__)

SERVICE_ACCOUNTS: Final = frozenset(account.value for account in ServiceAccount)
# The device's row and its ban in one round trip (device_bans' primary key).
DEVICE_QUERY: Final = (
    "SELECT d.credential_hash, d.decommissioned_at IS NOT NULL, d.auth, b.until > now()"
    " FROM devices d LEFT JOIN device_bans b ON b.device_id = d.id WHERE d.id = %s"
)
_DEVICE_ID_RE: Final = re.compile(DEVICE_ID_PATTERN)


def verify_password(password: str, encoded: str) -> bool:
    """Whether ``password`` matches a Mosquitto ``$7$`` hash (PBKDF2-SHA512, as
    services.common.broker_auth.hash_password writes), in constant time."""
    parts = encoded.split("$")
    # "", "7", iterations, salt, digest
    if len(parts) != 5 or parts[1] != "7" or not parts[2].isdigit():
        return False
    try:
        salt = base64.b64decode(parts[3], validate=True)
        expected = base64.b64decode(parts[4], validate=True)
    except ValueError:
        return False
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, int(parts[2]))
    return hmac.compare_digest(digest, expected)


@dataclass(frozen=True)
class DeviceRow:
    """What a login needs of a device row."""

    credential_hash: str | None
    decommissioned: bool
    auth: str
    banned: bool


def lookup_device(conn: Conn, device_id: str) -> DeviceRow | None:
    """The device's row and whether a ban holds it now, or None when there is none."""
    row = conn.execute(DEVICE_QUERY, [device_id], prepare=True).fetchone()
    if row is None:
        return None
    encoded, decommissioned, auth, banned = row
    return DeviceRow(
        credential_hash=None if encoded is None else str(encoded),
        decommissioned=bool(decommissioned),
        auth=str(auth),
        banned=bool(banned),
    )


class ServicePasswords:
    """The broker directory's service password file (``account:$7$...`` lines, written by
    deploy's BrokerFiles.write_service_files), re-read when it changes."""

    def __init__(self, broker_dir: Path) -> None:
        self.path = broker_dir / SERVICE_PASSWD_FILE
        self._stamp: tuple[int, int] | None = None
        self._hashes: dict[str, str] = {}

    def hash_of(self, account: str) -> str | None:
        """The account's password hash, None when the file does not name it."""
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            self._stamp, self._hashes = None, {}
            return None
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp != self._stamp:
            hashes: dict[str, str] = {}
            for line in self.path.read_text().splitlines():
                name, sep, encoded = line.partition(":")
                if sep:
                    hashes[name.strip()] = encoded.strip()
            self._stamp, self._hashes = stamp, hashes
        return self._hashes.get(account)


class Authorizer:
    """Decides each login; ``lookup`` reads a device (a database round trip)."""

    def __init__(
        self,
        lookup: Callable[[str], DeviceRow | None],
        services: ServicePasswords,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._lookup = lookup
        self._services = services
        self._clock = clock

    def decide(self, request: AuthRequest) -> Decision:
        """A grant or a refusal for ``request``."""
        username = request.username
        if username in SERVICE_ACCOUNTS:
            return self._service(request)
        return self._device(request)

    def _service(self, request: AuthRequest) -> Decision:
        encoded = self._services.hash_of(request.username)
        if encoded is None:
            return Refusal(f"service account {request.username} is not in the password file")
        if not verify_password(request.password, encoded):
            return Refusal(f"wrong password for service account {request.username}")
        return service_grant(request.username)

    def _device(self, request: AuthRequest) -> Decision:
        device_id = request.username
        if not request.is_mqtt:
            return Refusal(f"{device_id!r}: devices connect over MQTT only")
        if not _DEVICE_ID_RE.fullmatch(device_id):
            return Refusal(f"{device_id!r} is not a device id")
        if is_reserved_client_id(device_id) or is_reserved_client_id(request.mqtt_client_id):
            return Refusal(f"{device_id!r}: reserved client id {request.mqtt_client_id!r}")
        if request.mqtt_client_id != device_id:
            return Refusal(
                f"device {device_id} must connect with its id as client id,"
                f" not {request.mqtt_client_id!r}"
            )
        row = self._lookup(device_id)
        if row is None:
            return Refusal(f"unknown device {device_id}")
        if row.decommissioned:
            return Refusal(f"device {device_id} is decommissioned")
        if row.auth == "certificate":
            return Refusal(
                f"device {device_id} authenticates with a certificate, which the NATS cluster"
                " does not support (only password devices connect to it)"
            )
        if row.credential_hash is None or not verify_password(
            request.password, row.credential_hash
        ):
            return Refusal(f"wrong password for device {device_id}")
        if row.banned:
            return Refusal(f"device {device_id} is banned for flooding")
        return device_grant(device_id)
