"""The broker a test runs against, whichever engine it is: Mosquitto (the single-machine
default) or the 3-node NATS cluster (``make run-cluster``).

Usage: ask for the ``broker_under_test`` fixture (tests/conftest.py). It is parametrised
``["mosquitto", "nats"]``, so a test taking it runs once on each engine, and it hands the test a
:class:`BrokerUnderTest` bound to the test's own database:

* ``admit()`` after provisioning devices: Mosquitto renders their credentials and reloads;
  NATS does nothing, since the auth callout asks the database at each CONNECT;
* ``ingest_workers()`` / ``rules_workers()``: worker processes of a share group of the test's
  own, with the environment each engine needs (Mosquitto's service listener; on NATS
  ``GALVANI_BROKER=nats``, the nodes' NATS URLs and MQTT ports), stopped after the test;
* ``device(...)`` / ``service(...)``: an MQTT client as the engine's devices speak (MQTT 5 on
  Mosquitto's device listener, MQTT 3.1.1 on any NATS node's MQTT port), not yet connected;
* ``agent_args()``: what ``galvani-agent`` needs besides a port to speak to this engine.

The servers are shared: Mosquitto and the callout cluster are the session's (conftest's
``broker`` and ``nats_callout``), started only when a test first needs that engine. What keeps
tests apart is what the suite already gives each test: its own database, device ids of its own
(:func:`unique_prefix`) and worker groups of its own. On NATS each test runs its own
auth-callout responder on its database (1.1 to 2.8 s to start, serving, measured on this
loaded 2-core box: cheaper than anything that would share one responder between databases),
and at the end deletes its groups' JetStream consumers, so the shared stream keeps nothing for
them.
"""

import itertools
import os
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

import paho.mqtt.client as paho
import psycopg
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from deploy.stack.mosquitto import MosquittoBroker
from deploy.stack.nats_cluster import NatsCluster
from services.common.broker.nats_client import NatsClient
from services.common.broker.subjects import CONSUMER_NOT_FOUND, STREAM, JetStreamError, api
from services.common.broker_auth import BrokerFiles, ServiceAccount, sync_device_credentials
from services.common.tls import client_context
from tests.ingest import Device, IngestWorkers, ServiceWorkers
from tests.mqtt import Received, suite_tls
from tests.nats import CalloutSetup, ResponderProcess
from tests.rules import RulesWorkers

BrokerKind = Literal["mosquitto", "nats"]
KINDS: tuple[BrokerKind, ...] = ("mosquitto", "nats")
TIMEOUT_S = 5.0
MQTT_5 = 5
MQTT_311 = 4
_prefixes = itertools.count(1)
W = TypeVar("W", bound=ServiceWorkers)
_CONNACK_311 = {0x84: 1, 0x85: 2, 0x88: 3, 0x86: 4, 0x87: 5}


def unique_prefix(stem: str) -> str:
    """A device id prefix no other test of the run uses: the NATS cluster is shared, and its
    retained messages (configs, presence) outlive a test."""
    return f"{stem}{os.getpid() % 10000}x{next(_prefixes)}"


class Refused(Exception):
    """The broker refused the CONNECT (``code``: the CONNACK's reason or return code, -1 when
    the connection closed or timed out without one)."""

    def __init__(self, code: int) -> None:
        super().__init__(f"CONNACK {code:#x}")
        self.code = code


@dataclass
class DeviceClient:
    """A synchronous MQTT client of either protocol: MQTT 5 (clean start, no session expiry)
    or 3.1.1 (clean session), QoS 1, an optional retained last will."""

    host: str
    port: int
    client_id: str
    username: str
    password: str
    protocol: int = MQTT_5
    will: tuple[str, bytes] | None = None
    tls: ssl.SSLContext | None = field(default_factory=suite_tls)
    received: list[Received] = field(default_factory=list)

    def __post_init__(self) -> None:
        v5 = self.protocol == MQTT_5
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
            clean_session=None if v5 else True,
        )
        if self.tls is not None:
            self._client.tls_set_context(self.tls)
        self._client.username_pw_set(self.username, self.password)
        if self.will is not None:
            self._client.will_set(self.will[0], self.will[1], qos=1, retain=True)
        self._connected = threading.Event()
        self._disconnected = threading.Event()
        self._connack: int | None = None
        self._lock = threading.Condition()
        self._pubacks: dict[int, int] = {}
        self._subacks: dict[int, int] = {}
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # type: ignore[no-untyped-def]
        code = int(reason_code.value)
        # paho reports a 3.1.1 CONNACK as the MQTT 5 reason its return code maps to; back to
        # 3.1.1's numbers (4 bad user name or password, 5 not authorized).
        self._connack = code if self.protocol == MQTT_5 else _CONNACK_311.get(code, code)
        self._connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:  # type: ignore[no-untyped-def]
        self._disconnected.set()
        self._connected.set()

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:  # type: ignore[no-untyped-def]
        with self._lock:
            self._pubacks[mid] = int(reason_code.value)
            self._lock.notify_all()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:  # type: ignore[no-untyped-def]
        with self._lock:
            self._subacks[mid] = int(reason_codes[0].value)
            self._lock.notify_all()

    def _on_message(self, client, userdata, message) -> None:  # type: ignore[no-untyped-def]
        with self._lock:
            self.received.append(Received(message.topic, message.payload, message.retain))
            self._lock.notify_all()

    def connect(self) -> "DeviceClient":
        """Connect, or raise :class:`Refused`."""
        try:
            if self.protocol == MQTT_5:
                properties = Properties(PacketTypes.CONNECT)
                properties.SessionExpiryInterval = 0
                self._client.connect(
                    self.host, self.port, keepalive=30, clean_start=True, properties=properties
                )
            else:
                self._client.connect(self.host, self.port, keepalive=30)
        except OSError:
            raise Refused(-1) from None
        self._client.loop_start()
        if not self._connected.wait(TIMEOUT_S) or self._connack is None:
            self.close()
            raise Refused(-1)
        if self._connack != 0:
            code = self._connack
            self.close()
            raise Refused(code)
        return self

    @property
    def connected(self) -> bool:
        return self._client.is_connected()

    def wait_disconnected(self, timeout_s: float = TIMEOUT_S) -> bool:
        """Whether the connection closed within ``timeout_s``."""
        return self._disconnected.wait(timeout_s)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> int:
        """Publish at QoS 1; the PUBACK's reason code (always 0 in 3.1.1, which has none)."""
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        with self._lock:
            if not self._lock.wait_for(lambda: info.mid in self._pubacks, TIMEOUT_S):
                raise TimeoutError(f"no PUBACK for {topic}")
            return self._pubacks[info.mid]

    def subscribe(self, topic: str) -> int:
        """Subscribe at QoS 1; the SUBACK's code (0x80 and above: refused)."""
        _, mid = self._client.subscribe(topic, qos=1)
        with self._lock:
            if not self._lock.wait_for(lambda: mid in self._subacks, TIMEOUT_S):
                raise TimeoutError(f"no SUBACK for {topic}")
            return self._subacks[mid]

    def wait_for(self, topic: str, timeout_s: float = TIMEOUT_S) -> Received | None:
        """The first message received on ``topic`` within ``timeout_s``, or None."""
        with self._lock:
            self._lock.wait_for(lambda: any(m.topic == topic for m in self.received), timeout_s)
            return next((m for m in self.received if m.topic == topic), None)

    def messages(self, topic: str) -> list[Received]:
        with self._lock:
            return [m for m in self.received if m.topic == topic]

    def drop(self) -> None:
        """Close the socket without DISCONNECT, as a device losing power would."""
        self._client.loop_stop()
        sock = self._client.socket()
        if sock is not None:
            sock.close()
        self._client._reset_sockets(sockpair_only=True)

    def close(self) -> None:
        """DISCONNECT and stop the network thread."""
        self._client.disconnect()
        self._client.loop_stop()
        self._client._reset_sockets(sockpair_only=True)


@dataclass
class BrokerUnderTest:
    """One engine as the test's devices and workers see it, bound to the test's database."""

    kind: BrokerKind
    database_url: str
    log_dir: Path
    passwords: dict[ServiceAccount, str]
    ca_file: Path
    mosquitto: MosquittoBroker | None = None
    cluster: NatsCluster | None = None
    responder: ResponderProcess | None = None
    workers: list[ServiceWorkers] = field(default_factory=list)
    clients: list[DeviceClient] = field(default_factory=list)

    @property
    def protocol(self) -> int:
        """The MQTT protocol level devices speak to this engine (NATS's gateway: 3.1.1 only)."""
        return MQTT_311 if self.kind == "nats" else MQTT_5

    @property
    def nodes(self) -> int:
        return len(self.device_ports())

    def device_ports(self) -> list[int]:
        """Where devices connect: Mosquitto's device listener, or every node's MQTT port."""
        if self.cluster is not None:
            return [node.mqtt_port for node in self.cluster.nodes]
        assert self.mosquitto is not None
        return [self.mosquitto.config.device_port]

    def admit(self) -> None:
        """Let the devices just provisioned in the database in: Mosquitto's files are rendered
        and it reloads; the cluster needs nothing (its callout reads the database)."""
        if self.mosquitto is None:
            return
        with psycopg.connect(self.database_url) as conn:
            sync_device_credentials(conn, BrokerFiles(self.mosquitto.config.directory))

    def device(
        self,
        device: Device,
        *,
        node: int = 0,
        client_id: str | None = None,
        password: str | None = None,
        will: tuple[str, bytes] | None = None,
    ) -> DeviceClient:
        """A client as ``device`` (not connected yet), on ``node`` of a cluster; closed after
        the test."""
        ports = self.device_ports()
        client = DeviceClient(
            "127.0.0.1",
            ports[node % len(ports)],
            client_id or device.device_id,
            device.device_id,
            device.password if password is None else password,
            protocol=self.protocol,
            will=will,
        )
        self.clients.append(client)
        return client

    def service(self, account: ServiceAccount, client_id: str, *, node: int = 0) -> DeviceClient:
        """A backend client (not connected yet) under ``account``: Mosquitto's service listener
        over MQTT 5, or a node's MQTT port over 3.1.1; closed after the test."""
        if self.mosquitto is not None:
            port, protocol = self.mosquitto.config.service_port, MQTT_5
        else:
            port, protocol = self.device_ports()[node % self.nodes], MQTT_311
        client = DeviceClient(
            "127.0.0.1", port, client_id, account.value, self.passwords[account], protocol
        )
        self.clients.append(client)
        return client

    def agent_args(self) -> list[str]:
        """``galvani-agent run`` arguments besides ``--port`` (one of :meth:`device_ports`)
        that this engine needs: MQTT 3.1.1 on NATS."""
        return ["--mqtt-version=3.1.1"] if self.kind == "nats" else []

    def ingest_workers(self, database_url: str, **env: str) -> IngestWorkers:
        """Ingest workers (not started) for ``database_url`` (ingest's role)."""
        workers = self._workers(IngestWorkers, database_url, env)
        return workers

    def rules_workers(self, database_url: str, key_dir: Path, **env: str) -> RulesWorkers:
        """Rules workers (not started) for ``database_url`` (rules' role), signing with the key
        in ``key_dir``."""
        env = {"GALVANI_RULES_SIGNING_KEY_DIR": str(key_dir), **env}
        return self._workers(RulesWorkers, database_url, env)

    def _workers(self, kind: type[W], database_url: str, env: dict[str, str]) -> W:
        account = ServiceAccount(f"galvani-{kind.service}")
        if self.mosquitto is not None:
            workers = kind.on_broker(
                database_url, self.mosquitto, self.passwords, self.log_dir, **env
            )
        else:
            assert self.cluster is not None
            workers = kind.on_nats(
                database_url,
                self.cluster.nats_urls(),
                self.passwords[account],
                self.log_dir,
                self.ca_file,
                mqtt_port=self.device_ports()[0],
                GALVANI_MQTT_NODES=self.cluster.mqtt_nodes(),
                **env,
            )
        self.workers.append(workers)
        return workers

    def close(self) -> None:
        """Close the clients, stop the workers (deleting their JetStream consumers on NATS)
        and the responder."""
        for client in self.clients:
            client.close()
        for workers in self.workers:
            workers.close()
        if self.cluster is not None and self.workers:
            self._delete_consumers()
        if self.responder is not None:
            self.responder.stop()

    def _delete_consumers(self) -> None:
        """The groups' durable consumers outlive their workers; left behind, the stream's
        interest retention would keep every later message for them."""
        assert self.cluster is not None
        client = NatsClient(
            self.cluster.nats_urls().split(","),
            user=ServiceAccount.INGEST.value,
            password=self.passwords[ServiceAccount.INGEST],
            tls=client_context(self.ca_file),
            name="galvani-test-cleanup",
        )
        client.connect(TIMEOUT_S)
        try:
            for workers in self.workers:
                try:
                    api(client, f"$JS.API.CONSUMER.DELETE.{STREAM}.{workers.group}", None)
                except JetStreamError as exc:
                    if exc.code != CONSUMER_NOT_FOUND:
                        raise
        finally:
            client.close()


def open_broker_under_test(
    kind: BrokerKind,
    database_url: str,
    log_dir: Path,
    passwords: dict[ServiceAccount, str],
    ca_file: Path,
    *,
    mosquitto: MosquittoBroker | None = None,
    callout: tuple[NatsCluster, CalloutSetup] | None = None,
) -> BrokerUnderTest:
    """The engine ``kind`` for one test: Mosquitto as it is, or the callout cluster with a
    responder deciding logins from ``database_url``."""
    if kind == "mosquitto":
        assert mosquitto is not None
        return BrokerUnderTest(kind, database_url, log_dir, passwords, ca_file, mosquitto=mosquitto)
    assert callout is not None
    cluster, setup = callout
    responder = ResponderProcess(cluster, setup, database_url, log_dir / "broker-access.log")
    return BrokerUnderTest(
        kind, database_url, log_dir, passwords, ca_file, cluster=cluster, responder=responder
    )
