"""The device CA's revocation list is published again before it expires, by a task of the API
(issue 20): a list that expires soon is renewed naming the same revoked certificates, one far
from expiry is left alone, and the suite's broker keeps admitting a device certificate (and
refusing a revoked one) with the renewed list. The alert on its expiry is checked by promtool."""

import datetime as dt
import re
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from uuid import uuid4

import psycopg
import pytest
from cryptography import x509
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY, generate_latest
from sqlalchemy import Engine

from deploy.stack.mosquitto import MosquittoBroker
from deploy.stack.pki import DevelopmentPKI
from services.api.database import create_database_engine
from services.api.main import create_app
from services.api.revocation_renewal import newest_revocation_list, renew_if_due
from services.api.settings import ApiSettings
from services.common import pki, provisioning
from services.common.pki import CRL_DAYS
from services.common.tls import client_context
from tests.certificates import enrol_certificate_device
from tests.mqtt import MqttClient
from tests.promtool import RULES_DIR, check_rules, run_rule_tests

HOST = "127.0.0.1"
GAUGE = "galvani_api_device_crl_next_update_seconds"
DAY = dt.timedelta(days=1)


def _enrol(
    database_url: str,
    authority: pki.Authority,
    directory: Path,
    device_id: str,
    ca_file: Path | None = None,
) -> tuple[int, ssl.SSLContext | None]:
    """A certificate device in the test's database, enrolled from its own CSR as the API
    does; its certificate's serial and a client context presenting it."""
    device = enrol_certificate_device(database_url, authority, directory, device_id)
    if ca_file is None:
        return device.serial, None
    return device.serial, client_context(
        ca_file, cert_file=device.cert_file, key_file=device.key_file
    )


def _decommission(database_url: str, device_id: str) -> None:
    with psycopg.connect(database_url) as conn:
        assert provisioning.revoke_device(conn, device_id)


def _publish_list(
    trust_dir: Path, authority: pki.Authority, revoked: list[tuple[int, dt.datetime]], days: int
) -> Path:
    """Write a list valid ``days`` as the directory's next ``<hash>.r<n>``, as
    TrustDirectory.publish_revocations numbers and dates it (that one is always 30 days)."""
    prefix = pki.subject_hash(authority.certificate.subject)
    numbered = [
        int(suffix)
        for path in trust_dir.glob(f"{prefix}.r*")
        if (suffix := path.name.rsplit(".r", 1)[1]).isdigit()
    ]
    previous = newest_revocation_list(trust_dir, authority)
    crl = authority.revocation_list(
        revoked, after=None if previous is None else previous.last_update_utc, days=days
    )
    path = trust_dir / f"{prefix}.r{max(numbered, default=-1) + 1}"
    pki.write_file(path, pki.pem(crl), mode=0o644)
    return path


def _lists(trust_dir: Path) -> set[str]:
    return {p.name for p in trust_dir.glob("*.r*")}


def _serials(crl: x509.CertificateRevocationList | None) -> set[int]:
    assert crl is not None
    return {entry.serial_number for entry in crl}


def _expires_in(crl: x509.CertificateRevocationList | None) -> dt.timedelta:
    assert crl is not None
    assert crl.next_update_utc is not None
    return crl.next_update_utc - dt.datetime.now(dt.UTC)


def _gauge() -> float | None:
    return REGISTRY.get_sample_value(GAUGE)


@pytest.fixture
def authority(tmp_path: Path) -> pki.Authority:
    """A device CA of this test's own, with its files and a trust directory holding it."""
    ca = pki.Authority.create("renewal test device CA")
    ca.save(tmp_path / "device-ca.pem", tmp_path / "device-ca.key")
    pki.TrustDirectory(tmp_path / "trust").trust(ca.certificate)
    return ca


@pytest.fixture
def engine(api_database_url: str) -> Iterator[Engine]:
    engine = create_database_engine(api_database_url, pool_size=2, timeout_s=5)
    yield engine
    engine.dispose()


def _settings(api_database_url: str, tmp_path: Path, **overrides: object) -> ApiSettings:
    values: dict[str, object] = {
        "database_url": api_database_url,
        "mqtt_password": "x",
        "data_dir": tmp_path / "api",
        "device_ca_cert": tmp_path / "device-ca.pem",
        "device_ca_key": tmp_path / "device-ca.key",
        "trust_dir": tmp_path / "trust",
    }
    values.update(overrides)
    return ApiSettings(**values)  # type: ignore[arg-type]


def test_a_list_expiring_soon_is_renewed_with_the_same_revocations(
    database_url: str,
    api_database_url: str,
    engine: Engine,
    authority: pki.Authority,
    tmp_path: Path,
) -> None:
    trust_dir = tmp_path / "trust"
    device_id = f"crl-{uuid4().hex[:8]}"
    serial, _ = _enrol(database_url, authority, tmp_path, device_id)
    _decommission(database_url, device_id)
    revoked = [(serial, dt.datetime.now(dt.UTC))]
    _publish_list(trust_dir, authority, revoked, days=2)
    before = _lists(trust_dir)

    path = renew_if_due(_settings(api_database_url, tmp_path), engine)

    assert path is not None
    assert _lists(trust_dir) == before | {path.name}
    renewed = newest_revocation_list(trust_dir, authority)
    assert renewed is not None
    assert renewed.is_signature_valid(authority.key.public_key())
    assert _serials(renewed) == {serial}
    assert _expires_in(renewed) > dt.timedelta(days=pki.CRL_DAYS) - DAY
    assert renewed.next_update_utc is not None
    assert _gauge() == renewed.next_update_utc.timestamp()
    # Renewed: the next look leaves it alone.
    assert renew_if_due(_settings(api_database_url, tmp_path), engine) is None
    assert _lists(trust_dir) == before | {path.name}


def test_a_list_far_from_expiry_is_left_alone_and_its_expiry_is_the_gauge(
    api_database_url: str, engine: Engine, authority: pki.Authority, tmp_path: Path
) -> None:
    trust_dir = tmp_path / "trust"
    written = _publish_list(trust_dir, authority, [], days=pki.CRL_DAYS)
    # Default margin: 7 days before a list valid 30.
    assert renew_if_due(_settings(api_database_url, tmp_path), engine) is None
    assert _lists(trust_dir) == {written.name}
    crl = newest_revocation_list(trust_dir, authority)
    assert crl is not None
    assert crl.next_update_utc is not None
    assert _gauge() == crl.next_update_utc.timestamp()
    # With a margin longer than what is left, the same list is due.
    due = _settings(api_database_url, tmp_path, crl_renew_before_s=pki.CRL_DAYS * 86_400 - 1)
    assert renew_if_due(due, engine) is not None
    assert len(_lists(trust_dir)) == 2


def test_no_device_ca_means_nothing_is_written(
    api_database_url: str, engine: Engine, tmp_path: Path
) -> None:
    settings = _settings(api_database_url, tmp_path)  # no CA files in tmp_path
    assert renew_if_due(settings, engine) is None
    assert not (tmp_path / "trust").exists()


def test_the_margin_must_be_shorter_than_a_list_is_valid(
    api_database_url: str, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="crl_renew_before_s"):
        _settings(api_database_url, tmp_path, crl_renew_before_s=pki.CRL_DAYS * 86_400)


def _handshake(broker: MosquittoBroker, context: ssl.SSLContext | None) -> None:
    """Connect to the certificate listener as the certificate's device and disconnect."""
    MqttClient(HOST, broker.config.cert_port, None, None, tls=context).connect().close()


def _refused_as_revoked(broker: MosquittoBroker, context: ssl.SSLContext | None) -> None:
    """Over TLS 1.2, where the broker's alert arrives during the handshake."""
    assert context is not None
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    try:
        with (
            socket.create_connection((HOST, broker.config.cert_port), timeout=5) as raw,
            pytest.raises(ssl.SSLError, match="certificate revoked"),
        ):
            context.wrap_socket(raw, server_hostname=HOST).close()
    finally:
        context.maximum_version = ssl.TLSVersion.MAXIMUM_SUPPORTED


def test_the_lifespan_task_renews_the_broker_list_and_certificates_still_connect(
    database_url: str,
    api_database_url: str,
    broker: MosquittoBroker,
    pki: DevelopmentPKI,
    tmp_path: Path,
) -> None:
    authority = pki.device_authority()
    trust_dir = pki.trust_dir
    kept_id, gone_id = f"crlk-{uuid4().hex[:8]}", f"crlg-{uuid4().hex[:8]}"
    _, kept = _enrol(database_url, authority, tmp_path, kept_id, pki.ca_file)
    gone_serial, gone = _enrol(database_url, authority, tmp_path, gone_id, pki.ca_file)
    _decommission(database_url, gone_id)
    # The broker's newest list names the decommissioned device and expires in a day.
    _publish_list(trust_dir, authority, [(gone_serial, dt.datetime.now(dt.UTC))], days=1)
    _handshake(broker, kept)
    _refused_as_revoked(broker, gone)
    before = _lists(trust_dir)

    settings = ApiSettings(
        database_url=api_database_url,
        mqtt_password="x",
        data_dir=tmp_path / "api",
        device_ca_cert=pki.device_ca_cert,
        device_ca_key=pki.device_ca_key,
        trust_dir=trust_dir,
        crl_renew_interval_s=0.2,
    )
    with TestClient(create_app(settings)):
        deadline = time.monotonic() + 10
        while _lists(trust_dir) == before:
            assert time.monotonic() < deadline, "the API did not renew the expiring list"
            time.sleep(0.1)
        time.sleep(0.5)  # two more looks: the renewed list is not renewed again
        metrics = generate_latest(REGISTRY).decode()
    assert len(_lists(trust_dir) - before) == 1
    renewed = newest_revocation_list(trust_dir, authority)
    assert _serials(renewed) == {gone_serial}
    assert _expires_in(renewed) > dt.timedelta(days=CRL_DAYS) - DAY
    assert renewed is not None
    assert renewed.next_update_utc is not None
    exported = re.search(rf"^{GAUGE} (\S+)$", metrics, re.M)
    assert exported is not None
    assert float(exported.group(1)) == renewed.next_update_utc.timestamp()
    # The broker reads the renewed list at the next handshakes, without a restart.
    _handshake(broker, kept)
    _refused_as_revoked(broker, gone)


def test_the_expiry_alert_passes_promtool_and_reads_the_api_gauge() -> None:
    assert "SUCCESS: 1 rules found" in check_rules("galvani-api-alerts.yml")
    assert "SUCCESS" in run_rule_tests("galvani-api-alerts.test.yml")
    rules = (RULES_DIR / "galvani-api-alerts.yml").read_text()
    assert "alert: GalvaniRevocationListExpiring" in rules
    assert set(re.findall(r"galvani_api_\w+", rules)) == {GAUGE}
