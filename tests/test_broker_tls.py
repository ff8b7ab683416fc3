"""The broker's TLS listeners against the real Mosquitto (issue 20): devices and services
connect only with TLS to a certificate the suite's CA verifies; the certificate listener admits
a certificate from Galvani's device CA as the device its CN names, to that device's topics
only, and refuses expired, missing and revoked certificates; a revoked device's live session
is ended by session takeover."""

import datetime as dt
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from deploy.stack.errors import SetupError
from deploy.stack.mosquitto import MosquittoBroker, local_broker, render_config
from deploy.stack.options import RunOptions
from deploy.stack.pki import DevelopmentPKI
from deploy.stack.ports import free_port
from services.common import mqtt5
from services.common import pki as certificates
from services.common.broker_auth import BrokerFiles, ServiceAccount, sync_device_credentials
from services.common.broker_certificates import end_device_session, revoke_certificates
from services.common.tls import client_context
from tests.ingest import Device, connect_device, provision, telemetry, topic
from tests.mqtt import MqttClient, Refused

HOST = "127.0.0.1"
NOT_AUTHORIZED = 0x87
# How soon a revoked device's live connection must be gone after the takeover.
SESSION_END_BUDGET_S = 2.0
_numbers = iter(range(1, 1_000_000))


def _device_id(prefix: str) -> str:
    return f"{prefix}-{next(_numbers):04d}"


def _raw_connect(port: int, context: ssl.SSLContext | None, timeout_s: float = 3.0) -> bytes:
    """Send an MQTT 5 CONNECT (as a device would) and return what the broker answers first:
    b"" when it closes the connection. TLS errors are raised."""
    packet = mqtt5.connect(
        "probe",
        "probe",
        "probe",
        keepalive_s=30,
        session_expiry_s=0,
        receive_maximum=10,
        maximum_packet_size=65536,
    )
    with socket.create_connection((HOST, port), timeout=timeout_s) as raw:
        sock = raw if context is None else context.wrap_socket(raw, server_hostname=HOST)
        with sock:
            sock.sendall(packet)
            try:
                return sock.recv(64)
            except ConnectionResetError:
                return b""


def _assert_refused(port: int, context: ssl.SSLContext, alert: str) -> None:
    """The broker refuses ``context``'s client certificate at the handshake: over TLS 1.2 it
    sends ``alert`` before the handshake completes; over TLS 1.3 (where the client finishes
    first and reads the alert, or the closed connection, afterwards) no CONNACK comes."""
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    try:
        with pytest.raises(ssl.SSLError, match=alert):
            _raw_connect(port, context)
    finally:
        context.maximum_version = ssl.TLSVersion.MAXIMUM_SUPPORTED
    try:
        answer = _raw_connect(port, context)
    except ssl.SSLError:
        return
    assert answer == b""


def _watcher(broker: MosquittoBroker, passwords: dict[ServiceAccount, str]) -> MqttClient:
    """The ingest account on the service listener, subscribed to every device's telemetry."""
    client = MqttClient(
        HOST, broker.config.service_port, ServiceAccount.INGEST, passwords[ServiceAccount.INGEST]
    ).connect()
    assert client.subscribe("galvani/v1/d/+/telemetry") == 1
    return client


@pytest.fixture
def watcher(
    broker: MosquittoBroker, service_passwords: dict[ServiceAccount, str]
) -> Iterator[MqttClient]:
    client = _watcher(broker, service_passwords)
    yield client
    client.close()


CertificateFiles = Callable[..., ssl.SSLContext]


@pytest.fixture
def device_tls(pki: DevelopmentPKI, tmp_path: Path) -> CertificateFiles:
    """A client context presenting a certificate for ``device_id`` from ``authority`` (the
    device CA by default), as a device holding its own key would; ``serials`` collects the
    serial numbers issued."""

    def make(
        device_id: str,
        *,
        authority: certificates.Authority | None = None,
        not_before: dt.datetime | None = None,
        days: int = certificates.DEVICE_DAYS,
        serials: list[int] | None = None,
    ) -> ssl.SSLContext:
        issuer = authority or pki.device_authority()
        key = certificates.new_device_key()
        certificate = issuer.issue_client(
            device_id, key.public_key(), days=days, not_before=not_before
        )
        if serials is not None:
            serials.append(certificate.serial_number)
        cert_file = tmp_path / f"{device_id}-{certificate.serial_number}.pem"
        key_file = cert_file.with_suffix(".key")
        certificates.write_file(cert_file, certificates.pem(certificate), mode=0o644)
        certificates.write_file(key_file, certificates.private_pem(key), mode=0o600)
        return client_context(pki.ca_file, cert_file=cert_file, key_file=key_file)

    return make


def _certificate_client(broker: MosquittoBroker, context: ssl.SSLContext) -> MqttClient:
    """A device on the certificate listener: no username, no password, no client id (the
    broker takes all three from the certificate's CN)."""
    return MqttClient(HOST, broker.config.cert_port, None, None, tls=context)


# ---- the device and service listeners ---------------------------------------------------


def test_a_device_connects_with_tls_and_its_qos1_publish_is_acknowledged(
    broker: MosquittoBroker,
    database_url: str,
    sync_devices: Callable[[], int],
    watcher: MqttClient,
) -> None:
    [device] = provision(database_url, 1, prefix="tls")
    sync_devices()
    client = connect_device(broker.config.device_port, device)
    try:
        assert client.tls is not None
        assert client.publish(topic(device.device_id, "telemetry"), telemetry(1, 0)) == 0
    finally:
        client.close()
    received = watcher.wait_for(topic(device.device_id, "telemetry"))
    assert received is not None
    assert received.payload == telemetry(1, 0)


@pytest.mark.parametrize("listener", ["device_port", "service_port", "cert_port"])
def test_a_plaintext_connect_to_a_tls_listener_gets_no_connack(
    broker: MosquittoBroker, listener: str
) -> None:
    port = getattr(broker.config, listener)
    assert _raw_connect(port, None) == b""
    # The same CONNECT over TLS is answered (with a refusal: the probe's login is unknown).
    if listener != "cert_port":
        answer = _raw_connect(port, broker.tls_context())
        assert answer[:1] == bytes([mqtt5.PacketType.CONNACK << 4])


def test_a_device_password_over_plaintext_is_refused_by_the_tls_device_listener(
    broker: MosquittoBroker, database_url: str, sync_devices: Callable[[], int]
) -> None:
    [device] = provision(database_url, 1, prefix="plain")
    sync_devices()
    plain = MqttClient(
        HOST,
        broker.config.device_port,
        device.device_id,
        device.password,
        client_id=device.device_id,
        tls=None,
    )
    with pytest.raises(Refused):
        plain.connect()


def test_a_client_trusting_another_ca_refuses_the_broker(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    other = certificates.Authority.create("Someone else's CA")
    other_ca = tmp_path / "other-ca.pem"
    other_ca.write_bytes(certificates.pem(other.certificate))
    for port in (broker.config.device_port, broker.config.service_port):
        with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
            _raw_connect(port, client_context(other_ca))


def test_the_broker_certificate_names_the_loopback_address_clients_verify(
    broker: MosquittoBroker,
) -> None:
    """Host-name verification is on: the certificate is for localhost and 127.0.0.1, not any
    name a client asks for."""
    context = broker.tls_context()
    with (
        socket.create_connection((HOST, broker.config.device_port), timeout=3) as raw,
        pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"),
    ):
        context.wrap_socket(raw, server_hostname="broker.example.com")
    with (
        socket.create_connection((HOST, broker.config.device_port), timeout=3) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        assert tls.version() in ("TLSv1.2", "TLSv1.3")


def test_a_client_with_only_tls_1_2_connects(broker: MosquittoBroker) -> None:
    """Devices whose TLS stack stops at 1.2 (many mbedTLS builds) are admitted; newer
    clients negotiate 1.3."""
    legacy = broker.tls_context()
    legacy.maximum_version = ssl.TLSVersion.TLSv1_2
    for context, version in ((legacy, "TLSv1.2"), (broker.tls_context(), "TLSv1.3")):
        with (
            socket.create_connection((HOST, broker.config.device_port), timeout=3) as raw,
            context.wrap_socket(raw, server_hostname=HOST) as tls,
        ):
            assert tls.version() == version


# ---- the certificate listener ----------------------------------------------------------


def test_a_device_ca_certificate_connects_as_its_cn_and_publishes_on_its_topics(
    broker: MosquittoBroker, device_tls: CertificateFiles, watcher: MqttClient
) -> None:
    device_id = _device_id("cert")
    client = _certificate_client(broker, device_tls(device_id)).connect()
    try:
        assert client.publish(topic(device_id, "telemetry"), telemetry(1, 0)) == 0
    finally:
        client.close()
    received = watcher.wait_for(topic(device_id, "telemetry"))
    assert received is not None
    assert received.payload == telemetry(1, 0)


def test_a_certificate_for_device_a_cannot_publish_on_device_b_topics(
    broker: MosquittoBroker,
    service_passwords: dict[ServiceAccount, str],
    device_tls: CertificateFiles,
    watcher: MqttClient,
) -> None:
    device_a, device_b = _device_id("cert-a"), _device_id("cert-b")
    client = _certificate_client(broker, device_tls(device_a)).connect()
    rules = MqttClient(
        HOST,
        broker.config.service_port,
        ServiceAccount.RULES,
        service_passwords[ServiceAccount.RULES],
    ).connect()
    try:
        assert client.publish(topic(device_b, "telemetry"), telemetry(1, 0)) == NOT_AUTHORIZED
        # Its own topics still work on the same connection.
        assert client.publish(topic(device_a, "telemetry"), telemetry(2, 0)) == 0
        # Mosquitto grants any subscription and checks the read ACL on delivery: B's
        # configuration never reaches A, A's own does.
        client.subscribe(topic(device_b, "config"))
        client.subscribe(topic(device_a, "config"))
        assert rules.publish(topic(device_b, "config"), b"{}") == 0
        assert rules.publish(topic(device_a, "config"), b"{}") == 0
        assert client.wait_for(topic(device_a, "config")) is not None
        assert client.wait_for(topic(device_b, "config"), timeout_s=0.5) is None
    finally:
        client.close()
        rules.close()
    assert watcher.wait_for(topic(device_a, "telemetry")) is not None
    assert watcher.wait_for(topic(device_b, "telemetry"), timeout_s=0.5) is None


def test_a_certificate_cannot_choose_its_username_or_client_id(
    broker: MosquittoBroker, device_tls: CertificateFiles, watcher: MqttClient
) -> None:
    """A username and client id in the CONNECT are replaced by the CN: a device cannot
    claim another device's topics by naming it."""
    device_a, device_b = _device_id("cert-a"), _device_id("cert-b")
    client = MqttClient(
        HOST,
        broker.config.cert_port,
        device_b,
        "anything",
        client_id=device_b,
        tls=device_tls(device_a),
    ).connect()
    try:
        assert client.publish(topic(device_b, "telemetry"), telemetry(1, 0)) == NOT_AUTHORIZED
        assert client.publish(topic(device_a, "telemetry"), telemetry(1, 0)) == 0
    finally:
        client.close()


def test_an_expired_certificate_is_refused(
    broker: MosquittoBroker, device_tls: CertificateFiles
) -> None:
    expired = device_tls(
        _device_id("expired"),
        not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=400),
        days=30,
    )
    _assert_refused(broker.config.cert_port, expired, "certificate expired")


def test_a_connection_without_a_certificate_is_refused(broker: MosquittoBroker) -> None:
    _assert_refused(broker.config.cert_port, broker.tls_context(), "handshake failure")


def test_a_certificate_from_another_ca_is_refused(
    broker: MosquittoBroker, device_tls: CertificateFiles
) -> None:
    """Only Galvani's device CA is trusted, not the server CA and not a stranger's."""
    for authority in (
        certificates.Authority.create("A brand's own CA"),
        broker.config.pki.server_authority(),
    ):
        context = device_tls(_device_id("foreign"), authority=authority)
        _assert_refused(broker.config.cert_port, context, "unknown ca")


def test_a_revoked_certificate_is_refused_and_its_live_session_ended_by_takeover(
    broker: MosquittoBroker,
    service_passwords: dict[ServiceAccount, str],
    device_tls: CertificateFiles,
) -> None:
    assert broker.child is not None
    broker_pid = broker.child.pid
    device_id, bystander_id = _device_id("revoked"), _device_id("bystander")
    serials: list[int] = []
    context = device_tls(device_id, serials=serials)
    live = _certificate_client(broker, context).connect()
    bystander = _certificate_client(broker, device_tls(bystander_id)).connect()
    try:
        revoke_certificates(
            broker.config.pki.trust_dir,
            broker.config.pki.device_authority(),
            [(serials[0], dt.datetime.now(dt.UTC))],
        )
        # New connections with the certificate are refused at once, without a restart ...
        _assert_refused(broker.config.cert_port, context, "certificate revoked")
        # ... while the session opened before is untouched by the list.
        assert live.connected
        assert not live.wait_disconnected(0.3)
        started = time.monotonic()
        ended = end_device_session(
            HOST,
            broker.config.service_port,
            ServiceAccount.API,
            service_passwords[ServiceAccount.API],
            broker.tls_context(),
            device_id,
        )
        assert ended
        assert live.wait_disconnected(SESSION_END_BUDGET_S)
        elapsed = time.monotonic() - started
        print(f"revoked session ended {elapsed * 1000:.0f} ms after the takeover began")
        assert elapsed < SESSION_END_BUDGET_S
        assert bystander.connected
        assert bystander.publish(topic(bystander_id, "telemetry"), telemetry(1, 0)) in (0, 16)
        assert broker.child.pid == broker_pid
        assert broker.child.alive()
    finally:
        live.close()
        bystander.close()
    # The device CA's other certificates are still admitted.
    _certificate_client(broker, device_tls(_device_id("after"))).connect().close()


# The takeover's CONNECT in MQTT 5, and in 3.1.1 as a cluster that speaks only 3.1.1 needs.
PROTOCOLS = [pytest.param(5, id="mqtt5"), pytest.param(4, id="mqtt311")]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_the_takeover_also_ends_a_password_device_session(
    broker: MosquittoBroker,
    database_url: str,
    sync_devices: Callable[[], int],
    service_passwords: dict[ServiceAccount, str],
    protocol: int,
) -> None:
    [device] = provision(database_url, 1, prefix="takeover")
    sync_devices()
    client = connect_device(broker.config.device_port, device)
    try:
        assert end_device_session(
            HOST,
            broker.config.service_port,
            ServiceAccount.API,
            service_passwords[ServiceAccount.API],
            broker.tls_context(),
            device.device_id,
            protocol=protocol,
        )
        assert client.wait_disconnected(SESSION_END_BUDGET_S)
    finally:
        client.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_takeover_with_a_wrong_password_ends_nothing(
    broker: MosquittoBroker,
    device_tls: CertificateFiles,
    protocol: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    device_id = _device_id("kept")
    client = _certificate_client(broker, device_tls(device_id)).connect()
    try:
        assert not end_device_session(
            HOST,
            broker.config.service_port,
            ServiceAccount.API,
            "not-the-password",
            broker.tls_context(),
            device_id,
            protocol=protocol,
        )
        assert not client.wait_disconnected(0.5)
        # 3.1.1's return code 5 for Mosquitto's refusal of a password; MQTT 5's reason 0x87.
        assert ("not authorized (0x05)" if protocol == 4 else "not authorized (0x87)") in (
            caplog.text
        )
    finally:
        client.close()


def test_a_takeover_when_the_broker_cannot_be_reached_says_so(broker: MosquittoBroker) -> None:
    started = time.monotonic()
    assert not end_device_session(
        HOST, free_port(), ServiceAccount.API, "pw", broker.tls_context(), "dev-x", timeout_s=1.0
    )
    assert time.monotonic() - started < 1.5


# ---- the development switch ------------------------------------------------------------


@pytest.fixture
def plaintext_broker(
    stack_root: Path, service_passwords: dict[ServiceAccount, str], pki: DevelopmentPKI
) -> Iterator[MosquittoBroker]:
    server = local_broker(
        stack_root / f"plaintext-broker-{next(_numbers)}", service_passwords, pki, plain_device=True
    )
    server.start([])
    yield server
    server.stop()


def test_the_plaintext_device_listener_admits_a_password_device_without_tls(
    plaintext_broker: MosquittoBroker, database_url: str
) -> None:
    [device] = provision(database_url, 1, prefix="dev-plain")
    with psycopg.connect(database_url) as conn:
        sync_device_credentials(conn, BrokerFiles(plaintext_broker.config.directory))
    port = plaintext_broker.config.plain_device_port
    assert port is not None
    client = MqttClient(
        HOST, port, device.device_id, device.password, client_id=device.device_id, tls=None
    ).connect()
    try:
        assert client.publish(topic(device.device_id, "telemetry"), telemetry(1, 0)) in (0, 16)
        # The device ACL applies there too.
        assert client.publish(topic("someone-else", "telemetry"), telemetry(1, 0)) == (
            NOT_AUTHORIZED
        )
    finally:
        client.close()
    wrong = Device(device.device_id, "wrong-password")
    with pytest.raises(Refused):
        MqttClient(
            HOST, port, wrong.device_id, wrong.password, client_id=wrong.device_id, tls=None
        ).connect()


def test_only_the_switches_open_plaintext_listeners(tmp_path: Path) -> None:
    paths = DevelopmentPKI.at(tmp_path)
    broker = local_broker(tmp_path, {}, paths)
    text = render_config(broker.config)
    blocks = text.split("\nlistener ")[1:]
    assert len(blocks) == 3
    assert all("\ncertfile " in block and "\ntls_version tlsv1.2\n" in block for block in blocks)
    both = local_broker(tmp_path, {}, paths, plain_device=True, plain_service=True)
    blocks = render_config(both.config).split("\nlistener ")[1:]
    assert len(blocks) == 5
    assert sum("\ncertfile " not in block for block in blocks) == 2


def test_make_run_refuses_the_plaintext_switch_in_production() -> None:
    with pytest.raises(SetupError, match="GALVANI_MQTT_PLAINTEXT"):
        RunOptions.from_env({"GALVANI_MQTT_PLAINTEXT": "1", "GALVANI_ENVIRONMENT": "production"})
    assert RunOptions.from_env({"GALVANI_MQTT_PLAINTEXT": "1"}).mqtt_plaintext
    assert not RunOptions.from_env({"GALVANI_ENVIRONMENT": "production"}).mqtt_plaintext
    with pytest.raises(SetupError, match="GALVANI_MQTT_PLAINTEXT"):
        RunOptions.from_env({"GALVANI_MQTT_PLAINTEXT": "yes"})
