"""Broker credentials and ACLs for Mosquitto, rendered from the database.

Galvani uses Mosquitto's password and ACL files with per-listener settings rather than the
dynamic-security plugin: Mosquitto 2.0's dynsec has no ``%c``/``%u`` substitution in ACLs,
so every device would need a role of its own, and each provisioning call then costs time
proportional to the fleet (measured: 2,000 devices took 112 s, 160 ms for the next one).
Pattern ACLs in a file cost nothing per device, and a SIGHUP reload re-reads both files and
disconnects clients whose credentials are gone (see docs/architecture.md).

The same reload keeps a flooding device out for a while: ingest bans it (:func:`ban_devices`,
services/ingest/throttle.py), which writes it with its end time into ``devices.banned`` and
re-renders the password file without it; the reload closes its connection and refuses its
reconnects (CONNACK 0x87 / 3.1.1 return code 5) until
:func:`lift_expired_bans` renders it back. Every rendering of the password file leaves out the
devices banned in that file, so a provisioning call meanwhile does not let one back in.

Three listeners, all TLS (deploy/stack/mosquitto.py), each with its own files:

* the device listener forces the client id to the username (``use_username_as_clientid``),
  so a device can neither take over another device's session nor publish outside its own
  topics (ACL patterns on ``%u``);
* the certificate listener names a device by its certificate's CN (username and client id),
  with no password file: the device CA's revocation lists refuse a revoked certificate, and
  services/common/broker_certificates.py ends its live session. The same ACL patterns apply.
  The password-file reload above neither refuses nor disconnects a certificate device, so a
  flood ban does not hold on that listener;
* the service listener holds only the backend's service accounts.

Mosquitto keys sessions by client id across listeners, so device ids and the backend's client
ids must never meet: every backend client id starts with :data:`RESERVED_CLIENT_ID_PREFIX`,
and no id with that prefix is ever written to the device password file, so none can log in
on the device listener (where the client id is the username).

The database is the source of truth: ``devices.credential_hash`` holds the Mosquitto
PBKDF2-SHA512 hash, and the password file is re-rendered from it on every change.
"""

import base64
import fcntl
import hashlib
import logging
import os
import secrets
import signal
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Final

from services.common.db import Conn
from services.common.protocol.topics import (
    ACK_CHANNEL,
    CONFIG_CHANNEL,
    DEVICE_CHANNELS,
    acl_pattern,
    every_device,
)

log = logging.getLogger(__name__)

PBKDF2_ITERATIONS = 101  # Mosquitto's own default for mosquitto_passwd -H sha512-pbkdf2
SALT_BYTES = 12
DEVICE_PASSWORD_BYTES = 24

DEVICE_PASSWD_FILE = "devices.passwd"  # noqa: S105 - a file name
DEVICE_ACL_FILE = "devices.acl"
SERVICE_PASSWD_FILE = "services.passwd"  # noqa: S105 - a file name
SERVICE_ACL_FILE = "services.acl"
DEVICE_BAN_FILE = "devices.banned"
PID_FILE = "mosquitto.pid"
LOCK_FILE = ".auth.lock"

RESERVED_CLIENT_ID_PREFIX: Final = "galvani-"
"""The start of every backend MQTT client id and service account, and of no device id.

Mosquitto keys sessions by client id across listeners. A device whose id were a backend
worker's client id (``galvani-ingest-1``) would log in on the device listener under that
client id and take over the worker's persistent session: a clean-start login discards it and
its shared subscription, and QoS 1 messages the broker had already acknowledged to devices but
not yet delivered to the worker are lost. Provisioning refuses such ids, the database's
``devices_id_not_reserved`` constraint refuses them, and the device password file never holds
one, so the two namespaces stay disjoint at the broker itself.
"""

# protocol.md "Authorization": publish to its own telemetry/events/state/presence, subscribe
# only to its own config and ack. The last will is a publish too: a will naming another
# device's topic is dropped by the broker when it fires.
DEVICE_ACL = "".join(
    [
        "# Galvani device ACL (generated). %u is the username, which is also the client id.\n",
        *(f"pattern write {acl_pattern(channel)}\n" for channel in DEVICE_CHANNELS),
        *(f"pattern read {acl_pattern(channel)}\n" for channel in (CONFIG_CHANNEL, ACK_CHANNEL)),
    ]
)


class ServiceAccount(StrEnum):
    """The backend's broker accounts, one per service."""

    INGEST = "galvani-ingest"
    RULES = "galvani-rules"
    API = "galvani-api"
    MAINTENANCE = "galvani-maintenance"


def _topic_acl(access: str, channels: Iterable[str]) -> tuple[str, ...]:
    """Mosquitto ``topic`` lines granting ``access`` to ``channels`` of every device."""
    return tuple(f"topic {access} {every_device(channel)}" for channel in channels)


SERVICE_ACLS: dict[ServiceAccount, tuple[str, ...]] = {
    ServiceAccount.INGEST: (
        *_topic_acl("read", DEVICE_CHANNELS),
        *_topic_acl("write", [ACK_CHANNEL]),
    ),
    ServiceAccount.RULES: (
        *_topic_acl("read", DEVICE_CHANNELS),
        *_topic_acl("readwrite", [CONFIG_CHANNEL]),
    ),
    ServiceAccount.API: (
        *_topic_acl("read", ["state", "presence"]),
        *_topic_acl("readwrite", [CONFIG_CHANNEL]),
    ),
    # The broker watch reads Mosquitto's own statistics and nothing else. A topic starting with
    # `$` is matched only by an ACL that starts with `$` too (Mosquitto 2.0.11,
    # src/security_default.c and mosquitto_topic_matches_sub), so `#` would not grant it.
    ServiceAccount.MAINTENANCE: ("topic read $SYS/broker/#",),
}


def is_reserved_client_id(client_id: str) -> bool:
    """Whether ``client_id`` is in the backend's namespace, where no device may be."""
    return client_id.startswith(RESERVED_CLIENT_ID_PREFIX)


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """The Mosquitto password-file hash (``$7$``: PBKDF2-SHA512) of ``password``."""
    salt = salt if salt is not None else os.urandom(SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, PBKDF2_ITERATIONS)
    return (
        f"$7${PBKDF2_ITERATIONS}${base64.b64encode(salt).decode()}"
        f"${base64.b64encode(digest).decode()}"
    )


def new_device_password() -> str:
    """A fresh random device password (shown once at provisioning)."""
    return secrets.token_urlsafe(DEVICE_PASSWORD_BYTES)


@dataclass(frozen=True)
class BrokerFiles:
    """The broker's configuration directory and the auth files in it."""

    directory: Path

    def path(self, name: str) -> Path:
        """A file inside the broker directory."""
        return self.directory / name

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Serialise writers (several API workers may provision at once)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.path(LOCK_FILE), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def write(self, name: str, text: str) -> None:
        """Replace a file atomically, readable only by its owner (and the broker's group)."""
        target = self.path(name)
        tmp = target.with_name(f".{name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.chmod(tmp, 0o640)
        owner = self.directory.stat()
        if os.geteuid() == 0:
            os.chown(tmp, owner.st_uid, owner.st_gid)
        os.replace(tmp, target)

    def write_service_files(self, passwords: dict[ServiceAccount, str]) -> None:
        """Render the service listener's password and ACL files."""
        lines = [f"{account}:{hash_password(pw)}" for account, pw in sorted(passwords.items())]
        self.write(SERVICE_PASSWD_FILE, "\n".join(lines) + "\n")
        acl = ["# Galvani service ACL (generated)."]
        for account in sorted(passwords):
            acl += ["", f"user {account}", *SERVICE_ACLS[account]]
        self.write(SERVICE_ACL_FILE, "\n".join(acl) + "\n")

    def bans(self) -> dict[str, float]:
        """Every entry of the ban file, expired or not: device id to the end of its ban (Unix
        seconds). A missing file bans no one; a line that is not ``<id> <end>`` is ignored."""
        try:
            text = self.path(DEVICE_BAN_FILE).read_text()
        except FileNotFoundError:
            return {}
        bans: dict[str, float] = {}
        for line in text.splitlines():
            device_id, _, until = line.partition(" ")
            try:
                bans[device_id] = float(until)
            except ValueError:
                continue
        return bans

    def write_bans(self, bans: dict[str, float]) -> None:
        """Replace the ban file with ``bans`` (device id to the end of its ban)."""
        self.write(DEVICE_BAN_FILE, "".join(f"{d} {u:.3f}\n" for d, u in sorted(bans.items())))

    def write_device_files(
        self, credentials: Iterable[tuple[str, str]], *, now: float | None = None
    ) -> int:
        """Render the device listener's files from ``(device_id, hash)`` pairs; return how
        many devices may log in. A reserved id is left out and logged as an error; a device
        banned past ``now`` (default: the current time) is left out until its ban ends."""
        moment = time.time() if now is None else now
        banned = {d for d, until in self.bans().items() if until > moment}
        lines: list[str] = []
        reserved: list[str] = []
        for device_id, encoded in credentials:
            if device_id in banned:
                continue
            if is_reserved_client_id(device_id):
                reserved.append(device_id)
            else:
                lines.append(f"{device_id}:{encoded}\n")
        if reserved:
            # Left out rather than raised: refusing to render would also keep revoked
            # devices admitted and new ones out, for the sake of rows that must not log in.
            log.error(
                "%d device id(s) start with the reserved prefix %r and were left out of %s,"
                " so they cannot log in: %s",
                len(reserved),
                RESERVED_CLIENT_ID_PREFIX,
                DEVICE_PASSWD_FILE,
                ", ".join(reserved[:10]),
            )
        self.write(DEVICE_PASSWD_FILE, "".join(lines))
        self.write(DEVICE_ACL_FILE, DEVICE_ACL)
        return len(lines)

    def reload_broker(self) -> bool:
        """SIGHUP the broker so it re-reads the files; False when it is not running."""
        try:
            pid = int(self.path(PID_FILE).read_text().strip())
        except (OSError, ValueError):
            return False
        try:
            os.kill(pid, signal.SIGHUP)
        except ProcessLookupError:
            return False
        return True


def active_device_credentials(
    conn: Conn,
) -> list[tuple[str, str]]:
    """``(device_id, hash)`` of every device that may connect (not revoked)."""
    rows = conn.execute(
        "SELECT id, credential_hash FROM devices"
        " WHERE credential_hash IS NOT NULL AND decommissioned_at IS NULL ORDER BY id"
    ).fetchall()
    return [(str(device_id), str(encoded)) for device_id, encoded in rows]


def sync_device_credentials(conn: Conn, files: BrokerFiles) -> int:
    """Re-render the device password file from the database and reload the broker.

    Call after the transaction that provisioned or revoked a device has committed, so the
    broker never admits a device the database does not have.
    """
    with files.locked():
        count = files.write_device_files(active_device_credentials(conn))
        files.reload_broker()
    return count


def ban_devices(conn: Conn, files: BrokerFiles, bans: dict[str, float]) -> bool:
    """Keep each device of ``bans`` off the broker until its end time (Unix seconds): written
    to the ban file (a later end wins), left out of the re-rendered password file, and
    disconnected by the broker's reload. Messages the broker acknowledged before stay queued
    for ingest; what the device had not had acknowledged stays in its outbox. False when no
    broker runs from ``files`` to reload (the ban then holds only from its next start)."""
    with files.locked():
        current = files.bans()
        for device_id, until in bans.items():
            current[device_id] = max(until, current.get(device_id, 0.0))
        files.write_bans(current)
        files.write_device_files(active_device_credentials(conn))
        return files.reload_broker()


def lift_expired_bans(conn: Conn, files: BrokerFiles, now: float | None = None) -> list[str]:
    """Let back in the devices whose ban ended by ``now`` (default: the current time); return
    them. Nothing is rendered or reloaded when no ban has ended."""
    moment = time.time() if now is None else now
    with files.locked():
        current = files.bans()
        ended = sorted(d for d, until in current.items() if until <= moment)
        if ended:
            files.write_bans({d: u for d, u in current.items() if u > moment})
            files.write_device_files(active_device_credentials(conn), now=moment)
            files.reload_broker()
    return ended
