"""The fault stack of tests/faults.py on a three-node NATS cluster instead of one Mosquitto.

Everything else is as there: a durable PostgreSQL with TimescaleDB, two ingest and one rules
worker (``GALVANI_BROKER=nats``: JetStream consumers ``ingest`` and ``rules``), two
auth-callout responders that admit devices from the database, and ``galvani-fleet`` whose
devices speak MQTT 3.1.1, are spread over the three nodes, fail over to the others, and keep
each message in their outbox until ingest says it is stored. The ledger
(:func:`tests.faults.read_ledger`) judges, exactly as on Mosquitto.

What the cluster adds are node faults: :meth:`ClusterFaultStack.kill_node` (kill -9, then the
node started again on its data) and :meth:`ClusterFaultStack.pause_node` (SIGSTOP for a while:
to the others a node cut off by a partition, whose TCP connections stay open). Both measure
how long the node's devices took to reconnect to a survivor, from the survivors' monitoring
endpoints (``/connz``: each MQTT connection names its client id), per device.

``make test`` runs short faults (tests/test_cluster_faults.py); ``make bench-cluster`` runs
them longer on a larger fleet (bench/cluster.py).
"""

import json
import math
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

import psycopg

from deploy.stack.cluster import rotated
from deploy.stack.nats_cluster import APP_ACCOUNT, NatsCluster
from deploy.stack.processes import http_get
from services.common.broker_auth import ServiceAccount, is_reserved_client_id
from services.common.migrations.grants import ServiceRole
from tests.faults import FaultStack, Workers
from tests.nats import ResponderProcess, callout_setup, cluster_tls
from tests.roles import as_service

INGEST_WORKERS: Final = ("1", "2")
RESPONDERS: Final = ("1", "2")
# The devices' MQTT keepalive: a node that stops answering (SIGSTOP) is left after up to 2 of
# them (paho sends a PINGREQ after one keepalive without input and closes one keepalive later
# without the PINGRESP; measured: 17-20 s at 10 s); at the default 60 s a 30 s pause
# would never move a device.
KEEPALIVE_S: Final = 10
CONNZ_POLL_S: Final = 0.25
RECONNECT_TIMEOUT_S: Final = 120.0


@dataclass(frozen=True)
class Reconnects:
    """How long each client of a kind (devices, or the backend's own) of a node took to be
    connected to another node again."""

    node: str
    kind: str  # "devices" or "backend_clients": the figure line's name for the count
    clients: int  # connected to the node when the fault struck
    # When each client that came back within the timeout was first seen on a survivor.
    arrivals: dict[str, float]

    @property
    def seconds(self) -> tuple[float, ...]:
        """The arrival times, sorted."""
        return tuple(sorted(self.arrivals.values()))

    def slowest(self) -> str | None:
        """The client that took longest to come back (None when none did)."""
        return max(self.arrivals, key=self.arrivals.__getitem__, default=None)

    @property
    def missing(self) -> int:
        """Clients not seen on a survivor within the timeout."""
        return self.clients - len(self.seconds)

    def percentile(self, p: float) -> float:
        """The ``p``-th percentile (nearest rank) of the reconnect times."""
        if not self.seconds:
            return math.nan
        rank = max(1, math.ceil(p / 100 * len(self.seconds)))
        return self.seconds[rank - 1]

    def line(self) -> str:
        """The figure line: how many, p50, p99, max."""
        return (
            f"node={self.node} {self.kind}={self.clients} reconnected={len(self.seconds)} "
            f"reconnect_p50_s={self.percentile(50):.1f} reconnect_p99_s={self.percentile(99):.1f}"
            f" reconnect_max_s={max(self.seconds, default=math.nan):.1f}"
        )


def mqtt_logins(cluster: NatsCluster, i: int) -> set[str] | None:
    """The MQTT client ids logged in on node ``i`` (None when its monitoring does not answer):
    the devices, and the backend's own clients (the rules' config publisher), whose ids are
    reserved (:func:`~services.common.broker_auth.is_reserved_client_id`).

    A connection is listed from its CONNECT on, before the auth callout has answered; only
    one placed in the GALVANI account (``auth=true`` names it) has been let in."""
    body = http_get(cluster.nodes[i].monitor_url("/connz?limit=100000&auth=true"), 1.0)
    if body is None:
        return None
    connections = json.loads(body).get("connections") or []
    return {
        str(c["mqtt_client"])
        for c in connections
        if c.get("mqtt_client") and c.get("account") == APP_ACCOUNT
    }


def devices_among(clients: Iterable[str]) -> set[str]:
    """The devices among MQTT client ids: every id not reserved for the backend."""
    return {client for client in clients if not is_reserved_client_id(client)}


@dataclass
class ClusterFaultStack(FaultStack):
    """Servers, backend and fleet of one fault run on a NATS cluster, under ``root``."""

    cluster: NatsCluster | None = None
    responders: list[ResponderProcess] = field(default_factory=list)
    reconnects: list[Reconnects] = field(default_factory=list)  # the devices', per node fault
    # The backend's clients' (its config publishers), per node fault (none when the node held
    # none): measured apart, since their failover is paho's with a keepalive of their own.
    backend_reconnects: list[Reconnects] = field(default_factory=list)

    def start_broker(self, passwords: dict[ServiceAccount, str]) -> None:
        """The three nodes with the auth callout, and its responders, each first on another
        node, as make run-cluster runs them: with both on one node, that node stopping refused
        every login on the others until the responders left it."""
        setup, callout = callout_setup(self.root / "callout", self.pki, passwords)
        self.cluster = NatsCluster(self.root / "nats", tls=cluster_tls(self.pki), callout=callout)
        self.cluster.start()
        urls = self.cluster.nats_urls().split(",")
        for n, responder in enumerate(RESPONDERS):
            self.responders.append(
                ResponderProcess(
                    self.cluster,
                    setup,
                    self.database_url,
                    self.root / f"broker-access-{responder}.log",
                    responder,
                    nats_urls=",".join(rotated(urls, n)),
                )
            )

    def workers(self, kind: type[Workers], password: str, **env: str) -> Workers:
        """The ingest or rules workers of group ``kind.service`` on the cluster's JetStream
        consumer of that name; rules publish tables through the nodes' MQTT gateway."""
        cluster = self.cluster
        assert cluster is not None
        workers = kind.on_nats(
            as_service(self.database_url, ServiceRole(f"galvani_{kind.service}")),
            cluster.nats_urls(),
            password,
            self.root,
            self.pki.ca_file,
            mqtt_port=cluster.nodes[0].mqtt_port,
            GALVANI_MQTT_NODES=cluster.mqtt_nodes(),
            **env,
        )
        workers.group = kind.service
        return workers

    def broker_arguments(self) -> list[str]:
        """The fleet's devices on every node (each spread first on one, failing over to the
        others), in MQTT 3.1.1, with a keepalive that leaves a silent node within a pause."""
        assert self.cluster is not None
        return [
            f"--broker={self.cluster.mqtt_nodes()}",
            "--mqtt-version=3.1.1",
            f"--keepalive={KEEPALIVE_S}",
        ]

    # -- node faults ------------------------------------------------------------------------

    def busiest_node(self) -> int:
        """The node holding the most devices now (the worst one to lose)."""
        assert self.cluster is not None
        counts = [
            len(devices_among(mqtt_logins(self.cluster, i) or ()))
            for i in range(len(self.cluster.nodes))
        ]
        return counts.index(max(counts))

    def kill_node(self, i: int, down_s: float) -> None:
        """kill -9 node ``i``; once its devices are on the survivors (or ``down_s`` passed,
        whichever is later), start it again on its data and wait until it is ready."""
        cluster = self.cluster
        assert cluster is not None
        clients = mqtt_logins(cluster, i) or set()
        struck = time.monotonic()
        cluster.kill(i, signal.SIGKILL)
        self._measure_reconnects(i, clients, struck, minimum_s=down_s)
        cluster.restart(i)

    def pause_node(self, i: int, paused_s: float) -> None:
        """SIGSTOP node ``i`` for ``paused_s`` (its sockets stay open, it answers nothing),
        measuring its clients' moves to the survivors meanwhile, then SIGCONT it."""
        cluster = self.cluster
        assert cluster is not None
        clients = mqtt_logins(cluster, i) or set()
        struck = time.monotonic()
        cluster.pause(i)
        try:
            self._measure_reconnects(i, clients, struck, minimum_s=paused_s)
        finally:
            cluster.resume(i)
        cluster.wait_ready([i])

    def _measure_reconnects(
        self, down: int, clients: set[str], struck: float, *, minimum_s: float
    ) -> None:
        """Poll the survivors until every client of node ``down`` is connected to one of them
        (or the timeout), for at least ``minimum_s``; record when each first appeared, the
        devices' in :attr:`reconnects` and the backend's in :attr:`backend_reconnects`."""
        cluster = self.cluster
        assert cluster is not None
        waiting = set(clients)
        survivors = [j for j in range(len(cluster.nodes)) if j != down]
        arrivals: dict[str, float] = {}
        while True:
            now = time.monotonic()
            if waiting:
                seen: set[str] = set()
                for j in survivors:
                    seen |= mqtt_logins(cluster, j) or set()
                arrived = waiting & seen
                arrivals.update(dict.fromkeys(arrived, now - struck))
                waiting -= arrived
            elapsed = now - struck
            if elapsed >= minimum_s and (not waiting or elapsed > RECONNECT_TIMEOUT_S):
                break
            time.sleep(CONNZ_POLL_S)
        node = cluster.nodes[down].name
        devices = devices_among(clients)
        result = Reconnects(
            node, "devices", len(devices), {c: s for c, s in arrivals.items() if c in devices}
        )
        self.reconnects.append(result)
        print(result.line(), flush=True)
        backend = clients - devices
        theirs = {c: s for c, s in arrivals.items() if c in backend}
        self.backend_reconnects.append(Reconnects(node, "backend_clients", len(backend), theirs))
        if backend:
            print(self.backend_reconnects[-1].line(), flush=True)

    # -- after the faults -------------------------------------------------------------------

    def fleet_log_of(self, device: str, limit: int = 40) -> list[str]:
        """The fleet log's last ``limit`` lines naming ``device``: what its connection did."""
        lines = (self.root / "fleet.log").read_text(errors="replace").splitlines()
        return [line for line in lines if device in line][-limit:]

    def alerts_raised_since(self, since: float) -> int:
        """Alerts opened or raised again (count, last seen) at or after ``since`` (Unix
        seconds): the rules' work reaching the database."""
        with psycopg.connect(self.database_url) as conn:
            row = conn.execute(
                "SELECT count(*) FROM alerts WHERE updated_at >= to_timestamp(%s)", [since]
            ).fetchone()
        return int(row[0]) if row else 0

    def stop_broker(self) -> None:
        """Stop the responders, then the nodes (each by its pid)."""
        for responder in self.responders:
            responder.stop()
        if self.cluster is not None:
            self.cluster.stop()
