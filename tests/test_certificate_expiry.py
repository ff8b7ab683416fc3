"""certificate_expiring: the rules' sweep (as the rules' database role) raises it for the
brand a set time before a device's newest certificate expires, once per certificate, and
resolves it when a newer certificate is issued or the device is decommissioned."""

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from services.common import pki, provisioning
from services.common.migrations.grants import ServiceRole
from services.common.signing import load_or_create_key
from services.rules.context import save_overrides
from services.rules.sweeps import sweep
from tests.roles import as_service
from tests.rules import alerts, setup_brand

DEV = "cert-0001"


@pytest.fixture
def key(tmp_path: Path) -> Any:
    return load_or_create_key(tmp_path / "secrets")


@pytest.fixture
def authority() -> pki.Authority:
    return pki.Authority.create("Test device CA")


@pytest.fixture
def not_after(database_url: str, authority: pki.Authority) -> datetime:
    """A certificate device of brand acme (and a password device); its certificate's expiry."""
    setup_brand(database_url, [])
    with psycopg.connect(database_url) as conn:
        issued = provisioning.provision_certificate_device(
            conn,
            authority,
            provisioning.CertificateRequest(csr=pki.device_csr(pki.new_device_key(), DEV)),
            device_id=DEV,
            brand_id="acme",
            model="glow-2",
        )
        provisioning.provision_device(conn, device_id="pass-0001", brand_id="acme", model="m")
    return issued.not_after


def _sweep(url: str, key: Any, now: datetime) -> None:
    with psycopg.connect(as_service(url, ServiceRole.RULES)) as conn, conn.transaction():
        sweep(conn, key, now)


def _renew(url: str, authority: pki.Authority, days: int) -> datetime:
    with psycopg.connect(url) as conn:
        return provisioning.renew_certificate(
            conn,
            authority,
            provisioning.CertificateRequest(csr=pki.device_csr(pki.new_device_key(), DEV)),
            device_id=DEV,
            brand_id="acme",
            days=days,
        ).not_after


def test_raised_30_days_before_expiry_once_and_resolved_by_a_newer_certificate(
    database_url: str, key: Any, not_after: datetime, authority: pki.Authority
) -> None:
    now = not_after - timedelta(days=29, hours=23)
    _sweep(database_url, key, now)
    _sweep(database_url, key, now + timedelta(hours=1))  # the same certificate counts once
    [alert] = alerts(database_url, "certificate_expiring")
    assert (alert.device_id, alert.severity, alert.count, alert.state) == (
        DEV,
        "warning",
        1,
        "open",
    )
    assert alert.explanation["threshold"] == {"days_before": 30}
    assert alert.explanation["observed"]["days_left"] == pytest.approx(29.96, abs=0.005)
    assert "expires on" in alert.explanation["text"]
    assert "in 30 days" in alert.explanation["text"]
    _renew(database_url, authority, days=400)
    _sweep(database_url, key, now + timedelta(hours=2))
    [alert] = alerts(database_url, "certificate_expiring")
    assert alert.state == "resolved"
    with psycopg.connect(database_url) as conn:
        assert conn.execute(
            "SELECT resolved_by, resolution LIKE 'a certificate valid until %%' FROM alerts"
            " WHERE rule = 'certificate_expiring'"
        ).fetchone() == ("galvani-rules", True)


def test_not_raised_more_than_30_days_before_expiry(
    database_url: str, key: Any, not_after: datetime
) -> None:
    _sweep(database_url, key, not_after - timedelta(days=30, minutes=1))
    assert alerts(database_url, "certificate_expiring") == []


def test_a_newer_certificate_that_expires_later_means_no_alert(
    database_url: str, key: Any, not_after: datetime, authority: pki.Authority
) -> None:
    _renew(database_url, authority, days=400)  # expires after the first
    _sweep(database_url, key, not_after - timedelta(days=1))
    assert alerts(database_url, "certificate_expiring") == []


def test_the_brand_sets_the_lead_time(database_url: str, key: Any, not_after: datetime) -> None:
    with psycopg.connect(database_url) as conn:
        save_overrides(conn, "acme", "certificate_expiring", {"days_before": 60}, "admin@acme")
    _sweep(database_url, key, not_after - timedelta(days=61))
    assert alerts(database_url, "certificate_expiring") == []
    _sweep(database_url, key, not_after - timedelta(days=59))
    [alert] = alerts(database_url, "certificate_expiring")
    assert alert.explanation["threshold"] == {"days_before": 60}


def test_an_expired_certificate_is_raised_as_expired(
    database_url: str, key: Any, not_after: datetime
) -> None:
    _sweep(database_url, key, not_after + timedelta(days=1))
    [alert] = alerts(database_url, "certificate_expiring")
    assert alert.explanation["variant"] == "expired"
    assert "expired on" in alert.explanation["text"]


def test_a_decommissioned_device_is_not_raised_and_its_alert_resolves(
    database_url: str, key: Any, not_after: datetime
) -> None:
    _sweep(database_url, key, not_after - timedelta(days=10))
    [alert] = alerts(database_url, "certificate_expiring")
    assert alert.state == "open"
    with psycopg.connect(database_url) as conn:
        provisioning.revoke_device(conn, DEV)
    _sweep(database_url, key, not_after - timedelta(days=9))
    [alert] = alerts(database_url, "certificate_expiring")
    assert alert.state == "resolved"
