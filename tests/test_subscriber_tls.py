"""The backend's broker clients over TLS, against a real Mosquitto with a TLS listener.

The workers' own subscriber (services.common.subscriber) reads a TLS socket one record
(16 KiB) per ``recv``; these tests check that it still reads many messages at once, finds data
the SSL object decrypted but select() cannot see, acknowledges over TLS, and refuses a
broker it cannot verify (another CA, another host name) while it keeps retrying. The paho
publisher (config_push.connect_publisher) and the readiness check go through the same CA.

Each test starts its own Mosquitto on a minimal configuration (one TLS listener, anonymous):
what is tested is the client's TLS, not Galvani's broker configuration (test_broker and the
suite's broker cover that).
"""

import gc
import logging
import secrets
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from pydantic import SecretStr

from deploy.stack.mosquitto import find_mosquitto
from deploy.stack.ports import free_port
from services.api.health.endpoints import _broker_ok
from services.common import broker_session, pki
from services.common import subscriber as subscriber_module
from services.common.config_push import connect_publisher
from services.common.settings import ServiceSettings
from services.common.subscriber import Subscriber, SubscriberConfig
from services.common.tls import client_context

WAIT_S = 10.0
POLL_S = 0.05
TLS_RECORD_BYTES = 16 * 1024  # the largest plaintext of one TLS record (RFC 8446 5.1)
MESSAGES = 2_000
PAYLOAD_BYTES = 1_000


@dataclass(frozen=True)
class Authority:
    """A CA and where its certificate is saved, for the clients to trust."""

    authority: pki.Authority
    ca_file: Path


def new_authority(directory: Path, name: str) -> Authority:
    authority = pki.Authority.create(name)
    ca_file = directory / f"{name}.pem"
    authority.save(ca_file, directory / f"{name}.key")
    return Authority(authority, ca_file)


class TlsBroker:
    """A Mosquitto with one anonymous TLS listener on loopback, presenting a given certificate."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, issuer: pki.Authority, hosts: tuple[str, ...] = pki.LOOPBACK_NAMES) -> None:
        """Start with a server certificate ``issuer`` issues for ``hosts``."""
        certificate, key = issuer.issue_server(hosts)
        cert_file = self.directory / "server.pem"
        key_file = self.directory / "server.key"
        pki.write_file(cert_file, pki.pem(certificate), mode=0o644)
        pki.write_file(key_file, pki.private_pem(key), mode=0o600)
        conf = self.directory / "mosquitto.conf"
        conf.write_text(
            "user root\n"
            f"log_dest file {self.directory / 'mosquitto.log'}\n"
            "per_listener_settings true\n"
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            f"certfile {cert_file}\nkeyfile {key_file}\ntls_version tlsv1.2\n"
        )
        self.process = subprocess.Popen(
            [find_mosquitto(), "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mosquitto did not listen on {self.port}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[TlsBroker]:
    broker = TlsBroker(tmp_path)
    yield broker
    broker.stop()


@pytest.fixture
def authority(tmp_path: Path) -> Authority:
    return new_authority(tmp_path, "galvani-test-ca")


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(broker_session, "RECONNECT_MIN_DELAY_S", 0.05)
    monkeypatch.setattr(broker_session, "RECONNECT_MAX_DELAY_S", 0.1)


@pytest.fixture
def subscribers() -> Iterator[list[Subscriber]]:
    made: list[Subscriber] = []
    yield made
    for sub in made:
        sub.close()


def new_subscriber(
    made: list[Subscriber],
    port: int,
    ca_file: Path,
    topic: str,
    *,
    client_id: str | None = None,
    host: str = "127.0.0.1",
    receive_maximum: int = MESSAGES,
) -> Subscriber:
    sub = Subscriber(
        SubscriberConfig(
            host=host,
            port=port,
            username="galvani-ingest",
            password="unchecked",  # the test broker is anonymous
            client_id=client_id or f"tls-{secrets.token_hex(4)}",
            topic_filters=(topic,),
            receive_maximum=receive_maximum,
            session_expiry_s=600,
            tls=client_context(ca_file),
        ),
        draw=lambda: 0.0,
    )
    made.append(sub)
    return sub


def poll_until(sub: Subscriber, condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {WAIT_S:g} s: {what}")
        sub.poll(POLL_S)


def settings_for(port: int, ca_file: Path) -> ServiceSettings:
    return ServiceSettings(
        database_url=SecretStr("postgresql://unused@127.0.0.1/unused"),
        mqtt_port=port,
        mqtt_username="galvani-api",
        mqtt_password=SecretStr("unchecked-by-the-test-broker"),
        mqtt_ca_file=ca_file,
    )


@pytest.fixture
def publisher(tls_broker: TlsBroker, authority: Authority) -> Iterator[Callable[[], paho.Client]]:
    """config_push's publisher (what rules and the API publish with), connected over TLS."""
    clients: list[paho.Client] = []

    def connect() -> paho.Client:
        client = connect_publisher(
            settings_for(tls_broker.port, authority.ca_file), f"tls-pub-{secrets.token_hex(4)}"
        )
        clients.append(client)
        deadline = time.monotonic() + WAIT_S
        while not client.is_connected():
            if time.monotonic() > deadline:
                pytest.fail("the TLS publisher did not connect")
            time.sleep(POLL_S)
        return client

    yield connect
    for client in clients:
        client.disconnect()
        client.loop_stop()


def publish_all(client: paho.Client, topic: str, count: int) -> list[bytes]:
    payloads = [f"{n:06d}".encode() + secrets.token_bytes(PAYLOAD_BYTES - 6) for n in range(count)]
    infos = [client.publish(topic, p, qos=1) for p in payloads]
    for info in infos:
        info.wait_for_publish(WAIT_S)
        assert info.is_published(), "the broker acknowledged every publish"
    return payloads


def test_many_messages_arrive_over_tls_several_records_a_read_and_their_pubacks_end_redelivery(
    tls_broker: TlsBroker,
    authority: Authority,
    publisher: Callable[[], paho.Client],
    subscribers: list[Subscriber],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tls_broker.start(authority.authority)
    topic = f"galvani/v1/d/tls-{secrets.token_hex(4)}/telemetry"
    client_id = f"tls-worker-{secrets.token_hex(4)}"
    sub = new_subscriber(
        subscribers, tls_broker.port, authority.ca_file, topic, client_id=client_id
    )
    read_sizes: list[int] = []
    receive = subscriber_module._receive

    def recording(sock: socket.socket) -> bytes | None:
        data = receive(sock)
        if data is not None:
            read_sizes.append(len(data))
        return data

    monkeypatch.setattr(subscriber_module, "_receive", recording)
    poll_until(sub, lambda: sub.connected, "subscribed over TLS")
    assert isinstance(sub._sock, ssl.SSLSocket)

    # Published while the subscriber does not read: the broker's sends pile up in the socket.
    payloads = publish_all(publisher(), topic, MESSAGES)
    poll_until(sub, lambda: len(sub.pending) == MESSAGES, f"{MESSAGES} messages over TLS")

    received = sub.take(MESSAGES)
    assert [m.payload for m in received] == payloads
    assert max(read_sizes) > 2 * TLS_RECORD_BYTES, "one read gathered several TLS records"
    assert len(read_sizes) < MESSAGES * PAYLOAD_BYTES / TLS_RECORD_BYTES
    assert sub.ack(received) == MESSAGES
    poll_until(sub, lambda: not sub._out, "the PUBACKs written")
    sub.close()

    # The session stays (clean start off): only what was not acknowledged would come again.
    again = new_subscriber(
        subscribers, tls_broker.port, authority.ca_file, topic, client_id=client_id
    )
    poll_until(again, lambda: again.connected, "resubscribed over TLS")
    end = time.monotonic() + 1.0
    while time.monotonic() < end:
        again.poll(POLL_S)
    assert again.stats.sessions_lost == 0
    assert list(again.pending) == [], "an acknowledged message was delivered again"


def test_data_decrypted_but_unread_is_found_without_more_arriving(
    tls_broker: TlsBroker,
    authority: Authority,
    publisher: Callable[[], paho.Client],
    subscribers: list[Subscriber],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Reads smaller than a record leave the rest of each record inside the SSL object, where
    # select() does not see it; the last messages arrive only if poll looks there first.
    monkeypatch.setattr(subscriber_module, "READ_SIZE", 1_000)
    tls_broker.start(authority.authority)
    topic = f"galvani/v1/d/tls-{secrets.token_hex(4)}/telemetry"
    sub = new_subscriber(subscribers, tls_broker.port, authority.ca_file, topic)
    poll_until(sub, lambda: sub.connected, "subscribed over TLS")

    count = 200
    payloads = publish_all(publisher(), topic, count)
    poll_until(sub, lambda: len(sub.pending) == count, f"all {count} messages")
    assert [m.payload for m in sub.take(count)] == payloads


def test_a_broker_certified_by_another_ca_is_refused_and_retried_until_it_verifies(
    tls_broker: TlsBroker,
    authority: Authority,
    tmp_path: Path,
    subscribers: list[Subscriber],
    fast_retries: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    stranger = new_authority(tmp_path, "another-ca")
    tls_broker.start(stranger.authority)
    topic = "galvani/v1/d/tls-stranger/telemetry"
    sub = new_subscriber(subscribers, tls_broker.port, authority.ca_file, topic)

    with caplog.at_level(logging.ERROR, logger="services.common.subscriber"):
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            sub.poll(POLL_S)
    refusals = [r.getMessage() for r in caplog.records if "did not verify" in r.getMessage()]
    assert len(refusals) >= 3, "each attempt refused, and attempts go on"
    assert "unable to get local issuer certificate" in refusals[0]
    assert not sub.connected
    assert sub._sock is None

    # The same subscriber, still retrying, connects once the broker presents a certificate of
    # the CA it trusts: no restart of the worker.
    tls_broker.stop()
    tls_broker.start(authority.authority)
    poll_until(sub, lambda: sub.connected, "connected once the broker's certificate verifies")


def test_a_broker_certified_for_another_host_name_is_refused(
    tls_broker: TlsBroker,
    authority: Authority,
    subscribers: list[Subscriber],
    fast_retries: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    tls_broker.start(authority.authority, hosts=("broker.example.com",))
    sub = new_subscriber(subscribers, tls_broker.port, authority.ca_file, "galvani/v1/d/x/state")

    with caplog.at_level(logging.ERROR, logger="services.common.subscriber"):
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            sub.poll(POLL_S)
    refusals = [r.getMessage() for r in caplog.records if "did not verify" in r.getMessage()]
    assert refusals, "the connection was refused at the handshake"
    assert "mismatch" in refusals[0]  # OpenSSL: "IP address mismatch, certificate is not valid"
    assert not sub.connected


def test_a_plaintext_client_is_not_what_the_tls_listener_serves(
    tls_broker: TlsBroker, authority: Authority, subscribers: list[Subscriber]
) -> None:
    # The control for the tests above: the subscriber connects only because it speaks TLS.
    tls_broker.start(authority.authority)
    sub = new_subscriber(subscribers, tls_broker.port, authority.ca_file, "galvani/v1/d/x/state")
    plain = Subscriber(
        SubscriberConfig(**{**sub.config.__dict__, "tls": None, "client_id": "tls-plain"})
    )
    subscribers.append(plain)
    end = time.monotonic() + 1.0
    while time.monotonic() < end:
        plain.poll(POLL_S)
    assert not plain.connected
    poll_until(sub, lambda: sub.connected, "the TLS subscriber connected")


def test_readiness_completes_a_verified_handshake(
    tls_broker: TlsBroker, authority: Authority, tmp_path: Path
) -> None:
    tls_broker.start(authority.authority)
    stranger = new_authority(tmp_path, "another-ca")
    assert _broker_ok("127.0.0.1", tls_broker.port, client_context(authority.ca_file))
    assert not _broker_ok("127.0.0.1", tls_broker.port, client_context(stranger.ca_file))
    assert not _broker_ok("localhost", free_port(), client_context(authority.ca_file))


# paho-mqtt 2.2.0 leaves the socket of a failed handshake to the garbage collector
# (Client._ssl_wrap_socket does not close it when do_handshake raises), which warns.
@pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <ssl.SSLSocket:pytest.PytestUnraisableExceptionWarning"
)
def test_the_publisher_refuses_a_broker_of_another_ca_and_connects_once_it_verifies(
    tls_broker: TlsBroker, authority: Authority, tmp_path: Path
) -> None:
    stranger = new_authority(tmp_path, "another-ca")
    tls_broker.start(stranger.authority)
    client = connect_publisher(settings_for(tls_broker.port, authority.ca_file), "tls-pub-refused")
    try:
        time.sleep(1.5)  # paho's first attempt and its first retry (reconnect_delay_set(1, 30))
        assert not client.is_connected()
        tls_broker.stop()
        tls_broker.start(authority.authority)
        deadline = time.monotonic() + 35  # at most paho's longest delay, 30 s
        while not client.is_connected():
            assert time.monotonic() < deadline, "the publisher did not reconnect"
            time.sleep(POLL_S)
    finally:
        client.disconnect()
        client.loop_stop()
        gc.collect()  # the leaked sockets' warnings here, not in a later test
