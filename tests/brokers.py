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
* ``device(...)`` / ``service(...)``: an MQTT client (tests/mqtt.py's ``MqttClient``) as the
  engine's devices speak (MQTT 5 on Mosquitto's device listener, MQTT 3.1.1 on any NATS node's
  MQTT port), not yet connected;
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

import psycopg

from deploy.stack.mosquitto import MosquittoBroker
from deploy.stack.nats_cluster import NatsCluster
from services.common.broker.nats_client import NatsClient
from services.common.broker.subjects import CONSUMER_NOT_FOUND, STREAM, JetStreamError, api
from services.common.broker_auth import BrokerFiles, ServiceAccount, sync_device_credentials
from services.common.tls import client_context
from tests.ingest import Device, IngestWorkers, ServiceWorkers
from tests.mqtt import MQTT_5, MQTT_311, MqttClient
from tests.nats import CalloutSetup, ResponderProcess
from tests.rules import RulesWorkers

BrokerKind = Literal["mosquitto", "nats"]
KINDS: tuple[BrokerKind, ...] = ("mosquitto", "nats")
TIMEOUT_S = 5.0
_prefixes = itertools.count(1)
W = TypeVar("W", bound=ServiceWorkers)


def unique_prefix(stem: str) -> str:
    """A device id prefix no other test of the run uses: the NATS cluster is shared, and its
    retained messages (configs, presence) outlive a test."""
    return f"{stem}{os.getpid() % 10000}x{next(_prefixes)}"


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
    clients: list[MqttClient] = field(default_factory=list)

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
    ) -> MqttClient:
        """A client as ``device`` (not connected yet), on ``node`` of a cluster; closed after
        the test."""
        ports = self.device_ports()
        client = MqttClient(
            "127.0.0.1",
            ports[node % len(ports)],
            device.device_id,
            device.password if password is None else password,
            client_id=client_id or device.device_id,
            protocol=self.protocol,
            will=will,
        )
        self.clients.append(client)
        return client

    def service(self, account: ServiceAccount, client_id: str, *, node: int = 0) -> MqttClient:
        """A backend client (not connected yet) under ``account``: Mosquitto's service listener
        over MQTT 5, or a node's MQTT port over 3.1.1; closed after the test."""
        if self.mosquitto is not None:
            port, protocol = self.mosquitto.config.service_port, MQTT_5
        else:
            port, protocol = self.device_ports()[node % self.nodes], MQTT_311
        client = MqttClient(
            "127.0.0.1",
            port,
            account.value,
            self.passwords[account],
            client_id=client_id,
            protocol=protocol,
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
