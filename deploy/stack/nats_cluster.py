"""A NATS 2.10 cluster owned by the stack: three nodes on loopback, each with JetStream and
the MQTT gateway, configured from files Galvani generates.

What every node's configuration holds (see :func:`render_config`):

* its name, a client port (NATS protocol, TLS when the stack has a PKI), an HTTP monitoring
  port (``/healthz``, ``/routez``, ``/jsz``: loopback only) and a cluster port with routes to
  the other nodes;
* JetStream with a store directory of its own;
* the MQTT gateway (MQTT 3.1.1 only) with ``stream_replicas: 3``: the gateway's own streams
  (sessions, QoS 1 messages, retained messages) are otherwise sized from the servers a node
  knows at first use, which came out as R2 in the spike, and a node kill then stopped QoS 1
  publishes for minutes (docs/research/issue22-cluster-broker.md, 2.4);
* three accounts: ``AUTH`` (the auth-callout responder's user ``galvani-auth``), ``GALVANI``
  (JetStream; every device and service is placed there by the responder) and ``SYS`` (user
  ``galvani-sys``, the system account);
* with a :class:`CalloutConfig`, an ``authorization { auth_callout { ... } }`` block: every
  login except ``galvani-auth`` and ``galvani-sys`` is decided by Galvani's responder
  (services/broker_access), which signs its answers with the issuer account key. Without one,
  ``static_users`` (tests only) are plain users of GALVANI with full permissions.

Routes between nodes are plaintext on loopback; clients (NATS and MQTT) get TLS with the
development PKI's server certificate when ``tls`` is given.
"""

import json
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from deploy.stack.errors import SetupError
from deploy.stack.ports import LOOPBACK, distinct_free_ports
from deploy.stack.postgres import new_password
from deploy.stack.processes import Child, ChildExited, chown_to, http_get, spawn
from services.broker_access.issuer import ensure_issuer

log = logging.getLogger("galvani.run")

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
INSTALL_SCRIPT: Final = REPO_ROOT / "deploy" / "install-nats.sh"

CLUSTER_NAME: Final = "galvani"
AUTH_ACCOUNT: Final = "AUTH"
APP_ACCOUNT: Final = "GALVANI"
SYSTEM_ACCOUNT: Final = "SYS"
AUTH_USER: Final = "galvani-auth"
SYSTEM_USER: Final = "galvani-sys"

START_TIMEOUT_S: Final = 30.0
STOP_TIMEOUT_S: Final = 20.0
HEALTH_POLL_S: Final = 0.1
# How long a node may stay outside the JetStream meta group at start before it is restarted.
META_JOIN_GRACE_S: Final = 5.0
META_SHORT: Final = "the JetStream meta group knows"
# How fast a node notices a dead route. The server's defaults (2 min ping interval, 2 pings
# out) leave a SIGSTOPped node counted as a peer for minutes; 1 s x 3 lets the others drop
# its routes within about 3-4 s. A killed node's routes close at once (the socket resets), so
# this matters for the paused node, not the killed one. JetStream's Raft election timeouts
# (4-9 s in 2.10) are fixed in the server and not configurable.
ROUTE_PING_INTERVAL: Final = "1s"
ROUTE_PING_MAX: Final = 3
# Bounds on what a test or development node may take; production sizes these per host.
MAX_MEMORY_STORE: Final = "256MB"
MAX_FILE_STORE: Final = "4GB"
# protocol.md caps payloads at 64 KiB; like Mosquitto's max_packet_size, somewhat more goes
# through so that ingest can store an oversized payload as a dead letter that says why.
MAX_PAYLOAD_BYTES: Final = 256 * 1024
# How long a TLS handshake may take. NATS's default (2 s here before) closed the handshakes of
# a reconnect storm on a busy 2-core host (bench-cluster's 300 devices, 100 at a time:
# "TLS handshake timeout"); a device on a slow cellular link needs the slack too.
TLS_HANDSHAKE_TIMEOUT_S: Final = 10
# How long the server waits for the auth-callout answer (and any client's CONNECT).
AUTH_TIMEOUT_S: Final = 5


def find_nats_server() -> str:
    """The nats-server binary (2.10+), made available by deploy/install-nats.sh."""
    try:
        done = subprocess.run(
            ["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True, check=False
        )
    except OSError as exc:
        raise SetupError(f"cannot run {INSTALL_SCRIPT}: {exc}") from exc
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        detail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        raise SetupError(f"deploy/install-nats.sh failed: {detail[0]}")
    return lines[-1]


@dataclass(frozen=True)
class CalloutConfig:
    """The auth callout: the issuer account's public nkey (``A...``, whose seed only the
    responder holds) and the responder's password as ``galvani-auth``."""

    issuer: str
    auth_password: str


def callout_config(issuer_seed_file: Path, auth_password: str) -> CalloutConfig:
    """The callout configuration for the issuer key in ``issuer_seed_file`` (made there,
    owner-only, on first use; the responders read the same file, GALVANI_BROKER_ACCESS_
    ISSUER_SEED_FILE) and the responders' password as ``galvani-auth``."""
    issuer = ensure_issuer(issuer_seed_file)
    return CalloutConfig(issuer=issuer.public_key, auth_password=auth_password)


@dataclass(frozen=True)
class NatsNode:
    """One node's name, ports and data directory."""

    name: str
    client_port: int
    mqtt_port: int
    cluster_port: int
    http_port: int
    data_dir: Path

    @property
    def conf_path(self) -> Path:
        """The generated configuration file."""
        return self.data_dir / "nats.conf"

    @property
    def log_path(self) -> Path:
        """The node's log (stdout and stderr)."""
        return self.data_dir / "nats.log"

    def monitor_url(self, path: str) -> str:
        """A URL of the node's HTTP monitoring endpoint."""
        return f"http://{LOOPBACK}:{self.http_port}{path}"


TlsFiles = tuple[Path, Path, Path]  # (certificate, key, CA): the server's certificate chain


def _quote(value: str | Path) -> str:
    # NATS config strings are JSON-compatible when double-quoted.
    return json.dumps(str(value))


def render_config(
    node: NatsNode,
    peers: list[NatsNode],
    *,
    tls: TlsFiles | None,
    callout: CalloutConfig | None,
    static_users: dict[str, str] | None,
    system_password: str,
) -> str:
    """The nats.conf text of ``node`` in a cluster with ``peers`` (the other nodes)."""
    routes = ", ".join(f"nats-route://{LOOPBACK}:{peer.cluster_port}" for peer in peers)
    tls_block = ""
    if tls is not None:
        cert, key, ca = tls
        tls_block = (
            f"tls {{ cert_file: {_quote(cert)}, key_file: {_quote(key)}, "
            f"ca_file: {_quote(ca)}, timeout: {TLS_HANDSHAKE_TIMEOUT_S} }}"
        )
    auth_user = (
        f"{{ user: {AUTH_USER}, password: {_quote(callout.auth_password)} }}"
        if callout is not None
        else ""
    )
    app_users = ""
    if static_users:
        app_users = ", ".join(
            f"{{ user: {_quote(user)}, password: {_quote(password)} }}"
            for user, password in sorted(static_users.items())
        )
    authorization = ""
    if callout is not None:
        authorization = f"""
# Every login but the responder's and the system user's is decided by Galvani's auth-callout
# responder (services/broker_access), which answers with a user JWT signed by this issuer.
authorization {{
  timeout: {AUTH_TIMEOUT_S}
  auth_callout {{
    issuer: {callout.issuer}
    auth_users: [ {AUTH_USER}, {SYSTEM_USER} ]
    account: {AUTH_ACCOUNT}
  }}
}}
"""
    return f"""\
# Generated by Galvani on every start; edit deploy/stack/nats_cluster.py instead.
server_name: {node.name}
listen: "{LOOPBACK}:{node.client_port}"
http: "{LOOPBACK}:{node.http_port}"
pid_file: {_quote(node.data_dir / "nats.pid")}
max_payload: {MAX_PAYLOAD_BYTES}
{tls_block}

jetstream {{
  store_dir: {_quote(node.data_dir / "jetstream")}
  max_memory_store: {MAX_MEMORY_STORE}
  max_file_store: {MAX_FILE_STORE}
}}

cluster {{
  name: {CLUSTER_NAME}
  listen: "{LOOPBACK}:{node.cluster_port}"
  routes: [ {routes} ]
  ping_interval: "{ROUTE_PING_INTERVAL}"
  ping_max: {ROUTE_PING_MAX}
}}

# MQTT 3.1.1 only. stream_replicas: 3 puts the gateway's session, message and retained
# streams on every node, so a node's death loses neither QoS 1 messages nor retained configs.
mqtt {{
  listen: "{LOOPBACK}:{node.mqtt_port}"
  stream_replicas: 3
  {tls_block}
}}

accounts {{
  {AUTH_ACCOUNT} {{ users: [ {auth_user} ] }}
  {APP_ACCOUNT} {{ jetstream: enabled, users: [ {app_users} ] }}
  {SYSTEM_ACCOUNT} {{ users: [ {{ user: {SYSTEM_USER}, password: {_quote(system_password)} }} ] }}
}}
system_account: {SYSTEM_ACCOUNT}
{authorization}"""


class NatsCluster:
    """``nodes`` nats-server processes forming one cluster under ``directory``."""

    def __init__(
        self,
        directory: Path,
        *,
        nodes: int = 3,
        tls: TlsFiles | None = None,
        callout: CalloutConfig | None = None,
        static_users: dict[str, str] | None = None,
        system_password: str | None = None,
        run_as: str | None = None,
    ) -> None:
        if callout is not None and static_users:
            raise ValueError("static users and the auth callout exclude each other")
        self.directory = directory
        self.tls = tls
        self.callout = callout
        self.static_users = static_users
        self.system_password = system_password or new_password()
        # The invoking user by default: nats-server needs no privileges to drop, and the
        # binary install-nats.sh caches under root's home is not readable by others.
        self.run_as = run_as
        ports = distinct_free_ports(4 * nodes)
        self.nodes = [
            NatsNode(
                name=f"n{i + 1}",
                client_port=ports[4 * i],
                mqtt_port=ports[4 * i + 1],
                cluster_port=ports[4 * i + 2],
                http_port=ports[4 * i + 3],
                data_dir=directory / f"n{i + 1}",
            )
            for i in range(nodes)
        ]
        self._children: list[Child | None] = [None] * nodes
        self._binary: str | None = None

    # -- configuration -------------------------------------------------------------------

    def prepare(self) -> None:
        """Write every node's configuration (and its copy of the TLS files)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        os.chmod(self.directory, 0o755)  # noqa: S103 - the service user enters it
        tls = self._tls_copies()
        for node in self.nodes:
            node.data_dir.mkdir(parents=True, exist_ok=True)
            os.chmod(node.data_dir, 0o700)
            peers = [peer for peer in self.nodes if peer is not node]
            node.conf_path.write_text(
                render_config(
                    node,
                    peers,
                    tls=tls,
                    callout=self.callout,
                    static_users=self.static_users,
                    system_password=self.system_password,
                )
            )
            os.chmod(node.conf_path, 0o600)  # it holds passwords
            chown_to(node.data_dir, self.run_as)

    def _tls_copies(self) -> TlsFiles | None:
        # The server runs as the service user, who may not read the PKI's owner-only key: it
        # gets a copy of its own, as Mosquitto does (deploy/stack/mosquitto.py).
        if self.tls is None:
            return None
        cert, key, ca = self.tls
        target = self.directory / "tls"
        target.mkdir(exist_ok=True)
        copies = (target / "server.pem", target / "server.key", target / "ca.pem")
        for source, copy, mode in zip((cert, key, ca), copies, (0o644, 0o600, 0o644), strict=True):
            copy.write_bytes(source.read_bytes())
            os.chmod(copy, mode)
        chown_to(target, self.run_as)
        return copies

    # -- processes -----------------------------------------------------------------------

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Start every node, then wait until each is healthy with JetStream and routed to
        every other node."""
        self._binary = self._binary or find_nats_server()
        self.prepare()
        for i in range(len(self.nodes)):
            self._spawn(i)
        self.wait_ready(timeout_s=timeout_s)

    def _spawn(self, i: int) -> None:
        node = self.nodes[i]
        assert self._binary is not None
        self._children[i] = spawn(
            f"nats-{node.name}",
            [self._binary, "-c", str(node.conf_path)],
            node.log_path,
            user=self.run_as,
        )

    def wait_ready(
        self, indexes: list[int] | None = None, *, timeout_s: float = START_TIMEOUT_S
    ) -> None:
        """Wait until each node of ``indexes`` (default: all running) is healthy and has
        routes to every other running node; raise ChildExited if one exits or time runs out.

        A node left out of the JetStream meta group for META_JOIN_GRACE_S is restarted: on a
        cold start of all three at once, 2.10 now and then elects a meta leader with two peers
        and never adds the third, which follows the leader without being a peer (4 of 65 cold
        starts here, the group still at two 15 s later). A restarted node joins."""
        running = [i for i, child in enumerate(self._children) if child is not None]
        waiting = list(indexes if indexes is not None else running)
        deadline = time.monotonic() + timeout_s
        short_since: float | None = None
        while waiting:
            i = waiting[0]
            child = self._children[i]
            assert child is not None
            node = self.nodes[i]
            peers = {self.nodes[j].name for j in running if j != i}
            why = self._not_ready(node, peers)
            if why is None:
                waiting.pop(0)
                continue
            if not child.alive():
                child.stop()
                self._children[i] = None
                raise ChildExited(
                    f"nats-server {node.name} exited during start-up; its log ends with:\n"
                    f"{child.log_tail()}"
                )
            now = time.monotonic()
            if now > deadline:
                raise ChildExited(
                    f"nats-server {node.name} was not ready within {timeout_s:.0f} s ({why});"
                    f" its log ends with:\n{child.log_tail()}"
                )
            if why.startswith(META_SHORT):
                short_since = short_since or now
                if now - short_since > META_JOIN_GRACE_S:
                    for j in self._outside_meta_group(running):
                        log.warning(
                            "nats-server %s is not in the JetStream meta group: restarting it",
                            self.nodes[j].name,
                        )
                        self.kill(j, signal.SIGTERM)
                        self._spawn(j)
                        if j not in waiting:
                            waiting.append(j)
                    short_since = None
            time.sleep(HEALTH_POLL_S)

    def _outside_meta_group(self, running: list[int]) -> list[int]:
        """The running nodes the meta leader does not count as peers."""
        leader = self.meta_leader()
        if leader is None:
            return []
        jsz = self.monitor(leader, "/jsz") or {}
        meta = jsz.get("meta_cluster") or {}
        members = {str(meta.get("leader", ""))} | {
            str(replica.get("name", "")) for replica in meta.get("replicas") or []
        }
        return [j for j in running if self.nodes[j].name not in members]

    def _not_ready(self, node: NatsNode, peers: set[str]) -> str | None:
        """Why ``node`` is not ready yet, or None when it is."""
        if http_get(node.monitor_url("/healthz?js-enabled-only=true"), 1.0) is None:
            return "JetStream is not enabled yet"
        # The server and the JetStream meta group (a leader this node follows: before that,
        # the MQTT gateway cannot create its streams). Not the full check: that also waits for
        # every stream and consumer to be current, and a node restarted on its data holds the
        # MQTT gateway's consumers of sessions from before, which can stay "not current" for
        # minutes (seen: over 30 s) without keeping the node from serving.
        if http_get(node.monitor_url("/healthz?js-server-only=true"), 1.0) is None:
            return "/healthz?js-server-only: no JetStream meta leader followed yet"
        missing = peers - self.routed_to(node)
        if missing:
            return f"no route to {', '.join(sorted(missing))}"
        # Every node a peer of the meta group: the MQTT gateway sizes its streams' replicas
        # from the peers it knows when it first creates them.
        body = http_get(node.monitor_url("/jsz"), 1.0)
        meta = {} if body is None else json.loads(body).get("meta_cluster") or {}
        size = int(meta.get("cluster_size", 0))
        if size < len(self.nodes):
            return f"{META_SHORT} {size} of {len(self.nodes)} nodes"
        return None

    def routed_to(self, node: NatsNode) -> set[str]:
        """The names of the nodes ``node`` has a route to (its /routez)."""
        body = http_get(node.monitor_url("/routez"), 1.0)
        if body is None:
            return set()
        routes = json.loads(body).get("routes") or []
        return {str(route.get("remote_name", "")) for route in routes}

    def monitor(self, i: int, path: str) -> dict[str, Any] | None:
        """Node ``i``'s monitoring answer at ``path`` (``/varz``, ``/jsz``...), or None."""
        body = http_get(self.nodes[i].monitor_url(path), 2.0)
        return None if body is None else dict(json.loads(body))

    def meta_leader(self) -> int | None:
        """The index of the node leading JetStream's meta group, as a running node sees it."""
        for i in self._running():
            jsz = self.monitor(i, "/jsz") or {}
            leader = (jsz.get("meta_cluster") or {}).get("leader")
            if leader:
                return self._index(str(leader))
        return None

    def stream_leader(self, stream: str, account: str = APP_ACCOUNT) -> int | None:
        """The index of the node leading ``stream`` of ``account`` (``$MQTT_msgs``, the gateway's
        QoS 1 store, is what a fault test wants to kill), or None if no running node knows."""
        for i in self._running():
            jsz = self.monitor(i, f"/jsz?accounts=true&streams=true&acc={account}") or {}
            for details in jsz.get("account_details") or []:
                for info in details.get("stream_detail") or []:
                    leader = (info.get("cluster") or {}).get("leader")
                    if info.get("name") == stream and leader:
                        return self._index(str(leader))
        return None

    def _running(self) -> list[int]:
        return [i for i, child in enumerate(self._children) if child is not None and child.alive()]

    def _index(self, name: str) -> int | None:
        names = [node.name for node in self.nodes]
        return names.index(name) if name in names else None

    def stop(self) -> None:
        """SIGTERM every node (side by side), then wait for each."""
        children = [child for child in self._children if child is not None]
        for child in children:
            child.ask_to_stop(signal.SIGTERM)
            _wake(child)  # a paused node acts on its SIGTERM only once continued
        for child in children:
            child.stop(timeout_s=STOP_TIMEOUT_S)
        self._children = [None] * len(self.nodes)

    def pid(self, i: int) -> int:
        """Node ``i``'s process id (it must be running)."""
        child = self._children[i]
        if child is None:
            raise ChildExited(f"nats-server {self.nodes[i].name} is not running")
        return child.pid

    def alive(self, i: int) -> bool:
        """Whether node ``i``'s process runs (a paused one does)."""
        child = self._children[i]
        return child is not None and child.alive()

    def kill(self, i: int, sig: signal.Signals = signal.SIGKILL) -> None:
        """Send ``sig`` to node ``i`` and, for a signal that ends it, reap it."""
        child = self._children[i]
        if child is None:
            return
        if not child.alive():  # exited (and reaped by the look): nothing to signal
            child.stop()
            self._children[i] = None
            return
        os.kill(child.pid, sig)
        if sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            _wake(child)
            child.stop(timeout_s=STOP_TIMEOUT_S)  # waits (kills only if the signal did not)
            self._children[i] = None

    def pause(self, i: int) -> None:
        """SIGSTOP node ``i``: alive but silent, as a node cut off by a partition is."""
        os.kill(self.pid(i), signal.SIGSTOP)

    def resume(self, i: int) -> None:
        """SIGCONT a paused node."""
        os.kill(self.pid(i), signal.SIGCONT)

    def restart(self, i: int, timeout_s: float = START_TIMEOUT_S) -> None:
        """Start node ``i`` again with the same configuration and data directory (stopping it
        first if it runs), and wait until it is ready."""
        if self._children[i] is not None:
            self.kill(i, signal.SIGTERM)
        self._spawn(i)
        self.wait_ready([i], timeout_s=timeout_s)

    # -- addresses -----------------------------------------------------------------------

    def nats_urls(self) -> str:
        """GALVANI_NATS_URLS for this cluster (``tls://`` when clients get TLS)."""
        scheme = "tls" if self.tls is not None else "nats"
        return ",".join(f"{scheme}://{LOOPBACK}:{node.client_port}" for node in self.nodes)

    def mqtt_nodes(self) -> str:
        """GALVANI_MQTT_NODES for this cluster."""
        return ",".join(f"{LOOPBACK}:{node.mqtt_port}" for node in self.nodes)

    def run_json(self) -> dict[str, Any]:
        """The cluster as run.json names it (no secrets)."""
        return {
            "kind": "nats",
            "nodes": [
                {
                    "name": node.name,
                    "nats": node.client_port,
                    "mqtt": node.mqtt_port,
                    "cluster": node.cluster_port,
                    "http": node.http_port,
                    "pid": child.pid if child is not None else None,
                    "data_dir": str(node.data_dir),
                }
                for node, child in zip(self.nodes, self._children, strict=True)
            ],
            "nats_urls": self.nats_urls(),
            "mqtt_nodes": self.mqtt_nodes(),
        }


def _wake(child: Child) -> None:
    """SIGCONT ``child`` (harmless when it runs), so that a paused node handles the signal
    it was sent."""
    if child.alive():
        os.kill(child.pid, signal.SIGCONT)
