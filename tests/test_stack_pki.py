"""The development PKI: made once, reused, renewed before it expires."""

import datetime as dt
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509

from deploy.stack.errors import SetupError
from deploy.stack.pki import DevelopmentPKI
from services.common import pki
from services.common.tls import client_context, server_context
from tests.tls import handshake


def _files(paths: DevelopmentPKI) -> dict[str, bytes]:
    return {
        name: path.read_bytes()
        for name, path in vars(paths).items()
        if isinstance(path, Path) and path.is_file()
    }


def test_ensure_makes_a_pki_whose_server_certificate_clients_verify(tmp_path: Path) -> None:
    """Every file exists, keys are owner-only, and a client trusting ca.pem verifies the
    server certificate for each loopback name."""
    paths = DevelopmentPKI.ensure(tmp_path / "pki")
    for path in (paths.ca_file, paths.server_cert, paths.device_ca_cert, paths.initial_crl):
        assert path.is_file()
    for key in paths.key_files():
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    server = server_context(paths.server_cert, paths.server_key)
    for host in pki.LOOPBACK_NAMES[:2]:
        handshake(server, client_context(paths.ca_file), host)
    device_ca = paths.device_authority()
    trusted = [x509.load_pem_x509_certificate(p.read_bytes()) for p in paths.trust_dir.glob("*.0")]
    assert [c.subject for c in trusted] == [device_ca.certificate.subject]
    crl = x509.load_pem_x509_crl(paths.initial_crl.read_bytes())
    assert crl.issuer == device_ca.certificate.subject
    assert crl.is_signature_valid(device_ca.certificate.public_key())  # type: ignore[arg-type]
    assert len(crl) == 0


def test_the_device_ca_is_not_the_server_ca(tmp_path: Path) -> None:
    """A client trusting only the device CA refuses the server certificate."""
    paths = DevelopmentPKI.ensure(tmp_path / "pki")
    server = server_context(paths.server_cert, paths.server_key)
    try:
        handshake(server, client_context(paths.device_ca_cert), "127.0.0.1")
    except ssl.SSLCertVerificationError:
        return
    raise AssertionError("a client trusting the device CA verified the server certificate")


def test_a_second_ensure_reuses_every_file(tmp_path: Path) -> None:
    first = _files(DevelopmentPKI.ensure(tmp_path / "pki"))
    second = _files(DevelopmentPKI.ensure(tmp_path / "pki"))
    assert second == first
    assert len(list((tmp_path / "pki" / "trust").iterdir())) == 2  # the CA and one list


def test_a_server_certificate_near_its_expiry_is_issued_again(tmp_path: Path) -> None:
    """Within 30 days of its expiry the server certificate is replaced, by the same CA."""
    paths = DevelopmentPKI.ensure(tmp_path / "pki")
    authority = paths.server_authority()
    old, key = authority.issue_server(days=20)
    pki.write_file(paths.server_cert, pki.pem(old), mode=0o644)
    pki.write_file(paths.server_key, pki.private_pem(key), mode=0o600)
    before = _files(paths)
    DevelopmentPKI.ensure(tmp_path / "pki")
    after = _files(paths)
    assert after["server_cert"] != before["server_cert"]
    assert after["server_key"] != before["server_key"]
    assert after["ca_file"] == before["ca_file"]
    renewed = x509.load_pem_x509_certificate(after["server_cert"])
    assert renewed.not_valid_after_utc - dt.datetime.now(dt.UTC) > dt.timedelta(days=365)
    handshake(
        server_context(paths.server_cert, paths.server_key),
        client_context(paths.ca_file),
        "127.0.0.1",
    )


def test_a_revocation_list_near_its_expiry_is_renewed_naming_the_same_certificates(
    tmp_path: Path,
) -> None:
    paths = DevelopmentPKI.ensure(tmp_path / "pki")
    authority = paths.device_authority()
    revoked_at = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    # A list that expires in three days, as one published a month ago would.
    short = authority.revocation_list([(1234, revoked_at)], days=3)
    prefix = pki.subject_hash(authority.certificate.subject)
    pki.write_file(paths.trust_dir / f"{prefix}.r1", pki.pem(short), mode=0o644)
    DevelopmentPKI.ensure(tmp_path / "pki")
    newest = x509.load_pem_x509_crl((paths.trust_dir / f"{prefix}.r2").read_bytes())
    assert [(r.serial_number, r.revocation_date_utc) for r in newest] == [(1234, revoked_at)]
    assert newest.next_update_utc is not None
    assert newest.next_update_utc - dt.datetime.now(dt.UTC) > dt.timedelta(days=20)
    assert paths.initial_crl.read_bytes() == pki.pem(newest)


def test_an_operators_own_ca_and_server_certificate_are_used_as_they_are(tmp_path: Path) -> None:
    """A ca.pem and server certificate put in place without the CA's key are kept (never
    replaced by a development CA), and a server certificate that would need renewing without
    that key stops the start with a message saying what to do."""
    operator_ca = pki.Authority.create("Operator CA")
    certificate, key = operator_ca.issue_server()
    directory = tmp_path / "pki"
    directory.mkdir()
    (directory / "ca.pem").write_bytes(pki.pem(operator_ca.certificate))
    (directory / "server.pem").write_bytes(pki.pem(certificate))
    (directory / "server.key").write_bytes(pki.private_pem(key))
    paths = DevelopmentPKI.ensure(directory)
    assert paths.ca_file.read_bytes() == pki.pem(operator_ca.certificate)
    assert paths.server_cert.read_bytes() == pki.pem(certificate)
    assert not paths.ca_key.exists()

    paths.server_cert.unlink()
    with pytest.raises(SetupError, match=r"ca\.key is not there to issue another"):
        DevelopmentPKI.ensure(directory)
    assert paths.ca_file.read_bytes() == pki.pem(operator_ca.certificate)
