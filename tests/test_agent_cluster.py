"""The device agent's link over MQTT 3.1.1 on the 3-node NATS cluster (deploy/stack/
nats_cluster.py, TLS, static users instead of the auth callout): a device whose node is killed
-9 reconnects to a survivor, its outbox goes out there and leaves on the stored-ack; and a
backend's 3.1.1 session takeover on one node ends a device's connection on another.

The test plays the backend with an MQTT 3.1.1 client on a third node: it receives what the
device publishes and sends the stored-ack, as ingest does after its commit.
"""

import asyncio
import json
import random
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from device_agent.connection import MQTT_311
from device_agent.link import BrokerAddress, Link
from device_agent.store import DeviceStore, open_database

from deploy.stack.nats_cluster import NatsCluster
from deploy.stack.pki import DevelopmentPKI
from services.common.broker_certificates import end_device_session
from tests.mqtt import MqttClient, suite_tls
from tests.nats import running_cluster

DEVICE = "dev-cluster-0001"
BACKEND = "backend"
PASSWORDS = {DEVICE: "device-password", BACKEND: "backend-password"}
TELEMETRY = f"galvani/v1/d/{DEVICE}/telemetry"
ACK = f"galvani/v1/d/{DEVICE}/ack"
# A node's death takes JetStream a Raft election (4-9 s in 2.10) before the gateway stores
# QoS 1 messages again; the device's reconnect backoff (1 s doubling, jittered) comes on top.
RECONNECT_LIMIT_S = 30.0
WAIT_S = 30.0
TICK_S = 0.02


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, pki: DevelopmentPKI) -> Iterator[NatsCluster]:
    with running_cluster(tmp_path_factory.mktemp("nats"), pki, static_users=PASSWORDS) as started:
        yield started


def _client(cluster: NatsCluster, node: int, client_id: str, user: str) -> MqttClient:
    """An MQTT 3.1.1 client of ``node`` as ``user``, not connected yet."""
    port = cluster.nodes[node].mqtt_port
    return MqttClient(
        "127.0.0.1", port, user, PASSWORDS[user], client_id=client_id, protocol=MQTT_311
    )


def _backend(cluster: NatsCluster, node: int) -> MqttClient:
    backend = _client(cluster, node, f"backend-{time.monotonic_ns()}", BACKEND).connect()
    assert backend.subscribe(TELEMETRY) == 1
    return backend


def _seqs(backend: MqttClient) -> set[int]:
    return {json.loads(m.payload)["seq"] for m in list(backend.received) if m.topic == TELEMETRY}


async def _until(check: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(TICK_S)


def test_a_311_takeover_on_one_node_ends_the_devices_connection_on_another(
    cluster: NatsCluster,
) -> None:
    client_id = "dev-takeover-0001"
    device = _client(cluster, 0, client_id, DEVICE)
    device.connect()
    try:
        assert end_device_session(
            "127.0.0.1",
            cluster.nodes[1].mqtt_port,
            BACKEND,
            PASSWORDS[BACKEND],
            suite_tls(),
            client_id,
            protocol=4,
        )
        assert device.wait_disconnected(10)
    finally:
        device.close()


@pytest.mark.slow
def test_a_device_whose_node_is_killed_reconnects_to_a_survivor_and_its_outbox_is_stored(
    cluster: NatsCluster, pki: DevelopmentPKI, tmp_path: Path
) -> None:
    backend = _backend(cluster, 2)
    ports = [node.mqtt_port for node in cluster.nodes]
    address = BrokerAddress(
        "127.0.0.1",
        ports[0],
        PASSWORDS[DEVICE],
        ca_file=str(pki.ca_file),
        protocol=MQTT_311,
        fallbacks=tuple(("127.0.0.1", port) for port in ports[1:]),
    )
    conn = open_database(tmp_path / "agent.sqlite3", durable=False)
    store = DeviceStore(conn, DEVICE)

    def enqueue() -> int:
        store.enqueue("telemetry", lambda seq: json.dumps({"v": 1, "seq": seq}).encode(), now_ms=0)
        return store.last_seq()

    def outbox() -> list[int]:
        return [m.seq for m in store.pending(limit=100)]

    async def main() -> float:
        link = Link(
            DEVICE,
            address,
            store,
            lambda raw: None,
            loop=asyncio.get_running_loop(),
            rng=random.Random(1),
        )

        async def service() -> None:
            while True:
                link.pump()
                link.service()
                await asyncio.sleep(TICK_S)

        ticker = asyncio.create_task(service())
        link.start()
        try:
            await _until(lambda: link.connected, "the first connection")
            assert link.node == ("127.0.0.1", ports[0])
            seqs = [enqueue() for _ in range(3)]
            await _until(lambda: _seqs(backend) == set(seqs), "the backend to receive seqs 1-3")

            cluster.kill(0, signal.SIGKILL)
            killed_at = time.monotonic()
            await _until(
                lambda: link.connected and link.node[1] != ports[0],
                "a connection to a surviving node",
                RECONNECT_LIMIT_S,
            )
            reconnect_s = time.monotonic() - killed_at
            seqs.append(enqueue())
            await _until(lambda: _seqs(backend) == set(seqs), "the backend to receive seq 4")
            assert outbox() == seqs  # delivered, not stored: nothing acked yet
            ack = json.dumps({"v": 1, "seqs": [[1, seqs[-1]]]}).encode()
            await asyncio.to_thread(backend.publish, ACK, ack)
            await _until(lambda: outbox() == [], "the stored-ack to empty the outbox")
            return reconnect_s
        finally:
            ticker.cancel()
            link.stop()
            await asyncio.sleep(0.05)

    try:
        reconnect_s = asyncio.run(main())
        print(f"agent_reconnect_after_node_kill_s={reconnect_s:.1f}")
    finally:
        backend.close()
        conn.close()
        cluster.restart(0)
