"""Galvani's certificates: authorities, server certificates, device certificates from CSRs,
revocation lists, and the hashed trust directory the broker reads them from.

Keys are ECDSA P-256 and signatures SHA-256: what every TLS stack on a device's MQTT client
(mbedTLS, wolfSSL, BearSSL, OpenSSL) verifies, at a fraction of RSA's handshake cost.

The trust directory is OpenSSL's ``capath`` layout: each authority as ``<hash>.<n>`` and each
revocation list as ``<hash>.r<n>``, ``<hash>`` being OpenSSL's subject-name hash
(:func:`subject_hash`). OpenSSL looks certificates up there by subject when a handshake needs
them and, for revocation lists, looks again on every handshake for a file with a higher
``r<n>`` suffix than it has loaded. So a newly trusted authority and a new revocation list
take effect for the next connection, without restarting the broker (Mosquitto 2.0 reloads
neither its ``cafile`` nor its ``crlfile`` on SIGHUP).
"""

import datetime as dt
import hashlib
import ipaddress
import os
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# The host names every locally issued server certificate names, so that clients verifying the
# host name accept it however they address the loopback interface.
LOOPBACK_NAMES: Final = ("localhost", "127.0.0.1", "::1")
AUTHORITY_DAYS: Final = 10 * 365
SERVER_DAYS: Final = 2 * 365
DEVICE_DAYS: Final = 365
# A revocation list's nextUpdate: OpenSSL refuses every certificate of an authority whose
# newest list has expired (X509_V_ERR_CRL_HAS_EXPIRED), so lists are re-issued well before.
CRL_DAYS: Final = 30
CLOCK_SKEW: Final = dt.timedelta(minutes=5)  # notBefore is backdated by this much


class CertificateError(ValueError):
    """A CSR, certificate or authority Galvani will not accept; the message says why."""


@dataclass(frozen=True)
class Authority:
    """A certificate authority Galvani holds the key of."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def create(cls, common_name: str, *, days: int = AUTHORITY_DAYS) -> "Authority":
        """A new self-signed authority allowed to sign certificates and revocation lists."""
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = _now()
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        return cls(certificate, key)

    @classmethod
    def load(cls, certificate_path: Path, key_path: Path) -> "Authority":
        """An authority saved by :meth:`save`."""
        certificate = x509.load_pem_x509_certificate(certificate_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CertificateError(f"{key_path} is not an EC private key")
        return cls(certificate, key)

    def save(self, certificate_path: Path, key_path: Path) -> None:
        """Write the certificate (world-readable) and the key (owner-only), atomically."""
        write_file(certificate_path, pem(self.certificate), mode=0o644)
        write_file(key_path, private_pem(self.key), mode=0o600)

    def issue_server(
        self, hosts: Iterable[str] = LOOPBACK_NAMES, *, days: int = SERVER_DAYS
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        """A server certificate and its new key, valid for ``hosts`` (names or addresses)."""
        hosts = list(hosts)
        key = ec.generate_private_key(ec.SECP256R1())
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = self._leaf(hosts[0], key.public_key(), days).add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(self.key, hashes.SHA256()), key

    def issue_client(
        self,
        common_name: str,
        public_key: ec.EllipticCurvePublicKey,
        *,
        days: int = DEVICE_DAYS,
        not_before: dt.datetime | None = None,
    ) -> x509.Certificate:
        """A client certificate for ``public_key`` whose CN is ``common_name``."""
        builder = self._leaf(common_name, public_key, days, not_before=not_before)
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        return builder.sign(self.key, hashes.SHA256())

    def sign_device_csr(
        self, csr_pem: str, device_id: str, *, days: int = DEVICE_DAYS
    ) -> x509.Certificate:
        """The device certificate for a CSR: CN ``device_id``, whatever the CSR asked for.

        The CSR must be well-formed PEM, carry a valid self-signature (proof that the device
        holds the private key) and an EC P-256 or RSA (2048 bits or more) public key; its
        subject, if it names a CN, must name ``device_id``.
        """
        csr = load_csr(csr_pem)
        requested = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if requested and requested[0].value != device_id:
            raise CertificateError(
                f"the CSR's CN is {requested[0].value!r}, not the device id {device_id!r}"
            )
        public_key = csr.public_key()
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            if not isinstance(public_key.curve, ec.SECP256R1 | ec.SECP384R1):
                raise CertificateError("the CSR's EC key must be on P-256 or P-384")
        else:
            if not isinstance(public_key, rsa.RSAPublicKey) or public_key.key_size < 2048:
                raise CertificateError("the CSR's key must be EC P-256/P-384 or RSA ≥ 2048 bits")
        builder = self._leaf(device_id, public_key, days).add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        return builder.sign(self.key, hashes.SHA256())

    def revocation_list(
        self,
        revoked: Iterable[tuple[int, dt.datetime]],
        *,
        after: dt.datetime | None = None,
        days: int = CRL_DAYS,
    ) -> x509.CertificateRevocationList:
        """A revocation list naming each (serial number, revoked at).

        OpenSSL uses, of the lists it holds for an authority, one whose lastUpdate has
        passed, the later one on a tie of that test, and keeps the one it has on equal
        lastUpdates (whole seconds). So the list is dated CLOCK_SKEW ago, or a second after
        ``after`` (the previous list's lastUpdate) if that is later: a burst of revocations
        dates lists a second apart, and only a burst of over CLOCK_SKEW's worth of seconds
        would date one ahead of the clock, to be used once the clock reaches it."""
        last_update = _now() - CLOCK_SKEW
        if after is not None and last_update <= after:
            last_update = after + dt.timedelta(seconds=1)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.certificate.subject)
            .last_update(last_update)
            .next_update(last_update + dt.timedelta(days=days))
        )
        for serial, revoked_at in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(revoked_at)
                .build()
            )
        return builder.sign(self.key, hashes.SHA256())

    def _leaf(
        self,
        common_name: str,
        public_key: object,
        days: int,
        *,
        not_before: dt.datetime | None = None,
    ) -> x509.CertificateBuilder:
        start = not_before or (_now() - CLOCK_SKEW)
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.certificate.subject)
            .public_key(public_key)  # type: ignore[arg-type]
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )


def new_device_key() -> ec.EllipticCurvePrivateKey:
    """A device's private key (P-256), as a device would make its own."""
    return ec.generate_private_key(ec.SECP256R1())


def device_csr(key: ec.EllipticCurvePrivateKey, device_id: str) -> str:
    """A PEM CSR for ``key`` with CN ``device_id``: what a device sends to enrol."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def load_csr(csr_pem: str) -> x509.CertificateSigningRequest:
    """A CSR from PEM, or CertificateError if it is malformed or its signature is wrong."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode())
    except ValueError as exc:
        raise CertificateError(f"not a PEM certificate signing request: {exc}") from None
    if not csr.is_signature_valid:
        raise CertificateError("the CSR's signature does not verify against its own key")
    return csr


def load_authority_certificate(certificate_pem: str) -> x509.Certificate:
    """A brand's own device CA certificate (PEM), checked to be a CA that is valid now."""
    try:
        certificate = x509.load_pem_x509_certificate(certificate_pem.encode())
    except ValueError as exc:
        raise CertificateError(f"not a PEM certificate: {exc}") from None
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    except x509.ExtensionNotFound:
        raise CertificateError("the certificate has no basicConstraints: not a CA") from None
    if not constraints.value.ca:
        raise CertificateError("the certificate is not a CA (basicConstraints CA:FALSE)")
    now = _now()
    if certificate.not_valid_after_utc <= now:
        raise CertificateError("the CA certificate has expired")
    if certificate.not_valid_before_utc > now + CLOCK_SKEW:
        raise CertificateError("the CA certificate is not valid yet")
    return certificate


def load_revocation_list(crl_pem: str, issuer: x509.Certificate) -> x509.CertificateRevocationList:
    """A revocation list (PEM) that ``issuer`` signed, or CertificateError."""
    try:
        crl = x509.load_pem_x509_crl(crl_pem.encode())
    except ValueError as exc:
        raise CertificateError(f"not a PEM revocation list: {exc}") from None
    if crl.issuer != issuer.subject:
        raise CertificateError("the revocation list was issued by another authority")
    public_key = issuer.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise CertificateError("the authority's key type cannot sign revocation lists here")
    if not crl.is_signature_valid(public_key):
        raise CertificateError("the revocation list's signature does not verify")
    return crl


def common_name(certificate: x509.Certificate) -> str | None:
    """The certificate's subject CN, if it has one."""
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = names[0].value if names else None
    return value if isinstance(value, str) else None


def fingerprint(certificate: x509.Certificate) -> str:
    """The certificate's SHA-256 fingerprint, lowercase hex."""
    return certificate.fingerprint(hashes.SHA256()).hex()


def pem(item: x509.Certificate | x509.CertificateRevocationList) -> bytes:
    """PEM text of a certificate or revocation list."""
    return item.public_bytes(serialization.Encoding.PEM)


def private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Unencrypted PKCS#8 PEM of a private key (kept in owner-only files)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_file(path: Path, data: bytes, *, mode: int) -> None:
    """Write ``data`` to ``path`` atomically with ``mode``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)


# ---- OpenSSL's hashed directory -------------------------------------------------------------

# The string types OpenSSL canonicalises in a name before hashing it (ASN1_MASK_CANON in
# crypto/x509/x_name.c); values of other types are hashed as they are encoded.
_CANONICAL_TYPES: Final = frozenset(
    {
        x509.name._ASN1Type.UTF8String,
        x509.name._ASN1Type.BMPString,
        x509.name._ASN1Type.UniversalString,
        x509.name._ASN1Type.PrintableString,
        x509.name._ASN1Type.T61String,
        x509.name._ASN1Type.IA5String,
        x509.name._ASN1Type.VisibleString,
    }
)
_WHITESPACE: Final = re.compile(r"[ \t\n\v\f\r]+")


def subject_hash(name: x509.Name) -> str:
    """OpenSSL's hash of ``name`` (``openssl x509 -subject_hash``): the first four bytes of
    the SHA-1 of its canonical encoding, read little-endian, as eight hex digits."""
    digest = hashlib.sha1(_canonical_name(name)).digest()  # noqa: S324 - OpenSSL's name hash
    return f"{int.from_bytes(digest[:4], 'little'):08x}"


def _canonical_name(name: x509.Name) -> bytes:
    """The canonical encoding OpenSSL hashes (x509_name_canon): each RDN as a DER SET of its
    attributes, string values as lowercased UTF8String with whitespace trimmed and collapsed,
    concatenated without the outer SEQUENCE."""
    out = bytearray()
    for rdn in name.rdns:
        attributes = bytearray()
        for attribute in rdn:
            oid = _der(0x06, _oid_body(attribute.oid.dotted_string))
            value = attribute.value
            asn1_type = attribute._type  # the encoding the name carries
            if asn1_type in _CANONICAL_TYPES and isinstance(value, str):
                text = _WHITESPACE.sub(" ", value.strip(" \t\n\v\f\r"))
                lowered = "".join(c.lower() if c.isascii() else c for c in text)
                encoded = _der(0x0C, lowered.encode())
            else:
                raw = value if isinstance(value, bytes) else str(value).encode()
                encoded = _der(asn1_type.value, raw)
            attributes += _der(0x30, oid + encoded)
        out += _der(0x31, bytes(attributes))
    return bytes(out)


def _der(tag: int, body: bytes) -> bytes:
    length = len(body)
    if length < 0x80:
        return bytes([tag, length]) + body
    size = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + body


def _oid_body(dotted: str) -> bytes:
    first, second, *rest = (int(part) for part in dotted.split("."))
    out = bytearray()
    for arc in [first * 40 + second, *rest]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        out += bytes(reversed(chunk))
    return bytes(out)


class TrustDirectory:
    """An OpenSSL hashed directory of authorities and their revocation lists (``capath``)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def trust(self, certificate: x509.Certificate) -> Path:
        """Add an authority (idempotent); its file."""
        self.directory.mkdir(parents=True, exist_ok=True)
        prefix = subject_hash(certificate.subject)
        data = pem(certificate)
        index = 0
        while (path := self.directory / f"{prefix}.{index}").exists():
            if path.read_bytes() == data:
                return path
            index += 1
        write_file(path, data, mode=0o644)
        return path

    def publish_revocations(
        self, authority: Authority, revoked: Iterable[tuple[int, dt.datetime]]
    ) -> Path:
        """Write ``authority``'s revocation list naming ``revoked`` (serial, revoked at) as
        the next ``<hash>.r<n>``: OpenSSL loads it on the next handshake that needs the
        authority's list and prefers it, being later, to the ones it has. Older files stay
        (a few hundred bytes each) so that the numbering only rises."""
        self.directory.mkdir(parents=True, exist_ok=True)
        newest = self._newest_revocation_file(authority)
        after = None
        if newest is not None:
            after = x509.load_pem_x509_crl(newest[1].read_bytes()).last_update_utc
        crl = authority.revocation_list(revoked, after=after)
        index = newest[0] + 1 if newest is not None else 0
        path = self.directory / f"{subject_hash(authority.certificate.subject)}.r{index}"
        write_file(path, pem(crl), mode=0o644)
        return path

    def newest_revocations(self, authority: Authority) -> x509.CertificateRevocationList | None:
        """``authority``'s highest-numbered list here (the one OpenSSL uses), or None."""
        newest = self._newest_revocation_file(authority)
        return None if newest is None else x509.load_pem_x509_crl(newest[1].read_bytes())

    def _newest_revocation_file(self, authority: Authority) -> tuple[int, Path] | None:
        prefix = subject_hash(authority.certificate.subject)
        numbered = [
            (int(suffix), path)
            for path in self.directory.glob(f"{prefix}.r*")
            if (suffix := path.name.rsplit(".r", 1)[1]).isdigit()
        ]
        return max(numbered) if numbered else None


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)
