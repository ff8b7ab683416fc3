"""A worker's JetStream consumer on the 3-node cluster (deploy/stack/nats_cluster.py) when a
node fails: the node it is connected to is killed or paused (it moves to a survivor), or the
node leading its consumer is killed (it stays and pulls from the new leader). Every message
the stream accepted is delivered; none is lost.

Messages are published with JetStream's publish acknowledgement, retried under a Nats-Msg-Id
until one comes, so that the test knows what the stream accepted (the MQTT gateway's PUBACK
to a device does not say that; the device's stored acks do).
"""

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.stack.nats_cluster import NatsCluster
from deploy.stack.pki import DevelopmentPKI
from services.common.broker.jetstream import JetStreamConfig, JetStreamSource
from services.common.broker.nats_client import ConnectionLost, NatsClient
from services.common.tls import client_context
from tests.nats import running_cluster

pytestmark = pytest.mark.slow

USERS = {"galvani-ingest": "ingest-test-password", "tester": "tester-test-password"}
ACK_WAIT_S = 2.0
RECOVERY_LIMIT_S = 45.0


@pytest.fixture
def cluster(tmp_path: Path, pki: DevelopmentPKI) -> Iterator[NatsCluster]:
    with running_cluster(tmp_path / "nats", pki, static_users=USERS) as started:
        yield started


class Publisher:
    """Publishes numbered messages into the stream, each until JetStream acknowledges it."""

    def __init__(self, cluster: NatsCluster, pki: DevelopmentPKI) -> None:
        self.client = NatsClient(
            cluster.nats_urls().split(","),
            user="tester",
            password=USERS["tester"],
            tls=client_context(pki.ca_file),
            name="publisher",
        )
        self.inbox = "_INBOX.publisher"
        self.client.subscribe(f"{self.inbox}.>")
        self.client.connect(5.0)
        self.sent: set[int] = set()

    def send(self, number: int) -> None:
        """Publish message ``number`` until the stream acknowledges it (a retry is deduplicated
        by its Nats-Msg-Id)."""
        deadline = time.monotonic() + RECOVERY_LIMIT_S
        failures = 0
        while time.monotonic() < deadline:
            try:
                if failures >= 2:
                    # A paused node keeps the connection open and answers nothing.
                    self.client.close()
                    failures = 0
                if not self.client.connected:
                    self.client.connect(5.0)
                reply = f"{self.inbox}.{number}.{time.monotonic_ns()}"
                self.client.publish(
                    "galvani.v1.d.dev-1.telemetry",
                    b"%d" % number,
                    reply=reply,
                    headers={"Nats-Msg-Id": str(number)},
                )
                if self._acked(reply):
                    self.sent.add(number)
                    return
                failures += 1
            except ConnectionLost:
                time.sleep(0.2)
        raise AssertionError(f"message {number} was never accepted by the stream")

    def _acked(self, reply: str) -> bool:
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            for message in self.client.poll(0.1):
                if message.subject == reply and message.status is None:
                    return "error" not in json.loads(message.payload)
                if message.subject == reply:
                    return False  # 503: no stream leader yet
        return False

    def close(self) -> None:
        self.client.close()


def worker(cluster: NatsCluster, pki: DevelopmentPKI) -> JetStreamSource:
    source = JetStreamSource(
        JetStreamConfig(
            servers=tuple(cluster.nats_urls().split(",")),
            user="galvani-ingest",
            password=USERS["galvani-ingest"],
            tls=client_context(pki.ca_file),
            name="w1",
            durable="ingest",
            receive_maximum=100,
            ack_wait_s=ACK_WAIT_S,
        )
    )
    deadline = time.monotonic() + 20
    while not source.connected:
        assert time.monotonic() < deadline, "the worker did not connect"
        source.poll(0.1)
    return source


def node_of(cluster: NatsCluster, source: JetStreamSource) -> int:
    port = int(source._client.server.rsplit(":", 1)[1])
    return [node.client_port for node in cluster.nodes].index(port)


def consumer_leader(cluster: NatsCluster) -> int:
    """The node leading the consumer ``ingest``, as a running node's /jsz says."""
    for i in range(len(cluster.nodes)):
        if not cluster.alive(i):
            continue
        jsz = cluster.monitor(i, "/jsz?accounts=true&streams=true&consumers=true&acc=GALVANI")
        for account in (jsz or {}).get("account_details") or []:
            for stream in account.get("stream_detail") or []:
                for consumer in stream.get("consumer_detail") or []:
                    leader = (consumer.get("cluster") or {}).get("leader")
                    if consumer.get("name") == "ingest" and leader:
                        return [node.name for node in cluster.nodes].index(leader)
    raise AssertionError("no leader for the consumer")


def consume(source: JetStreamSource, seen: list[int], seconds: float) -> None:
    """Poll, taking and acknowledging everything, for ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        source.poll(0.05)
        batch = source.take(1000)
        seen += [int(m.payload) for m in batch]
        source.ack(batch)


@pytest.mark.parametrize("fault", ["kill", "pause", "kill-leader"])
def test_the_worker_survives_a_node_fault_and_loses_nothing(
    cluster: NatsCluster, pki: DevelopmentPKI, fault: str
) -> None:
    source = worker(cluster, pki)
    publisher = Publisher(cluster, pki)
    seen: list[int] = []
    victim = -1
    try:
        for number in range(100):
            publisher.send(number)
        consume(source, seen, 1.0)
        assert sorted(set(seen)) == list(range(100))
        victim = node_of(cluster, source)
        if fault == "kill-leader":
            # The worker's node stays up; the consumer's (and its pulls') leader goes.
            victim = consumer_leader(cluster)
            deadline = time.monotonic() + 20
            while not source.connected or node_of(cluster, source) == victim:
                assert time.monotonic() < deadline, "the worker did not leave the leader"
                if source.connected:
                    source._lose("the test moves the worker off the consumer's leader")
                source.poll(0.1)
            cluster.kill(victim, signal.SIGKILL)
        elif fault == "kill":
            cluster.kill(victim, signal.SIGKILL)
        else:
            cluster.pause(victim)
        faulted = time.monotonic()
        for number in range(100, 200):
            publisher.send(number)
            consume(source, seen, 0.0)
        deadline = time.monotonic() + RECOVERY_LIMIT_S
        while set(range(200)) - set(seen) and time.monotonic() < deadline:
            consume(source, seen, 0.2)
        recovered_s = time.monotonic() - faulted
        missing = set(range(200)) - set(seen)
        assert not missing, f"never delivered: {sorted(missing)[:10]}..."
        assert source.connected
        assert node_of(cluster, source) != victim  # moved, or (kill-leader) never on it
        print(
            f"\n{fault}: every message delivered {recovered_s:.1f} s after the fault; "
            f"{len(seen) - len(set(seen))} redelivered, reconnects={source.stats.reconnects}"
        )
    finally:
        if fault == "pause" and victim >= 0:
            cluster.resume(victim)
        source.close()
        publisher.close()
