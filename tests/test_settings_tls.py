"""Every service's broker connection is TLS with verification on outside development.

The settings refuse ``mqtt_tls=False`` in production, naming the setting; in development it
is allowed (a plaintext listener) and gives no context. The context they give verifies the
broker: its certificate against ``mqtt_ca_file`` and its host name, checked here with an
in-memory handshake against a server presenting certificates of the right and wrong kinds.
"""

import os
import ssl
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from services.api.settings import ApiSettings
from services.common import pki
from services.common.tls import server_context
from services.ingest.settings import IngestSettings
from services.maintenance.settings import MaintenanceSettings
from services.rules.settings import RulesSettings

DATABASE_URL = "postgresql://galvani_x:a-real-secret@127.0.0.1/galvani"
BROKER_PASSWORD = "a-real-broker-secret"  # not a known default

SETTINGS = [ApiSettings, IngestSettings, RulesSettings, MaintenanceSettings]
AnySettings = ApiSettings | IngestSettings | RulesSettings | MaintenanceSettings


def make(cls: type[AnySettings], **values: Any) -> AnySettings:
    if cls is ApiSettings:
        # The API's own HTTPS is another setting, refused off in production on its own.
        values.setdefault("tls_offloaded", True)
    return cls(database_url=DATABASE_URL, mqtt_password=BROKER_PASSWORD, **values)


@pytest.fixture(autouse=True)
def no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The settings under test are only what each test passes."""
    for name in list(os.environ):
        if name.startswith("GALVANI_"):
            monkeypatch.delenv(name)


@pytest.fixture
def authority(tmp_path: Path) -> tuple[pki.Authority, Path]:
    authority = pki.Authority.create("settings-test-ca")
    ca_file = tmp_path / "ca.pem"
    authority.save(ca_file, tmp_path / "ca.key")
    return authority, ca_file


@pytest.mark.parametrize("cls", SETTINGS)
def test_plaintext_to_the_broker_is_refused_in_production_naming_the_setting(
    cls: type[AnySettings],
) -> None:
    with pytest.raises(ValidationError, match="mqtt_tls is off"):
        make(cls, environment="production", mqtt_tls=False)


@pytest.mark.parametrize("cls", SETTINGS)
def test_plaintext_to_the_broker_is_allowed_in_development_without_a_context(
    cls: type[AnySettings],
) -> None:
    settings = make(cls, environment="development", mqtt_tls=False)
    assert settings.mqtt_tls_context() is None


@pytest.mark.parametrize("cls", SETTINGS)
def test_tls_is_the_default_and_its_context_verifies_certificate_and_host_name(
    cls: type[AnySettings], authority: tuple[pki.Authority, Path]
) -> None:
    _, ca_file = authority
    settings = make(cls, environment="production", mqtt_ca_file=ca_file)
    assert settings.mqtt_tls
    context = settings.mqtt_tls_context()
    assert context is not None
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert [c["subject"] for c in context.get_ca_certs()] == [
        ((("commonName", "settings-test-ca"),),)
    ]


def handshake(client: ssl.SSLContext, server: ssl.SSLContext, server_name: str) -> None:
    """A TLS handshake between the two contexts in memory; raises what the client raises."""
    client_in, client_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    server_in, server_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    client_side = client.wrap_bio(client_in, client_out, server_hostname=server_name)
    server_side = server.wrap_bio(server_in, server_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(10):
        for name, side, out, peer_in in (
            ("client", client_side, client_out, server_in),
            ("server", server_side, server_out, client_in),
        ):
            if not done[name]:
                try:
                    side.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLError:
                    if name == "client":
                        raise
                    done[name] = True  # the server's failure shows in the client's next step
            peer_in.write(out.read())
        if all(done.values()):
            return
    raise AssertionError("the handshake did not finish")


def server_of(tmp_path: Path, issuer: pki.Authority, hosts: tuple[str, ...]) -> ssl.SSLContext:
    certificate, key = issuer.issue_server(hosts)
    cert_file, key_file = tmp_path / "server.pem", tmp_path / "server.key"
    pki.write_file(cert_file, pki.pem(certificate), mode=0o644)
    pki.write_file(key_file, pki.private_pem(key), mode=0o600)
    return server_context(cert_file, key_file)


@pytest.mark.parametrize("cls", [IngestSettings, MaintenanceSettings])
def test_the_context_accepts_only_the_trusted_ca_for_the_right_host(
    cls: type[AnySettings], authority: tuple[pki.Authority, Path], tmp_path: Path
) -> None:
    issuer, ca_file = authority
    context = make(cls, environment="production", mqtt_ca_file=ca_file).mqtt_tls_context()
    assert context is not None

    handshake(context, server_of(tmp_path, issuer, pki.LOOPBACK_NAMES), "127.0.0.1")

    stranger = pki.Authority.create("another-ca")
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
        handshake(context, server_of(tmp_path, stranger, pki.LOOPBACK_NAMES), "127.0.0.1")
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        handshake(context, server_of(tmp_path, issuer, ("broker.example.com",)), "127.0.0.1")
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        handshake(context, server_of(tmp_path, issuer, pki.LOOPBACK_NAMES), "broker.example.com")
