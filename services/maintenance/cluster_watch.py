"""The NATS cluster's health as Prometheus metrics on the maintenance endpoint.

When the broker is the NATS cluster, maintenance polls every node's HTTP monitoring port
(``http:`` in the node's config; nats-server 2.10, ``server/monitor.go``) every
:data:`POLL_INTERVAL_S` and serves what it read from a custom collector, each series labelled
with ``node``, the monitoring address it came from (known whether or not the node answers):

* ``galvani_broker_node_up``: 1 when ``/healthz?js-enabled-only=true`` answered ``ok``. That
  check says the server runs and, JetStream being enabled, that JetStream is up on it; it does
  not wait for every stream to be current (plain ``/healthz`` would, and would flap during a
  catch-up that clients do not notice). 0 when the node is unreachable, or slower than
  :data:`HTTP_TIMEOUT_S` (a node stopped with SIGSTOP keeps its socket open and never answers).
* from ``/varz``: ``galvani_broker_node_connections`` (every client connection on the node:
  MQTT devices, NATS services), ``galvani_broker_node_routes`` (its links to the other
  nodes: fewer than nodes - 1 is a partition) and ``galvani_broker_node_slow_consumers_total``
  (the node's own count since it started, so a counter that a node restart resets).
  NATS 2.10 has no count of MQTT connections alone: ``/connz`` can only list them one by one,
  which at a million devices is not something to do every few seconds.
* from ``/jsz?acc=GALVANI&consumers=true``, per JetStream consumer of the Galvani account:
  ``galvani_broker_consumer_pending_messages{stream, consumer}`` (messages in the stream the
  consumer has not been given yet: the backlog of ``ingest`` or ``rules``) and
  ``galvani_broker_consumer_ack_pending_messages`` (given to a worker and not acknowledged:
  in flight, or held by a worker that died until ``ack_wait`` passes), and
  ``galvani_broker_stream_messages{stream}``. Every replica of a stream reports its
  consumers, and only the leader's figures are current, so a consumer's series comes from the
  node that leads it (a single node, which names no leader for the consumer, reports it).

A node that cannot be read is exported with ``up`` 0 and nothing else: its last figures would
be stale, and the consumers it led are reported by their new leader once the cluster elects
one.
"""

import json
import logging
import threading
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

POLL_INTERVAL_S: Final = 5.0
# Below the poll interval, so a node that hangs (SIGSTOP) costs one poll of its own and the
# other nodes are still read each round.
HTTP_TIMEOUT_S: Final = 2.0
STOP_TIMEOUT_S: Final = 5.0
# The account the auth callout places devices and services in (its JetStream holds the stream).
JETSTREAM_ACCOUNT: Final = "GALVANI"
HEALTH_PATH: Final = "/healthz?js-enabled-only=true"
VARZ_PATH: Final = "/varz"
JSZ_PATH: Final = f"/jsz?acc={JETSTREAM_ACCOUNT}&consumers=true"
# A monitoring answer is a few kilobytes per stream; refuse to read a runaway one.
MAX_RESPONSE_BYTES: Final = 4 * 1024 * 1024


class NodeUnreadable(Exception):
    """A monitoring endpoint did not answer with the JSON it should."""


@dataclass(frozen=True)
class ConsumerState:
    """One JetStream consumer as the node that leads it reports it."""

    stream: str
    consumer: str
    pending: int
    ack_pending: int


@dataclass(frozen=True)
class NodeState:
    """What one poll of a node read; only ``node`` and ``up`` when it could not be read."""

    node: str
    up: bool
    connections: int | None = None
    routes: int | None = None
    slow_consumers: int | None = None
    streams: tuple[tuple[str, int], ...] = ()  # (stream, messages) the node leads
    consumers: tuple[ConsumerState, ...] = ()


def node_label(url: str) -> str:
    """The ``node`` label of a monitoring URL: its host and port."""
    return urlsplit(url).netloc or url


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise NodeUnreadable(f"expected an integer, got {value!r}")
    return value


def read_varz(varz: dict[str, Any]) -> tuple[str, int, int, int]:
    """The server's name, connections, routes and slow consumers from a ``/varz`` answer."""
    name = varz.get("server_name")
    if not isinstance(name, str):
        raise NodeUnreadable("/varz has no server_name")
    return (
        name,
        _int(varz.get("connections")),
        _int(varz.get("routes")),
        _int(varz.get("slow_consumers")),
    )


def _leads(detail: dict[str, Any], server_name: str) -> bool:
    """Whether ``server_name`` leads a stream or consumer.

    A single node gives a consumer no ``cluster`` at all: it is the node's own. In a cluster
    every replica gives one, naming the leader once there is one; while it has none (an
    election under way) no replica leads it and none reports it.
    """
    cluster = detail.get("cluster")
    if cluster is None:
        return True
    return isinstance(cluster, dict) and cluster.get("leader") == server_name


def read_jsz(
    jsz: dict[str, Any], server_name: str
) -> tuple[tuple[tuple[str, int], ...], tuple[ConsumerState, ...]]:
    """The streams and consumers ``server_name`` leads, from a ``/jsz?consumers=true`` answer.

    A single node names itself as each stream's leader and gives its consumers no cluster, so
    both are its own; in a cluster each replica lists every stream and consumer it holds.
    """
    streams: list[tuple[str, int]] = []
    consumers: list[ConsumerState] = []
    for account in jsz.get("account_details") or ():
        if account.get("name") != JETSTREAM_ACCOUNT:
            continue
        for stream in account.get("stream_detail") or ():
            name = stream.get("name")
            if not isinstance(name, str):
                raise NodeUnreadable("/jsz lists a stream without a name")
            if _leads(stream, server_name):
                streams.append((name, _int((stream.get("state") or {}).get("messages"))))
            for consumer in stream.get("consumer_detail") or ():
                if not _leads(consumer, server_name):
                    continue
                consumers.append(
                    ConsumerState(
                        stream=name,
                        consumer=str(consumer.get("name")),
                        pending=_int(consumer.get("num_pending")),
                        ack_pending=_int(consumer.get("num_ack_pending")),
                    )
                )
    return tuple(streams), tuple(consumers)


def _get_json(url: str) -> dict[str, Any]:
    """The JSON object at ``url``; raises NodeUnreadable (an error status included)."""
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response:  # noqa: S310
            body = response.read(MAX_RESPONSE_BYTES + 1)
    except urllib.error.HTTPError as exc:
        # /healthz answers 503 with a JSON error when the node is not healthy.
        raise NodeUnreadable(f"{url}: HTTP {exc.code}") from exc
    except (OSError, ValueError) as exc:  # refused, timed out, reset, bad URL
        raise NodeUnreadable(f"{url}: {exc}") from exc
    if len(body) > MAX_RESPONSE_BYTES:
        raise NodeUnreadable(f"{url}: answer over {MAX_RESPONSE_BYTES} bytes")
    try:
        document = json.loads(body)
    except ValueError as exc:
        raise NodeUnreadable(f"{url}: not JSON") from exc
    if not isinstance(document, dict):
        raise NodeUnreadable(f"{url}: not a JSON object")
    return document


def _check_health(url: str) -> None:
    """Raise NodeUnreadable unless ``url`` (a /healthz) answers ``ok``."""
    status = _get_json(url).get("status")
    if status != "ok":
        raise NodeUnreadable(f"{url}: health {status!r}")


def poll_node(url: str) -> NodeState:
    """Read one node's health, counters and JetStream consumers from its monitoring URL."""
    base = url.rstrip("/")
    node = node_label(url)
    try:
        _check_health(base + HEALTH_PATH)
        server_name, connections, routes, slow = read_varz(_get_json(base + VARZ_PATH))
        streams, consumers = read_jsz(_get_json(base + JSZ_PATH), server_name)
    except NodeUnreadable as exc:
        log.debug("broker node %s unreadable: %s", node, exc)
        return NodeState(node, up=False)
    return NodeState(node, True, connections, routes, slow, streams, consumers)


class ClusterStats:
    """The last poll of every node; safe across threads."""

    def __init__(self, urls: Sequence[str]) -> None:
        self._lock = threading.Lock()
        # Every node is down until a poll has read it: a watch that has not polled yet must
        # not report a healthy cluster.
        self._nodes: dict[str, NodeState] = {
            node_label(url): NodeState(node_label(url), up=False) for url in urls
        }

    def record(self, state: NodeState) -> None:
        """Keep ``state`` as its node's latest, logging a change of up or down."""
        with self._lock:
            before = self._nodes.get(state.node)
            self._nodes[state.node] = state
        if before is not None and before.up != state.up:
            if state.up:
                log.info("broker node %s is up", state.node)
            else:
                log.warning("broker node %s is down or not answering", state.node)

    def snapshot(self) -> list[NodeState]:
        """Every node's latest state, in a stable order."""
        with self._lock:
            return [self._nodes[node] for node in sorted(self._nodes)]


class ClusterCollector(Collector):
    """Serves :class:`ClusterStats` at each scrape."""

    def __init__(self, stats: ClusterStats) -> None:
        self.stats = stats

    def collect(self) -> Iterable[Metric]:
        """The cluster's metrics as last polled."""
        up = GaugeMetricFamily(
            "galvani_broker_node_up",
            "1 when the broker node's monitoring port answered /healthz?js-enabled-only=true",
            labels=["node"],
        )
        connections = GaugeMetricFamily(
            "galvani_broker_node_connections",
            "Client connections on the node (MQTT devices and NATS services), from /varz",
            labels=["node"],
        )
        routes = GaugeMetricFamily(
            "galvani_broker_node_routes",
            "The node's routes to other cluster nodes, from /varz (nodes - 1 when whole)",
            labels=["node"],
        )
        slow = CounterMetricFamily(
            "galvani_broker_node_slow_consumers",
            "Clients the node disconnected or skipped for reading too slowly since it started",
            labels=["node"],
        )
        stream_messages = GaugeMetricFamily(
            "galvani_broker_stream_messages",
            "Messages in the JetStream stream, as its leader reports them",
            labels=["node", "stream"],
        )
        pending = GaugeMetricFamily(
            "galvani_broker_consumer_pending_messages",
            "Messages in the stream not yet delivered to the consumer (ingest, rules), from "
            "the node that leads it",
            labels=["node", "stream", "consumer"],
        )
        ack_pending = GaugeMetricFamily(
            "galvani_broker_consumer_ack_pending_messages",
            "Messages delivered to the consumer's workers and not acknowledged yet",
            labels=["node", "stream", "consumer"],
        )
        for state in self.stats.snapshot():
            up.add_metric([state.node], 1 if state.up else 0)
            if not state.up:
                continue
            if state.connections is not None:
                connections.add_metric([state.node], state.connections)
            if state.routes is not None:
                routes.add_metric([state.node], state.routes)
            if state.slow_consumers is not None:
                slow.add_metric([state.node], state.slow_consumers)
            for stream, messages in state.streams:
                stream_messages.add_metric([state.node, stream], messages)
            for consumer in state.consumers:
                labels = [state.node, consumer.stream, consumer.consumer]
                pending.add_metric(labels, consumer.pending)
                ack_pending.add_metric(labels, consumer.ack_pending)
        yield from (up, connections, routes, slow, stream_messages, pending, ack_pending)


class ClusterWatch:
    """A thread that polls every node's monitoring URL each :data:`POLL_INTERVAL_S`."""

    def __init__(self, urls: Sequence[str], stats: ClusterStats) -> None:
        self.urls = tuple(urls)
        self.stats = stats
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cluster-watch", daemon=True)

    def start(self) -> None:
        """Start polling on the watch's own thread."""
        log.info("watching the broker cluster's monitoring at %s", ", ".join(self.urls))
        self._thread.start()

    def poll_once(self) -> None:
        """Poll every node once, one after the other (a hung node costs HTTP_TIMEOUT_S)."""
        for url in self.urls:
            self.stats.record(poll_node(url))

    def close(self) -> None:
        """Stop polling."""
        self._stop.set()
        self._thread.join(STOP_TIMEOUT_S)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll_once()
            self._stop.wait(POLL_INTERVAL_S)
