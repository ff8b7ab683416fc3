"""Test helpers for the NATS cluster: a cluster in a test's directory, and a small synchronous
MQTT 3.1.1 client (NATS's MQTT gateway refuses MQTT 5) over paho-mqtt 2."""

import contextlib
import os
import ssl
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client.parser import text_string_to_metric_families

from deploy.stack.nats_cluster import AUTH_USER, CalloutConfig, NatsCluster, callout_config
from deploy.stack.pki import DevelopmentPKI
from deploy.stack.ports import free_port
from deploy.stack.postgres import new_password
from deploy.stack.processes import Child, http_get, http_ok, spawn
from services.broker_access.settings import ISSUER_SEED_FILE
from services.common.broker_auth import BrokerFiles, ServiceAccount
from services.common.migrations.grants import ServiceRole
from tests.mqtt import Received, suite_tls
from tests.roles import as_service

TIMEOUT_S = 5.0
# MQTT 3.1.1 CONNACK return codes (section 3.2.2.3).
CONNACK_ACCEPTED = 0
CONNACK_BAD_CREDENTIALS = 4
CONNACK_NOT_AUTHORIZED = 5


def cluster_tls(pki: DevelopmentPKI) -> tuple[Path, Path, Path]:
    """The cluster's server certificate, key and CA from the suite's PKI."""
    return (pki.server_cert, pki.server_key, pki.ca_file)


@contextlib.contextmanager
def running_cluster(
    directory: Path,
    pki: DevelopmentPKI,
    *,
    callout: CalloutConfig | None = None,
    static_users: dict[str, str] | None = None,
) -> Iterator[NatsCluster]:
    """A started 3-node cluster under ``directory`` (TLS from ``pki``), stopped afterwards."""
    cluster = NatsCluster(
        directory, tls=cluster_tls(pki), callout=callout, static_users=static_users
    )
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@dataclass(frozen=True)
class CalloutSetup:
    """What a responder needs besides its database: the issuer seed, its own password as
    ``galvani-auth``, and the directory holding the service password file."""

    issuer_seed_file: Path
    auth_password: str
    broker_dir: Path
    ca_file: Path


def callout_setup(
    directory: Path, pki: DevelopmentPKI, service_passwords: dict[ServiceAccount, str]
) -> tuple[CalloutSetup, CalloutConfig]:
    """An issuer key, the responder's password and the service password file under
    ``directory``, and the cluster's callout configuration that goes with them."""
    seed_file = directory / "secrets" / ISSUER_SEED_FILE
    config = callout_config(seed_file, new_password())
    broker_dir = directory / "broker"
    broker_dir.mkdir(parents=True, exist_ok=True)
    BrokerFiles(broker_dir).write_service_files(service_passwords)
    setup = CalloutSetup(
        issuer_seed_file=seed_file,
        auth_password=config.auth_password,
        broker_dir=broker_dir,
        ca_file=pki.ca_file,
    )
    return setup, config


READY_TIMEOUT_S = 20.0


class ResponderProcess:
    """``python -m services.broker_access.main`` for one test's database (as the responder's
    own role), stopped by its pid."""

    def __init__(
        self,
        cluster: NatsCluster,
        setup: CalloutSetup,
        database_url: str,
        log_path: Path,
        responder_id: str = "1",
        nats_urls: str | None = None,
    ) -> None:
        """``nats_urls``: the servers in the order tried (the cluster's, from its first node,
        by default); a cluster's responders each start on another node, as make run-cluster
        starts them, so that one node stopping leaves the others a responder."""
        metrics_port = free_port()
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        env = dict(os.environ)
        env.update(
            {
                "GALVANI_BROKER_ACCESS_METRICS_PORT": str(metrics_port),
                "GALVANI_BROKER": "nats",
                "GALVANI_NATS_URLS": nats_urls or cluster.nats_urls(),
                "GALVANI_BROKER_ACCESS_DATABASE_URL": as_service(
                    database_url, ServiceRole.BROKER_ACCESS
                ),
                "GALVANI_BROKER_ACCESS_MQTT_USERNAME": AUTH_USER,
                "GALVANI_BROKER_ACCESS_MQTT_PASSWORD": setup.auth_password,
                "GALVANI_BROKER_ACCESS_MQTT_CA_FILE": str(setup.ca_file),
                "GALVANI_BROKER_ACCESS_ISSUER_SEED_FILE": str(setup.issuer_seed_file),
                "GALVANI_BROKER_ACCESS_BROKER_DIR": str(setup.broker_dir),
                "GALVANI_BROKER_ACCESS_RESPONDER_ID": responder_id,
                "GALVANI_BROKER_ACCESS_LOG_LEVEL": "DEBUG",
            }
        )
        self.log_path = log_path
        self.child: Child = spawn(
            f"broker-access-{responder_id}",
            [sys.executable, "-m", "services.broker_access.main"],
            log_path,
            env=env,
        )
        self._wait_serving()

    def _wait_serving(self) -> None:
        # The metrics endpoint opens once the responder has subscribed (as make run-cluster
        # waits for it).
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not http_ok(self.metrics_url):
            if not self.child.alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the responder did not start:\n{self.child.log_tail(20)}")
            time.sleep(0.05)

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample of the responder's metrics (0 when absent)."""
        body = http_get(self.metrics_url)
        assert body is not None
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    return float(sample.value)
        return 0.0

    def stop(self) -> None:
        """SIGTERM, then wait."""
        self.child.stop()


class Refused(Exception):
    """The broker refused the CONNECT (``code`` is the CONNACK return code, or -1 when the
    connection closed or timed out without one)."""

    def __init__(self, code: int, detail: str = "") -> None:
        super().__init__(f"CONNACK {code} {detail}".strip())
        self.code = code


@dataclass
class Mqtt311Client:
    """Connect, publish at QoS 0/1, subscribe and collect, over MQTT 3.1.1 with a clean
    session."""

    port: int
    client_id: str
    username: str | None = None
    password: str | None = None
    host: str = "127.0.0.1"
    tls: ssl.SSLContext | None = field(default_factory=suite_tls)
    # (topic, payload): a retained QoS 1 last will, as the device agent sets on presence.
    will: tuple[str, bytes] | None = None
    received: list[Received] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=paho.MQTTv311,
            clean_session=True,
        )
        if self.tls is not None:
            self._client.tls_set_context(self.tls)
        if self.username is not None:
            self._client.username_pw_set(self.username, self.password)
        if self.will is not None:
            self._client.will_set(self.will[0], self.will[1], qos=1, retain=True)
        self._connected = threading.Event()
        self._disconnected = threading.Event()
        self._connack: int | None = None
        self._lock = threading.Condition()
        self._pubacks: set[int] = set()
        self._subacks: dict[int, int] = {}
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connack = _connack_code(reason_code)
        self._connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._disconnected.set()
        self._connected.set()

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._lock:
            self._pubacks.add(mid)
            self._lock.notify_all()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        with self._lock:
            self._subacks[mid] = int(reason_codes[0].value)
            self._lock.notify_all()

    def _on_message(self, client, userdata, message) -> None:
        with self._lock:
            self.received.append(Received(message.topic, message.payload, message.retain))
            self._lock.notify_all()

    def connect(self, timeout_s: float = TIMEOUT_S) -> "Mqtt311Client":
        """Connect, or raise :class:`Refused` with the CONNACK return code."""
        try:
            self._client.connect(self.host, self.port, keepalive=30)
        except OSError as exc:
            raise Refused(-1, str(exc)) from exc
        self._client.loop_start()
        if not self._connected.wait(timeout_s):
            self.close()
            raise Refused(-1, "timeout")
        code = self._connack
        if code != CONNACK_ACCEPTED:
            self.close()
            raise Refused(-1 if code is None else code)
        return self

    @property
    def connected(self) -> bool:
        """Whether the connection is still up."""
        return self._client.is_connected()

    def wait_disconnected(self, timeout_s: float = TIMEOUT_S) -> bool:
        """Whether the broker closed the connection within ``timeout_s``."""
        return self._disconnected.wait(timeout_s)

    def publish(
        self, topic: str, payload: bytes, *, retain: bool = False, timeout_s: float = TIMEOUT_S
    ) -> None:
        """Publish at QoS 1 and wait for the PUBACK (TimeoutError without one)."""
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        with self._lock:
            if not self._lock.wait_for(lambda: info.mid in self._pubacks, timeout_s):
                raise TimeoutError(f"no PUBACK for {topic} within {timeout_s} s")

    def subscribe(self, topic: str, qos: int = 1) -> int:
        """Subscribe and return the SUBACK return code (0x80 = refused)."""
        _, mid = self._client.subscribe(topic, qos=qos)
        with self._lock:
            if not self._lock.wait_for(lambda: mid in self._subacks, TIMEOUT_S):
                raise TimeoutError(f"no SUBACK for {topic}")
            return self._subacks[mid]

    def wait_for(self, topic: str, timeout_s: float = TIMEOUT_S) -> Received | None:
        """The first message received on ``topic`` within ``timeout_s``, or None."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while True:
                for message in self.received:
                    if message.topic == topic:
                        return message
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._lock.wait(remaining)

    def drop(self) -> None:
        """Close the socket without DISCONNECT, as a device losing power would (its will
        fires)."""
        self._client.loop_stop()
        sock = self._client.socket()
        if sock is not None:
            sock.close()
        self._client._reset_sockets(sockpair_only=True)

    def close(self) -> None:
        """Disconnect and stop the network thread."""
        self._client.disconnect()
        self._client.loop_stop()
        self._client._reset_sockets(sockpair_only=True)


def _connack_code(reason_code: object) -> int:
    # paho 2 reports a 3.1.1 CONNACK as a ReasonCode made from the return code
    # (client.py: convert_connack_rc_to_reason_code); map it back to 3.1.1's numbers.
    value = int(getattr(reason_code, "value", 0))
    return {0: 0, 0x84: 1, 0x85: 2, 0x88: 3, 0x86: 4, 0x87: 5}.get(value, value)


def connack_of(port: int, client_id: str, username: str | None, password: str | None) -> int:
    """The CONNACK return code a CONNECT with these credentials gets (0 = accepted)."""
    client = Mqtt311Client(port, client_id, username, password)
    try:
        client.connect()
    except Refused as refused:
        return refused.code
    client.close()
    return CONNACK_ACCEPTED
