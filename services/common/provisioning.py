"""Device provisioning: broker credentials are created with the device row and revoked with it.

A device authenticates with a password (the device listener) or with a certificate Galvani's
device CA issued (the certificate listener): from a CSR the device made, or for the key of a
certificate its brand's factory CA issued (:func:`provision_certificate_device`).

The caller owns the transaction; after it commits, call
:func:`services.common.broker_auth.sync_device_credentials` so the broker admits (or
disconnects) a password device at once, and for a revoked certificate device
:func:`publish_revocations` (new connections are refused at the handshake) and end its live
session (``services.common.broker_certificates.end_device_session``).
"""

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from psycopg import errors
from psycopg.rows import args_row

from services.common import pki
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


class CertificateRefusedError(ProvisioningError):
    """A CSR or factory certificate Galvani will not issue a certificate for; ``field`` is
    the request's field at fault (``csr`` or ``certificate``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class DeviceAuth(StrEnum):
    """How a device authenticates to the broker."""

    PASSWORD = "password"  # noqa: S105 - the name of a method, not a secret
    CERTIFICATE = "certificate"


@dataclass(frozen=True)
class CertificateRequest:
    """What a device enrols with: a CSR (its key pair made on the device), or a certificate
    its brand's factory CA issued (Galvani certifies the same key). Exactly one is set."""

    csr: str | None = None
    factory_certificate: str | None = None


@dataclass(frozen=True)
class IssuedCertificate:
    """A certificate Galvani's device CA issued to a device, as recorded."""

    device_id: str
    pem: str
    serial: int
    fingerprint: str
    not_before: datetime
    not_after: datetime
    authority_id: int | None


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
    password = new_device_password()
    _insert_device(
        conn, device_id, brand_id, model, user_id, hash_password(password), DeviceAuth.PASSWORD
    )
    return ProvisionedDevice(device_id=device_id, password=password)


def provision_certificate_device(
    conn: Conn,
    authority: pki.Authority,
    request: CertificateRequest,
    *,
    device_id: str,
    brand_id: str,
    model: str,
    user_id: str | None = None,
    days: int = pki.DEVICE_DAYS,
) -> IssuedCertificate:
    """Create a device that authenticates with a certificate, and its first certificate, in
    the caller's transaction. It has no password: the device listener refuses it."""
    # The request is judged before the device is written: a refused one leaves nothing.
    certificate, authority_id = _certificate_for(
        conn, authority, request, device_id, brand_id, days
    )
    _insert_device(conn, device_id, brand_id, model, user_id, None, DeviceAuth.CERTIFICATE)
    return _record(conn, device_id, certificate, authority_id)


def renew_certificate(
    conn: Conn,
    authority: pki.Authority,
    request: CertificateRequest,
    *,
    device_id: str,
    brand_id: str,
    days: int = pki.DEVICE_DAYS,
) -> IssuedCertificate:
    """A new certificate for a certificate device of the brand (the caller has checked it
    exists, is the brand's, and is active); the ones it has stay valid until they expire."""
    certificate, authority_id = _certificate_for(
        conn, authority, request, device_id, brand_id, days
    )
    return _record(conn, device_id, certificate, authority_id)


def _insert_device(
    conn: Conn,
    device_id: str,
    brand_id: str,
    model: str,
    user_id: str | None,
    credential_hash: str | None,
    auth: "DeviceAuth",
) -> None:
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
    try:
        with conn.transaction():
            # Inside the savepoint: a brand that does not exist fails the user's row first.
            if user_id is not None:
                conn.execute(
                    "INSERT INTO users (brand_id, id) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                    [brand_id, user_id],
                )
            conn.execute(
                "INSERT INTO devices (id, brand_id, model, user_id, credential_hash, auth)"
                " VALUES (%s, %s, %s, %s, %s, %s)",
                [device_id, brand_id, model, user_id, credential_hash, auth.value],
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


def _certificate_for(
    conn: Conn,
    authority: pki.Authority,
    request: CertificateRequest,
    device_id: str,
    brand_id: str,
    days: int,
) -> tuple[x509.Certificate, int | None]:
    """Galvani's certificate for the request, and the brand authority that vouched for the
    key (None for a CSR)."""
    if request.csr is not None:
        try:
            return authority.sign_device_csr(request.csr, device_id, days=days), None
        except pki.CertificateError as exc:
            raise CertificateRefusedError("csr", str(exc)) from None
    if request.factory_certificate is None:
        raise CertificateRefusedError("csr", "send a CSR or a factory certificate")
    factory, authority_id = _vouched(conn, request.factory_certificate, device_id, brand_id)
    public_key = factory.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
        public_key.curve, ec.SECP256R1 | ec.SECP384R1
    ):
        raise CertificateRefusedError(
            "certificate", "the factory certificate's key must be EC P-256 or P-384"
        )
    return authority.issue_client(device_id, public_key, days=days), authority_id


def check_readable(request: CertificateRequest) -> None:
    """Refuse a CSR or factory certificate that is not readable PEM (or a CSR whose
    self-signature fails): the checks that need neither the device CA nor the database."""
    if request.csr is not None:
        try:
            pki.load_csr(request.csr)
        except pki.CertificateError as exc:
            raise CertificateRefusedError("csr", str(exc)) from None
    elif request.factory_certificate is not None:
        load_factory_certificate(request.factory_certificate)


def load_factory_certificate(certificate_pem: str) -> x509.Certificate:
    """A factory certificate from PEM, or CertificateRefusedError naming ``certificate``."""
    try:
        return x509.load_pem_x509_certificate(certificate_pem.encode())
    except ValueError as exc:
        raise CertificateRefusedError("certificate", f"not a PEM certificate: {exc}") from None


def _vouched(
    conn: Conn, factory_pem: str, device_id: str, brand_id: str
) -> tuple[x509.Certificate, int]:
    """The factory certificate, checked to name ``device_id``, to be a current end-entity
    certificate, and to be signed by one of the brand's registered authorities (whose id)."""
    factory = load_factory_certificate(factory_pem)
    named = pki.common_name(factory)
    if named != device_id:
        raise CertificateRefusedError(
            "certificate",
            f"the factory certificate's CN is {named!r}, not the device id {device_id!r}",
        )
    try:
        constraints = factory.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is not None and constraints.ca:
        raise CertificateRefusedError(
            "certificate", "the factory certificate is a CA, not a device's certificate"
        )
    now = datetime.now(UTC)
    if factory.not_valid_after_utc <= now or factory.not_valid_before_utc > now + pki.CLOCK_SKEW:
        raise CertificateRefusedError(
            "certificate", "the factory certificate is not valid now (expired or not yet valid)"
        )
    rows = conn.execute(
        "SELECT id, certificate FROM brand_device_authorities"
        " WHERE brand_id = %s AND removed_at IS NULL AND not_after > now() ORDER BY id",
        [brand_id],
    ).fetchall()
    for authority_id, authority_pem in rows:
        issuer = x509.load_pem_x509_certificate(str(authority_pem).encode())
        try:
            factory.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return factory, int(str(authority_id))
    raise CertificateRefusedError(
        "certificate",
        "the factory certificate is not signed by any of the brand's device authorities: "
        "register the CA that signed it with POST /v1/device-authorities",
    )


def _record(
    conn: Conn, device_id: str, certificate: x509.Certificate, authority_id: int | None
) -> IssuedCertificate:
    issued = IssuedCertificate(
        device_id=device_id,
        pem=pki.pem(certificate).decode(),
        serial=certificate.serial_number,
        fingerprint=pki.fingerprint(certificate),
        not_before=certificate.not_valid_before_utc,
        not_after=certificate.not_valid_after_utc,
        authority_id=authority_id,
    )
    conn.execute(
        "INSERT INTO device_certificates (device_id, serial, fingerprint, not_before,"
        " not_after, authority_id) VALUES (%s, %s, %s, %s, %s, %s)",
        [
            device_id,
            Decimal(issued.serial),
            issued.fingerprint,
            issued.not_before,
            issued.not_after,
            authority_id,
        ],
    )
    return issued


def revoke_device(conn: Conn, device_id: str) -> bool:
    """Remove the device's credentials (its password hash, and its certificates: marked
    revoked) and mark it decommissioned; False if unknown."""
    row = conn.execute(
        "UPDATE devices SET credential_hash = NULL,"
        " decommissioned_at = coalesce(decommissioned_at, now()), online = false"
        " WHERE id = %s RETURNING id",
        [device_id],
    ).fetchone()
    conn.execute(
        "UPDATE device_certificates SET revoked_at = now()"
        " WHERE device_id = %s AND revoked_at IS NULL",
        [device_id],
    )
    return row is not None


def revoked_certificates(conn: Conn) -> list[tuple[int, datetime]]:
    """Every revoked certificate Galvani's device CA issued that has not expired (a day's
    margin for clocks): (serial, revoked at). An expired certificate is refused for its
    expiry, so leaving it out keeps the list as long as the live revocations only."""
    return (
        conn.cursor(row_factory=args_row(_revoked))
        .execute(
            "SELECT serial, revoked_at FROM device_certificates WHERE revoked_at IS NOT NULL"
            " AND not_after > now() - interval '1 day' ORDER BY serial"
        )
        .fetchall()
    )


def _revoked(serial: Decimal, revoked_at: datetime) -> tuple[int, datetime]:
    return int(serial), revoked_at


def publish_revocations(conn: Conn, authority: pki.Authority, trust: pki.TrustDirectory) -> Path:
    """Write the device CA's revocation list of every revoked certificate into the broker's
    trust directory (after the revocations committed), in the caller's transaction.

    One writer at a time across API processes (a transaction-scoped advisory lock): the list
    with the highest number is the one OpenSSL uses, so a list read before another
    revocation committed must not be written after the list that names it."""
    conn.execute("SELECT pg_advisory_xact_lock(hashtextextended('galvani-device-crl', 0))")
    return trust.publish_revocations(authority, revoked_certificates(conn))
