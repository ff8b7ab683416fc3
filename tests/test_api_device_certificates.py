"""Per-device certificates through the API, on the real database: enrolment by CSR or with a
factory certificate of the brand's registered CA (bring-your-own CA), rotation, revocation
into the broker's trust directory, and brand isolation of all of it."""

import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from fastapi.testclient import TestClient

from deploy.stack.mosquitto import MosquittoBroker
from deploy.stack.pki import DevelopmentPKI
from services.api.main import create_app
from services.api.settings import ApiSettings
from services.common import pki
from services.common.broker_auth import ServiceAccount
from services.common.tls import client_context
from tests.api import auth
from tests.ingest import telemetry, topic
from tests.mqtt import MqttClient

CERT_PORT = 18_883


@pytest.fixture
def development_pki(tmp_path: Path) -> DevelopmentPKI:
    """The installation's PKI where the API looks for it (``<data_dir>/pki``)."""
    return DevelopmentPKI.ensure(tmp_path / "pki")


@pytest.fixture
def api(
    api_database_url: str, tmp_path: Path, development_pki: DevelopmentPKI
) -> Iterator[TestClient]:
    """The API with the device CA and no broker (ending a live session cannot succeed)."""
    settings = ApiSettings(
        database_url=api_database_url,
        mqtt_password="x",
        mqtt_tls=False,
        data_dir=tmp_path,
        device_cert_mqtt_port=CERT_PORT,
        session_end_timeout_s=0.5,
    )
    with TestClient(create_app(settings)) as client:
        yield client


def csr_for(device_id: str, key: ec.EllipticCurvePrivateKey | None = None) -> str:
    return pki.device_csr(key or pki.new_device_key(), device_id)


def enrol(api: TestClient, key: str, device_id: str, **request: str) -> dict[str, object]:
    body = {"device_id": device_id, "model": "glow-2", "auth": "certificate", **request}
    response = api.post("/v1/devices", json=body, headers=auth(key))
    assert response.status_code == 201, response.text
    answer: dict[str, object] = response.json()
    return answer


def certificate_of(answer: dict[str, object]) -> x509.Certificate:
    return x509.load_pem_x509_certificate(str(answer["certificate"]).encode())


def public_der(key: object) -> bytes:
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def factory_ca(name: str) -> pki.Authority:
    return pki.Authority.create(name)


def factory_certificate(ca: pki.Authority, device_id: str, key: ec.EllipticCurvePrivateKey) -> str:
    return pki.pem(ca.issue_client(device_id, key.public_key())).decode()


def test_a_device_enrols_with_a_csr_and_gets_a_certificate_for_its_own_key(
    api: TestClient, keys: dict[str, str], development_pki: DevelopmentPKI
) -> None:
    key = pki.new_device_key()
    answer = enrol(api, keys["admin"], "glow-c0001", csr=csr_for("glow-c0001", key))
    mqtt = answer["mqtt"]
    assert isinstance(mqtt, dict)
    assert answer["auth"] == "certificate"
    assert mqtt["password"] is None
    assert (mqtt["port"], mqtt["username"], mqtt["client_id"]) == (
        CERT_PORT,
        "glow-c0001",
        "glow-c0001",
    )
    certificate = certificate_of(answer)
    assert pki.common_name(certificate) == "glow-c0001"
    device_ca = development_pki.device_authority().certificate
    certificate.verify_directly_issued_by(device_ca)
    assert public_der(certificate.public_key()) == public_der(key.public_key())
    assert answer["not_after"] == certificate.not_valid_after_utc.isoformat().replace("+00:00", "Z")
    detail = api.get("/v1/devices/glow-c0001", headers=auth(keys["viewer"])).json()
    assert (detail["auth"], detail["not_after"]) == ("certificate", answer["not_after"])
    [listed] = api.get("/v1/devices/glow-c0001/certificates", headers=auth(keys["viewer"])).json()[
        "items"
    ]
    assert listed["serial"] == f"{certificate.serial_number:x}"
    assert listed["fingerprint"] == certificate.fingerprint(hashes.SHA256()).hex()
    assert (listed["revoked_at"], listed["authority_id"]) == (None, None)


def test_password_provisioning_is_unchanged_and_shows_no_certificate(
    api: TestClient, keys: dict[str, str]
) -> None:
    response = api.post(
        "/v1/devices",
        json={"device_id": "glow-p0001", "model": "glow-2"},
        headers=auth(keys["admin"]),
    )
    assert response.status_code == 201, response.text
    answer = response.json()
    assert answer["auth"] == "password"
    assert len(answer["mqtt"]["password"]) >= 20
    assert answer["certificate"] is None
    detail = api.get("/v1/devices/glow-p0001", headers=auth(keys["viewer"])).json()
    assert (detail["auth"], detail["not_after"]) == ("password", None)


def _tampered_csr() -> str:
    csr = x509.load_pem_x509_csr(csr_for("glow-c0002").encode())
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # the signature's last byte
    return x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM).decode()


def _rsa_1024_csr() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 - refused
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "glow-c0002")]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


@pytest.mark.parametrize(
    ("request_body", "field", "says"),
    [
        ({"csr": "not a CSR"}, "body.csr", "not a PEM certificate signing request"),
        ({"csr": "tampered"}, "body.csr", "signature does not verify"),
        ({"csr": csr_for("glow-c9999")}, "body.csr", "not the device id"),
        ({"csr": "rsa-1024"}, "body.csr", "RSA ≥ 2048"),
        ({"certificate": "not a certificate"}, "body.certificate", "not a PEM certificate"),
    ],
    ids=["not-pem", "bad-signature", "other-device", "weak-key", "factory-not-pem"],
)
def test_a_csr_or_certificate_galvani_will_not_sign_is_a_422_naming_the_field(
    api: TestClient,
    keys: dict[str, str],
    database_url: str,
    request_body: dict[str, str],
    field: str,
    says: str,
) -> None:
    made = {"tampered": _tampered_csr, "rsa-1024": _rsa_1024_csr}
    body = {name: made[value]() if value in made else value for name, value in request_body.items()}
    response = api.post(
        "/v1/devices",
        json={"device_id": "glow-c0002", "model": "glow-2", "auth": "certificate", **body},
        headers=auth(keys["admin"]),
    )
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["type"].endswith("/invalid-certificate-request")
    assert [error["field"] for error in problem["errors"]] == [field]
    assert says in problem["detail"]
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM devices WHERE id = 'glow-c0002'").fetchone() == (
            0,
        )


@pytest.mark.parametrize(
    "body",
    [
        {"auth": "certificate"},
        {"auth": "certificate", "csr": "x", "certificate": "y"},
        {"csr": "x"},
    ],
    ids=["nothing-to-sign", "both", "csr-with-password"],
)
def test_a_certificate_request_that_does_not_match_auth_is_refused(
    api: TestClient, keys: dict[str, str], body: dict[str, str]
) -> None:
    response = api.post(
        "/v1/devices",
        json={"device_id": "glow-c0003", "model": "glow-2", **body},
        headers=auth(keys["admin"]),
    )
    assert response.status_code == 422, response.text
    assert response.json()["type"].endswith("/invalid-request")


def test_rotation_issues_a_new_certificate_and_the_previous_stays_valid(
    api: TestClient, keys: dict[str, str]
) -> None:
    first = certificate_of(enrol(api, keys["admin"], "glow-c0004", csr=csr_for("glow-c0004")))
    new_key = pki.new_device_key()
    response = api.post(
        "/v1/devices/glow-c0004/certificate",
        json={"csr": csr_for("glow-c0004", new_key)},
        headers=auth(keys["admin"]),
    )
    assert response.status_code == 201, response.text
    second = x509.load_pem_x509_certificate(response.json()["certificate"].encode())
    assert public_der(second.public_key()) == public_der(new_key.public_key())
    assert second.serial_number != first.serial_number
    assert response.json()["serial"] == f"{second.serial_number:x}"
    items = api.get("/v1/devices/glow-c0004/certificates", headers=auth(keys["viewer"])).json()[
        "items"
    ]
    assert [item["serial"] for item in items] == [
        f"{second.serial_number:x}",
        f"{first.serial_number:x}",
    ]
    assert [item["revoked_at"] for item in items] == [None, None]
    password_device = api.post(
        "/v1/devices",
        json={"device_id": "glow-p0004", "model": "glow-2"},
        headers=auth(keys["admin"]),
    )
    assert password_device.status_code == 201
    refused = api.post(
        "/v1/devices/glow-p0004/certificate",
        json={"csr": csr_for("glow-p0004")},
        headers=auth(keys["admin"]),
    )
    assert refused.status_code == 409
    assert refused.json()["type"].endswith("/not-a-certificate-device")


def test_decommission_revokes_the_certificates_into_the_trust_directory_even_without_a_broker(
    api: TestClient, keys: dict[str, str], database_url: str, development_pki: DevelopmentPKI
) -> None:
    first = certificate_of(enrol(api, keys["admin"], "glow-c0005", csr=csr_for("glow-c0005")))
    rotated = api.post(
        "/v1/devices/glow-c0005/certificate",
        json={"csr": csr_for("glow-c0005")},
        headers=auth(keys["admin"]),
    )
    second = x509.load_pem_x509_certificate(rotated.json()["certificate"].encode())
    kept = certificate_of(enrol(api, keys["admin"], "glow-c0006", csr=csr_for("glow-c0006")))
    with psycopg.connect(database_url) as conn:  # one it had that expired two days ago
        conn.execute(
            "INSERT INTO device_certificates (device_id, serial, fingerprint, not_before,"
            " not_after) VALUES ('glow-c0005', 12345, repeat('a', 64),"
            " now() - interval '400 days', now() - interval '2 days')"
        )
    gone = api.delete("/v1/devices/glow-c0005", headers=auth(keys["admin"]))
    # No broker here: the revocation holds (committed, listed), the live session could not be
    # ended, and the answer says so.
    assert gone.status_code == 503, gone.text
    assert gone.json()["type"].endswith("/session-not-ended")
    with psycopg.connect(database_url) as conn:
        revoked = conn.execute(
            "SELECT count(*) FROM device_certificates"
            " WHERE device_id = 'glow-c0005' AND revoked_at IS NOT NULL"
        ).fetchone()
    assert revoked == (3,)
    device_ca = development_pki.device_authority()
    prefix = pki.subject_hash(device_ca.certificate.subject)
    lists = sorted(
        development_pki.trust_dir.glob(f"{prefix}.r*"), key=lambda p: int(p.name.split(".r")[1])
    )
    newest = pki.load_revocation_list(lists[-1].read_text(), device_ca.certificate)
    named = {entry.serial_number for entry in newest}
    # The expired one is refused for its expiry: the list names the live revocations only.
    assert named == {first.serial_number, second.serial_number}
    assert kept.serial_number not in named
    detail = api.get("/v1/devices/glow-c0005", headers=auth(keys["viewer"])).json()
    assert detail["not_after"] is None
    assert detail["decommissioned_at"] is not None


def test_a_brand_registers_its_factory_ca_and_its_devices_keep_their_factory_key(
    api: TestClient, keys: dict[str, str], development_pki: DevelopmentPKI
) -> None:
    ca = factory_ca("Acme factory CA")
    registered = api.post(
        "/v1/device-authorities",
        json={"certificate": pki.pem(ca.certificate).decode()},
        headers=auth(keys["admin"]),
    )
    assert registered.status_code == 201, registered.text
    authority = registered.json()
    assert authority["subject"] == "CN=Acme factory CA"
    assert authority["fingerprint"] == pki.fingerprint(ca.certificate)
    again = api.post(
        "/v1/device-authorities",
        json={"certificate": pki.pem(ca.certificate).decode()},
        headers=auth(keys["admin"]),
    )
    assert again.status_code == 409
    assert again.json()["type"].endswith("/authority-exists")
    device_key = pki.new_device_key()
    answer = enrol(
        api,
        keys["admin"],
        "glow-f0001",
        certificate=factory_certificate(ca, "glow-f0001", device_key),
    )
    galvani = certificate_of(answer)
    galvani.verify_directly_issued_by(development_pki.device_authority().certificate)
    assert public_der(galvani.public_key()) == public_der(device_key.public_key())
    assert pki.common_name(galvani) == "glow-f0001"
    [listed] = api.get("/v1/devices/glow-f0001/certificates", headers=auth(keys["viewer"])).json()[
        "items"
    ]
    assert listed["authority_id"] == authority["id"]
    # A certificate naming another device, or from a CA the brand has not registered, is not.
    for device_id, certificate in [
        ("glow-f0002", factory_certificate(ca, "glow-f9999", pki.new_device_key())),
        (
            "glow-f0002",
            factory_certificate(factory_ca("Unknown CA"), "glow-f0002", pki.new_device_key()),
        ),
    ]:
        refused = api.post(
            "/v1/devices",
            json={
                "device_id": device_id,
                "model": "glow-2",
                "auth": "certificate",
                "certificate": certificate,
            },
            headers=auth(keys["admin"]),
        )
        assert refused.status_code == 422, refused.text
        assert refused.json()["errors"][0]["field"] == "body.certificate"
    # Removed, it vouches for no new device.
    removed = api.delete(f"/v1/device-authorities/{authority['id']}", headers=auth(keys["admin"]))
    assert removed.status_code == 204
    after = api.post(
        "/v1/devices",
        json={
            "device_id": "glow-f0003",
            "model": "glow-2",
            "auth": "certificate",
            "certificate": factory_certificate(ca, "glow-f0003", pki.new_device_key()),
        },
        headers=auth(keys["admin"]),
    )
    assert after.status_code == 422, after.text


def test_an_authority_must_be_a_current_ca(api: TestClient, keys: dict[str, str]) -> None:
    leaf = factory_ca("Some CA").issue_client("glow-x0001", pki.new_device_key().public_key())
    expired = pki.Authority.create("Old CA", days=0)
    for certificate, says in [
        (pki.pem(leaf).decode(), "not a CA"),
        (pki.pem(expired.certificate).decode(), "expired"),
        ("nonsense", "not a PEM certificate"),
    ]:
        response = api.post(
            "/v1/device-authorities", json={"certificate": certificate}, headers=auth(keys["admin"])
        )
        assert response.status_code == 422, response.text
        assert response.json()["errors"] == [
            {"field": "body.certificate", "message": response.json()["errors"][0]["message"]}
        ]
        assert says in response.json()["detail"]
    viewer = api.post(
        "/v1/device-authorities",
        json={"certificate": pki.pem(factory_ca("V CA").certificate).decode()},
        headers=auth(keys["viewer"]),
    )
    assert viewer.status_code == 403


def test_another_brand_sees_and_revokes_none_of_a_brands_certificates_or_authorities(
    api: TestClient, keys: dict[str, str], database_url: str
) -> None:
    ca = factory_ca("Acme line 2 CA")
    authority = api.post(
        "/v1/device-authorities",
        json={"certificate": pki.pem(ca.certificate).decode()},
        headers=auth(keys["admin"]),
    ).json()
    enrol(api, keys["admin"], "glow-i0001", csr=csr_for("glow-i0001"))
    other = auth(keys["other"])
    assert api.get("/v1/device-authorities", headers=other).json()["items"] == []
    assert api.get(f"/v1/device-authorities/{authority['id']}", headers=other).status_code == 404
    assert api.delete(f"/v1/device-authorities/{authority['id']}", headers=other).status_code == 404
    assert api.get("/v1/devices/glow-i0001/certificates", headers=other).status_code == 404
    assert api.get("/v1/devices/glow-i0001", headers=other).status_code == 404
    assert api.delete("/v1/devices/glow-i0001", headers=other).status_code == 404
    rotate = api.post(
        "/v1/devices/glow-i0001/certificate", json={"csr": csr_for("glow-i0001")}, headers=other
    )
    assert rotate.status_code == 404
    # Acme's CA vouches for no device of the other brand, even one it names.
    refused = api.post(
        "/v1/devices",
        json={
            "device_id": "glow-i0002",
            "model": "glow-2",
            "auth": "certificate",
            "certificate": factory_certificate(ca, "glow-i0002", pki.new_device_key()),
        },
        headers=other,
    )
    assert refused.status_code == 422, refused.text
    assert "not signed by any of the brand's device authorities" in refused.json()["detail"]
    with psycopg.connect(database_url) as conn:
        assert conn.execute(
            "SELECT count(*), count(revoked_at) FROM device_certificates"
            " WHERE device_id = 'glow-i0001'"
        ).fetchone() == (1, 0)
        assert conn.execute(
            "SELECT removed_at FROM brand_device_authorities WHERE id = %s", [authority["id"]]
        ).fetchone() == (None,)
    mine = api.get("/v1/device-authorities", headers=auth(keys["viewer"])).json()["items"]
    assert [item["id"] for item in mine] == [authority["id"]]


def test_certificate_enrolment_without_a_device_ca_is_a_503_and_a_malformed_csr_a_422(
    api_database_url: str, tmp_path: Path, keys: dict[str, str]
) -> None:
    settings = ApiSettings(
        database_url=api_database_url, mqtt_password="x", data_dir=tmp_path / "no-pki"
    )
    with TestClient(create_app(settings)) as client:
        response = client.post(
            "/v1/devices",
            json={
                "device_id": "glow-n0001",
                "model": "glow-2",
                "auth": "certificate",
                "csr": csr_for("glow-n0001"),
            },
            headers=auth(keys["admin"]),
        )
        malformed = client.post(
            "/v1/devices",
            json={
                "device_id": "glow-n0002",
                "model": "glow-2",
                "auth": "certificate",
                "csr": "not a CSR",
            },
            headers=auth(keys["admin"]),
        )
    assert response.status_code == 503
    assert response.json()["type"].endswith("/certificates-unavailable")
    # A malformed request is the client's error whatever the installation can do.
    assert malformed.status_code == 422
    assert malformed.json()["errors"][0]["field"] == "body.csr"


# ---- end to end: the API, the real broker's certificate listener, the revocation -----------

SESSION_END_BUDGET_S = 5.0


@pytest.fixture
def broker_api(broker_api_settings: ApiSettings, broker: MosquittoBroker) -> Iterator[TestClient]:
    """The API on the suite's broker, signing with its device CA and revoking into its trust
    directory."""
    paths = broker.config.pki
    settings = broker_api_settings.model_copy(
        update={
            "device_ca_cert": paths.device_ca_cert,
            "device_ca_key": paths.device_ca_key,
            "trust_dir": paths.trust_dir,
            "device_cert_mqtt_port": broker.config.cert_port,
        }
    )
    with TestClient(create_app(settings)) as client:
        yield client


def _device_context(
    broker: MosquittoBroker,
    tmp_path: Path,
    answer: dict[str, object],
    key: ec.EllipticCurvePrivateKey,
) -> ssl.SSLContext:
    """What the device holds after enrolling: its key and the certificate the API answered."""
    cert_file = tmp_path / f"{answer['device_id']}.pem"
    key_file = tmp_path / f"{answer['device_id']}.key"
    pki.write_file(cert_file, str(answer["certificate"]).encode(), mode=0o644)
    pki.write_file(key_file, pki.private_pem(key), mode=0o600)
    return client_context(broker.config.pki.ca_file, cert_file=cert_file, key_file=key_file)


def _handshake_refused(port: int, context: ssl.SSLContext) -> str:
    """The TLS 1.2 alert the broker refuses ``context``'s certificate with."""
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=3) as raw,
            pytest.raises(ssl.SSLError) as refused,
        ):
            context.wrap_socket(raw, server_hostname="127.0.0.1").close()
    finally:
        context.maximum_version = ssl.TLSVersion.MAXIMUM_SUPPORTED
    return str(refused.value)


def test_an_enrolled_device_connects_with_its_certificate_and_decommission_cuts_it_off(
    broker_api: TestClient,
    broker: MosquittoBroker,
    keys: dict[str, str],
    service_passwords: dict[ServiceAccount, str],
    tmp_path: Path,
) -> None:
    device_key, factory_key = pki.new_device_key(), pki.new_device_key()
    csr_device = enrol(
        broker_api, keys["admin"], "glow-e0001", csr=csr_for("glow-e0001", device_key)
    )
    assert csr_device["mqtt"]["port"] == broker.config.cert_port  # type: ignore[index]
    ca = factory_ca("Acme factory CA")
    registered = broker_api.post(
        "/v1/device-authorities",
        json={"certificate": pki.pem(ca.certificate).decode()},
        headers=auth(keys["admin"]),
    )
    assert registered.status_code == 201
    factory_device = enrol(
        broker_api,
        keys["admin"],
        "glow-e0002",
        certificate=factory_certificate(ca, "glow-e0002", factory_key),
    )
    watcher = MqttClient(
        "127.0.0.1",
        broker.config.service_port,
        ServiceAccount.INGEST,
        service_passwords[ServiceAccount.INGEST],
    ).connect()
    context = _device_context(broker, tmp_path, csr_device, device_key)
    live = MqttClient("127.0.0.1", broker.config.cert_port, None, None, tls=context).connect()
    # The factory-keyed device connects with Galvani's certificate and its factory key.
    other = MqttClient(
        "127.0.0.1",
        broker.config.cert_port,
        None,
        None,
        tls=_device_context(broker, tmp_path, factory_device, factory_key),
    ).connect()
    try:
        assert watcher.subscribe("galvani/v1/d/+/telemetry") == 1
        assert live.publish(topic("glow-e0001", "telemetry"), telemetry(1, 0)) == 0
        assert other.publish(topic("glow-e0002", "telemetry"), telemetry(1, 0)) == 0
        assert watcher.wait_for(topic("glow-e0001", "telemetry")) is not None
        assert watcher.wait_for(topic("glow-e0002", "telemetry")) is not None
        started = time.monotonic()
        gone = broker_api.delete("/v1/devices/glow-e0001", headers=auth(keys["admin"]))
        assert gone.status_code == 204, gone.text
        assert live.wait_disconnected(SESSION_END_BUDGET_S), "the live session was not ended"
        elapsed = time.monotonic() - started
        print(f"decommissioned device's session ended {elapsed * 1000:.0f} ms after DELETE")
        assert "certificate revoked" in _handshake_refused(broker.config.cert_port, context)
        # The other device is untouched.
        assert other.connected
        assert other.publish(topic("glow-e0002", "telemetry"), telemetry(2, 0)) == 0
    finally:
        live.close()
        other.close()
        watcher.close()
