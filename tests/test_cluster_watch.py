"""The cluster watch: a NATS node's health and JetStream backlog as maintenance metrics, read
from a real nats-server's monitoring port (one node, JetStream, the Galvani account)."""

import json
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from deploy.stack.nats_cluster import NatsCluster
from deploy.stack.pki import DevelopmentPKI
from deploy.stack.ports import distinct_free_ports, free_port
from deploy.stack.processes import Child, http_get, spawn, wait_until
from services.common.broker.nats_client import NatsClient
from services.common.broker.subjects import ensure_consumer, ensure_stream
from services.common.settings import REPO_ROOT
from services.common.tls import client_context
from services.maintenance.cluster_watch import (
    JETSTREAM_ACCOUNT,
    ClusterCollector,
    ClusterStats,
    ClusterWatch,
    node_label,
    read_jsz,
)
from services.maintenance.settings import MaintenanceSettings
from tests.maintenance import spawn_maintenance
from tests.nats import running_cluster

STREAM = "GALVANI_DEVICES"
SERVICE_PASSWORD = "cluster-watch-test"


def exported(stats: ClusterStats) -> str:
    """The metrics page maintenance would serve for ``stats``."""
    registry = CollectorRegistry()
    registry.register(ClusterCollector(stats))
    return generate_latest(registry).decode()


def sample(page: str, name: str, **labels: str) -> float | None:
    """The value of the series ``name`` whose labels include ``labels``, or None."""
    for match in re.finditer(rf"^{name}\{{([^}}]*)\}} (\S+)$", page, re.M):
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
        if labels.items() <= found.items():
            return float(match.group(2))
    return None


def jsz(*consumers: dict[str, Any], stream_leader: str = "n1") -> dict[str, Any]:
    """A /jsz?consumers=true answer with one stream in the Galvani account."""
    stream = {
        "name": STREAM,
        "cluster": {"leader": stream_leader},
        "state": {"messages": 9},
        "consumer_detail": list(consumers),
    }
    return {"account_details": [{"name": JETSTREAM_ACCOUNT, "stream_detail": [stream]}]}


def test_consumers_are_reported_by_their_leader_only() -> None:
    """Every replica lists every consumer it holds, with its own (possibly stale) figures."""
    answer = jsz(
        {"name": "ingest", "cluster": {"leader": "n2"}, "num_pending": 5, "num_ack_pending": 1},
        {"name": "rules", "cluster": {"leader": "n1"}, "num_pending": 7, "num_ack_pending": 2},
    )
    streams, consumers = read_jsz(answer, "n1")
    assert streams == ((STREAM, 9),)
    assert [(c.consumer, c.pending, c.ack_pending) for c in consumers] == [("rules", 7, 2)]
    streams, consumers = read_jsz(answer, "n2")
    assert streams == ()
    assert [c.consumer for c in consumers] == ["ingest"]
    # During an election the replicas name no leader: nobody reports the consumer.
    leaderless = jsz(
        {"name": "ingest", "cluster": {"name": "galvani"}, "num_pending": 5, "num_ack_pending": 0}
    )
    assert read_jsz(leaderless, "n1")[1] == ()


def test_a_single_node_reports_consumers_it_names_no_leader_for() -> None:
    answer = jsz({"name": "ingest", "num_pending": 3, "num_ack_pending": 0})
    assert [c.consumer for c in read_jsz(answer, "n1")[1]] == ["ingest"]
    # Another account's streams (the MQTT sessions' in $G, say) are not Galvani's backlog.
    other = jsz({"name": "ingest", "num_pending": 3, "num_ack_pending": 0})
    other["account_details"][0]["name"] = "OTHER"
    assert read_jsz(other, "n1") == ((), ())


def test_nodes_count_as_down_until_polled() -> None:
    stats = ClusterStats(["http://127.0.0.1:1/", "http://127.0.0.1:2"])
    page = exported(stats)
    assert sample(page, "galvani_broker_node_up", node="127.0.0.1:1") == 0
    assert sample(page, "galvani_broker_node_up", node="127.0.0.1:2") == 0
    assert "galvani_broker_node_connections{" not in page


def test_monitor_urls_setting_is_a_comma_separated_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GALVANI_MAINTENANCE_DATABASE_URL", "postgresql://x@127.0.0.1/x")
    monkeypatch.setenv(
        "GALVANI_MAINTENANCE_NATS_MONITOR_URLS", " http://127.0.0.1:8222, http://127.0.0.1:8223,"
    )
    assert MaintenanceSettings().nats_monitor_url_list() == [
        "http://127.0.0.1:8222",
        "http://127.0.0.1:8223",
    ]
    monkeypatch.delenv("GALVANI_MAINTENANCE_NATS_MONITOR_URLS")
    assert MaintenanceSettings().nats_monitor_url_list() == []


class NatsConnection:
    """Just enough of the NATS client protocol to set up a stream and leave work pending."""

    def __init__(self, port: int) -> None:
        self._socket = socket.create_connection(("127.0.0.1", port), timeout=5)
        self._reader = self._socket.makefile("rb")
        assert self._reader.readline().startswith(b"INFO ")
        connect = {"user": "svc", "pass": SERVICE_PASSWORD, "verbose": False, "pedantic": False}
        self._socket.sendall(b"CONNECT %s\r\nSUB _INBOX.t 1\r\n" % json.dumps(connect).encode())

    def request(self, subject: str, payload: dict[str, Any]) -> dict[str, Any]:
        """Publish ``payload`` to ``subject`` and return the JSON reply."""
        body = json.dumps(payload).encode()
        self._socket.sendall(b"PUB %s _INBOX.t %d\r\n%s\r\n" % (subject.encode(), len(body), body))
        while True:
            line = self._reader.readline()
            assert line, "nats-server closed the connection"
            assert not line.startswith(b"-ERR"), line
            if line.startswith(b"PING"):
                self._socket.sendall(b"PONG\r\n")
            elif line.startswith(b"MSG "):
                size = int(line.split()[-1])
                reply: dict[str, Any] = json.loads(self._reader.read(size + 2)[:size])
                return reply

    def close(self) -> None:
        self._reader.close()
        self._socket.close()


@pytest.fixture
def nats_node(tmp_path: Path) -> Iterator[tuple[Child, int, int]]:
    """One nats-server with JetStream, the Galvani and system accounts and a monitoring port:
    (process, client port, monitoring port)."""
    found = subprocess.run(
        ["bash", str(REPO_ROOT / "deploy" / "install-nats.sh")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert found.returncode == 0, found.stderr
    binary = found.stdout.strip().splitlines()[-1]
    client_port, http_port = distinct_free_ports(2)
    config = tmp_path / "nats.conf"
    config.write_text(
        f"""
server_name: watch-test
listen: 127.0.0.1:{client_port}
http: 127.0.0.1:{http_port}
jetstream {{ store_dir: "{tmp_path / "js"}" }}
accounts {{
  {JETSTREAM_ACCOUNT} {{ jetstream: enabled, users: [{{user: svc, password: {SERVICE_PASSWORD}}}] }}
  SYS {{ users: [{{user: sys, password: {SERVICE_PASSWORD}}}] }}
}}
system_account: SYS
"""
    )
    child = spawn("nats", [binary, "-c", str(config)], tmp_path / "nats.log")
    try:
        wait_until(
            lambda: b"Server is ready" in child.log_path.read_bytes(),
            child=child,
            timeout_s=20,
            what="nats-server",
        )
        yield child, client_port, http_port
    finally:
        child.stop()


def stopped(pid: int) -> bool:
    """Whether every thread of ``pid`` has stopped: a signal reaches a busy multithreaded
    process (nats-server's Go runtime) thread by thread, and one still running answers."""
    tasks = Path(f"/proc/{pid}/task")
    return all(
        (task / "stat").read_text().rsplit(")", 1)[1].split()[0] == "T" for task in tasks.iterdir()
    )


def test_watch_reads_a_live_node_and_sees_it_stop(nats_node: tuple[Child, int, int]) -> None:
    child, client_port, http_port = nats_node
    nats = NatsConnection(client_port)
    try:
        created = nats.request(
            f"$JS.API.STREAM.CREATE.{STREAM}",
            {"name": STREAM, "subjects": ["galvani.v1.d.*.telemetry"], "retention": "interest"},
        )
        assert "error" not in created, created
        for consumer in ("ingest", "rules"):
            made = nats.request(
                f"$JS.API.CONSUMER.DURABLE.CREATE.{STREAM}.{consumer}",
                {
                    "stream_name": STREAM,
                    "config": {"durable_name": consumer, "ack_policy": "explicit"},
                },
            )
            assert "error" not in made, made
        for n in range(5):
            assert nats.request("galvani.v1.d.dev-1.telemetry", {"n": n})["seq"] == n + 1
        # ingest takes two messages and acknowledges neither: two in flight, three waiting.
        nats.request(f"$JS.API.CONSUMER.MSG.NEXT.{STREAM}.ingest", {"batch": 1})
        nats.request(f"$JS.API.CONSUMER.MSG.NEXT.{STREAM}.ingest", {"batch": 1})

        url = f"http://127.0.0.1:{http_port}"
        stats = ClusterStats([url])
        watch = ClusterWatch([url], stats)
        watch.poll_once()
        page = exported(stats)
        node = f"127.0.0.1:{http_port}"
        assert sample(page, "galvani_broker_node_up", node=node) == 1
        assert sample(page, "galvani_broker_node_connections", node=node) == 1  # the test's own
        assert sample(page, "galvani_broker_node_routes", node=node) == 0
        assert sample(page, "galvani_broker_node_slow_consumers_total", node=node) == 0
        assert sample(page, "galvani_broker_stream_messages", stream=STREAM) == 5
        for consumer, pending, ack_pending in (("ingest", 3, 2), ("rules", 5, 0)):
            labels = {"node": node, "stream": STREAM, "consumer": consumer}
            assert sample(page, "galvani_broker_consumer_pending_messages", **labels) == pending
            assert (
                sample(page, "galvani_broker_consumer_ack_pending_messages", **labels)
                == ack_pending
            )
    finally:
        nats.close()

    # Stopped (SIGSTOP: the socket stays open and nothing answers), then gone.
    child.process.send_signal(signal.SIGSTOP)
    try:
        wait_until(lambda: stopped(child.pid), child=child, timeout_s=5, what="SIGSTOP")
        watch.poll_once()
        page = exported(stats)
        assert sample(page, "galvani_broker_node_up", node=node) == 0
        assert sample(page, "galvani_broker_consumer_pending_messages", consumer="ingest") is None
    finally:
        child.process.send_signal(signal.SIGCONT)
    watch.poll_once()
    assert sample(exported(stats), "galvani_broker_node_up", node=node) == 1
    child.stop()
    watch.poll_once()
    assert sample(exported(stats), "galvani_broker_node_up", node=node) == 0


CLUSTER_USER = "watch-tester"
CLUSTER_PASSWORD = "watch-tester-password"
ELECTION_WAIT_S = 30.0


def cluster_page(cluster: NatsCluster) -> tuple[ClusterWatch, ClusterStats, list[str]]:
    """A watch of every node's monitoring port, and the nodes' labels in order."""
    urls = [node.monitor_url("") for node in cluster.nodes]
    stats = ClusterStats(urls)
    return ClusterWatch(urls, stats), stats, [node_label(url) for url in urls]


def reporters(page: str, consumer: str) -> dict[str, float]:
    """node -> pending, for every node that exports ``consumer``'s pending count."""
    found = {}
    for match in re.finditer(
        r"^galvani_broker_consumer_pending_messages\{([^}]*)\} (\S+)$", page, re.M
    ):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
        if labels["consumer"] == consumer:
            found[labels["node"]] = float(match.group(2))
    return found


def test_each_consumer_is_reported_once_by_its_leader_and_again_after_it_is_killed(
    tmp_path: Path, pki: DevelopmentPKI
) -> None:
    """Three nodes, GALVANI_DEVICES with three replicas: every node lists both consumers, one
    series each comes out; kill the ingest consumer's leader and the node is down, and the
    consumer is reported by the node elected in its place."""
    with running_cluster(
        tmp_path / "nats", pki, static_users={CLUSTER_USER: CLUSTER_PASSWORD}
    ) as cluster:
        client = NatsClient(
            cluster.nats_urls().split(","),
            user=CLUSTER_USER,
            password=CLUSTER_PASSWORD,
            tls=client_context(pki.ca_file),
            name="watch-test",
        )
        try:
            client.connect(5.0)
            ensure_stream(client, replicas=3)
            for durable in ("ingest", "rules"):
                ensure_consumer(client, durable)
            for n in range(4):
                client.request("galvani.v1.d.dev-1.telemetry", b'{"n": %d}' % n, 5.0)
        finally:
            client.close()

        watch, stats, nodes = cluster_page(cluster)
        watch.poll_once()
        page = exported(stats)
        for node in nodes:
            assert sample(page, "galvani_broker_node_up", node=node) == 1
            assert sample(page, "galvani_broker_node_routes", node=node) >= 2
        for consumer in ("ingest", "rules"):
            assert list(reporters(page, consumer).values()) == [4], page
        assert sample(page, "galvani_broker_stream_messages", stream=STREAM) == 4

        leader = nodes.index(next(iter(reporters(page, "ingest"))))
        cluster.kill(leader)
        deadline = time.monotonic() + ELECTION_WAIT_S
        while True:
            watch.poll_once()
            page = exported(stats)
            now_reporting = reporters(page, "ingest")
            if now_reporting and nodes[leader] not in now_reporting:
                break
            assert time.monotonic() < deadline, f"no new leader reported:\n{page}"
            time.sleep(0.5)
        assert sample(page, "galvani_broker_node_up", node=nodes[leader]) == 0
        assert list(now_reporting.values()) == [4]


def test_maintenance_serves_the_cluster_and_replication_metrics(
    nats_node: tuple[Child, int, int], maintenance_database_url: str, tmp_path: Path
) -> None:
    """The process as deployed: given the monitoring URL, maintenance's metrics endpoint shows
    the node up, and after its first pass the database's replica count (none here)."""
    _, _, http_port = nats_node
    metrics_port = free_port()
    maintenance = spawn_maintenance(
        maintenance_database_url,
        tmp_path / "maintenance.log",
        nats_monitor_urls=f"http://127.0.0.1:{http_port}",
        metrics_port=metrics_port,
        interval_s=3600,
    )
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    node_up = b'galvani_broker_node_up{node="127.0.0.1:%d"} 1.0' % http_port
    try:

        def served() -> bool:
            body = http_get(url)
            return body is not None and node_up in body and b"galvani_db_replicas " in body

        wait_until(served, child=maintenance, timeout_s=20, what="maintenance")
        page = (http_get(url) or b"").decode()
    finally:
        maintenance.stop()
    assert sample_line(page, "galvani_db_replicas") == 0
    assert "galvani_db_replication_lag_seconds{" not in page
    assert sample(page, "galvani_broker_consumer_pending_messages") is None  # no stream yet


def sample_line(page: str, name: str) -> float | None:
    """The value of the unlabelled series ``name``, or None."""
    match = re.search(rf"^{name} (\S+)$", page, re.M)
    return float(match.group(1)) if match else None
