"""The PKI helpers: CSR signing rules, and the hashed trust directory OpenSSL (and so the
broker) reads authorities and revocation lists from, checked with real TLS handshakes."""

import datetime as dt
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import NameOID

from services.common import pki
from services.common.tls import client_context, server_context
from tests.tls import handshake


def _write_pair(directory: Path, name: str, cert: x509.Certificate, key: object) -> Path:
    (directory / f"{name}.pem").write_bytes(pki.pem(cert))
    (directory / f"{name}.key").write_bytes(pki.private_pem(key))  # type: ignore[arg-type]
    return directory / f"{name}.pem"


def test_the_subject_hash_is_the_one_openssl_looks_up(tmp_path: Path) -> None:
    """A client trusting only the hashed directory verifies a server whose CA has a name
    OpenSSL must canonicalise (case, runs of spaces, a non-ASCII letter, a PrintableString)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "DE"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "  Ünïcode   Brand GmbH "),
            x509.NameAttribute(
                NameOID.ORGANIZATIONAL_UNIT_NAME, "Fab  A", _ASN1Type.PrintableString
            ),
            x509.NameAttribute(NameOID.COMMON_NAME, "Factory CA"),
        ]
    )
    now = dt.datetime.now(dt.UTC)
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    authority = pki.Authority(ca_cert, key)
    cert, cert_key = authority.issue_server()
    server = server_context(
        _write_pair(tmp_path, "server", cert, cert_key), tmp_path / "server.key"
    )
    trust = pki.TrustDirectory(tmp_path / "trust")
    path = trust.trust(ca_cert)
    assert trust.trust(ca_cert) == path  # idempotent

    client = ssl.create_default_context(capath=str(tmp_path / "trust"))
    handshake(server, client)

    stranger = ssl.create_default_context(
        cafile=str(_write_pair(tmp_path, "other", pki.Authority.create("Other").certificate, key))
    )
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(server, stranger)


def test_a_new_revocation_list_is_read_on_the_nexthandshake(tmp_path: Path) -> None:
    """The mechanism the broker's certificate listener rests on: a server context that
    checks revocation from the hashed directory refuses a client certificate revoked after
    the context was made, and keeps accepting the others."""
    server_ca = pki.Authority.create("Galvani server CA")
    device_ca = pki.Authority.create("Galvani device CA")
    cert, key = server_ca.issue_server()
    trust = pki.TrustDirectory(tmp_path / "trust")
    trust.trust(device_ca.certificate)
    trust.publish_revocations(device_ca, [])
    server = server_context(_write_pair(tmp_path, "server", cert, key), tmp_path / "server.key")
    server.load_verify_locations(capath=str(tmp_path / "trust"))
    server.verify_mode = ssl.CERT_REQUIRED
    server.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    ca_file = tmp_path / "server-ca.pem"
    ca_file.write_bytes(pki.pem(server_ca.certificate))

    def device(device_id: str) -> tuple[ssl.SSLContext, x509.Certificate]:
        device_key = pki.new_device_key()
        certificate = device_ca.sign_device_csr(pki.device_csr(device_key, device_id), device_id)
        path = _write_pair(tmp_path, device_id, certificate, device_key)
        return client_context(
            ca_file, cert_file=path, key_file=tmp_path / f"{device_id}.key"
        ), certificate

    revoked_ctx, revoked = device("dev-a")
    kept_ctx, _ = device("dev-b")
    handshake(server, revoked_ctx)
    handshake(server, kept_ctx)

    trust.publish_revocations(device_ca, [(revoked.serial_number, dt.datetime.now(dt.UTC))])
    with pytest.raises((ssl.SSLError, OSError)):
        handshake(server, revoked_ctx)
    handshake(server, kept_ctx)


def test_a_csr_becomes_a_client_certificate_for_the_device_id() -> None:
    authority = pki.Authority.create("Galvani device CA")
    key = pki.new_device_key()
    certificate = authority.sign_device_csr(pki.device_csr(key, "dev-1"), "dev-1", days=90)
    assert pki.common_name(certificate) == "dev-1"
    assert certificate.issuer == authority.certificate.subject
    assert certificate.public_key() == key.public_key()
    usage = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]
    lifetime = certificate.not_valid_after_utc - certificate.not_valid_before_utc
    assert lifetime == dt.timedelta(days=90)


def test_a_csr_naming_another_device_is_refused() -> None:
    authority = pki.Authority.create("Galvani device CA")
    csr = pki.device_csr(pki.new_device_key(), "dev-2")
    with pytest.raises(pki.CertificateError, match="not the device id"):
        authority.sign_device_csr(csr, "dev-1")


def test_a_csr_that_is_not_pem_or_has_a_weak_key_is_refused() -> None:
    authority = pki.Authority.create("Galvani device CA")
    with pytest.raises(pki.CertificateError, match="not a PEM"):
        authority.sign_device_csr("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n", "dev-1")
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 - refused
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev-1")]))
        .sign(weak, hashes.SHA256())
    )
    pem_csr = csr.public_bytes(serialization.Encoding.PEM).decode()
    with pytest.raises(pki.CertificateError, match="2048"):
        authority.sign_device_csr(pem_csr, "dev-1")


def test_only_a_current_ca_certificate_is_accepted_as_a_brand_authority() -> None:
    authority = pki.Authority.create("Brand factory CA")
    assert pki.load_authority_certificate(pki.pem(authority.certificate).decode())
    leaf = authority.issue_client("dev-1", pki.new_device_key().public_key())
    with pytest.raises(pki.CertificateError, match="not a CA"):
        pki.load_authority_certificate(pki.pem(leaf).decode())
