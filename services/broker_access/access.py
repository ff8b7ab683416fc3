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
from collections.abc import Callable, Sequence
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
# The devices' rows and bans in one round trip (both by primary key): every request that
# arrived together is looked up at once, so a reconnect storm costs one query per read of the
# socket rather than one per device.
DEVICE_QUERY: Final = (
    "SELECT d.id, d.credential_hash, d.decommissioned_at IS NOT NULL, d.auth,"
    " coalesce(b.until > now(), false)"
    " FROM devices d LEFT JOIN device_bans b ON b.device_id = d.id WHERE d.id = ANY(%s)"
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


def lookup_devices(conn: Conn, device_ids: Sequence[str]) -> dict[str, DeviceRow]:
    """The rows of those of ``device_ids`` that exist, each with whether a ban holds it now."""
    rows = conn.execute(DEVICE_QUERY, [list(device_ids)], prepare=True).fetchall()
    return {
        str(device_id): DeviceRow(
            credential_hash=None if encoded is None else str(encoded),
            decommissioned=bool(decommissioned),
            auth=str(auth),
            banned=bool(banned),
        )
        for device_id, encoded, decommissioned, auth, banned in rows
    }


class LookupFailed(Exception):
    """The devices could not be read (the database is unavailable)."""


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
    """Decides logins; ``lookup`` reads devices by id (one database round trip for many) and
    raises :class:`LookupFailed` when it cannot."""

    def __init__(
        self,
        lookup: Callable[[Sequence[str]], dict[str, DeviceRow]],
        services: ServicePasswords,
    ) -> None:
        self._lookup = lookup
        self._services = services

    def decide(self, request: AuthRequest) -> Decision:
        """A grant or a refusal for ``request``."""
        [decision] = self.decide_all([request])
        return decision

    def decide_all(self, requests: Sequence[AuthRequest]) -> list[Decision]:
        """A grant or a refusal for each of ``requests``, the devices read in one lookup."""
        decisions: list[Decision | None] = []
        wanted: list[str] = []
        for request in requests:
            if request.username in SERVICE_ACCOUNTS:
                decisions.append(self._service(request))
                continue
            refused = _refuse_before_lookup(request)
            decisions.append(refused)
            if refused is None:
                wanted.append(request.username)
        rows: dict[str, DeviceRow] | None = None
        if wanted:
            try:
                rows = self._lookup(wanted)
            except LookupFailed as exc:
                log.error("cannot check %d device login(s): %s", len(wanted), exc)  # noqa: TRY400
        return [
            decision if decision is not None else _device_decision(request, rows)
            for request, decision in zip(requests, decisions, strict=True)
        ]

    def _service(self, request: AuthRequest) -> Decision:
        encoded = self._services.hash_of(request.username)
        if encoded is None:
            return Refusal(f"service account {request.username} is not in the password file")
        if not verify_password(request.password, encoded):
            return Refusal(f"wrong password for service account {request.username}")
        grant = service_grant(ServiceAccount(request.username))
        if grant is None:
            return Refusal(f"service account {request.username} has no use for the cluster")
        if not grant.admits(request.client_type):
            return Refusal(
                f"service account {request.username} does not connect over"
                f" {request.client_type or 'an unknown protocol'}"
            )
        return grant


def _refuse_before_lookup(request: AuthRequest) -> Refusal | None:
    """What refuses a device login without reading its row."""
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
    return None


def _device_decision(request: AuthRequest, rows: dict[str, DeviceRow] | None) -> Decision:
    device_id = request.username
    if rows is None:
        return Refusal(f"device {device_id}'s login could not be checked (database unavailable)")
    row = rows.get(device_id)
    if row is None:
        return Refusal(f"unknown device {device_id}")
    if row.decommissioned:
        return Refusal(f"device {device_id} is decommissioned")
    if row.auth == "certificate":
        return Refusal(
            f"device {device_id} authenticates with a certificate, which the NATS cluster"
            " does not support (only password devices connect to it)"
        )
    if row.credential_hash is None or not verify_password(request.password, row.credential_hash):
        return Refusal(f"wrong password for device {device_id}")
    if row.banned:
        return Refusal(f"device {device_id} is banned for flooding")
    return device_grant(device_id)
