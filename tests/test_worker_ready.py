"""A worker's readiness route (services/common/metrics_server.py): ``GET /ready`` on the
metrics port is 200 only while the worker's broker session is connected and subscribed, 503
with one line saying why otherwise; ``/metrics`` is Prometheus' exposition, unchanged.

Live: an ingest worker reaches its broker (the session's Mosquitto, or a nats-server of the
test's own) through a TCP relay of the test, so the broker is "down" for the worker until the
relay opens and again once it closes, while the broker itself runs on for the other tests.
"""

import contextlib
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from wsgiref.util import setup_testing_defaults

import pytest
from prometheus_client import CollectorRegistry, Gauge

from deploy.stack.mosquitto import MosquittoBroker
from deploy.stack.pki import DevelopmentPKI
from deploy.stack.ports import free_port
from deploy.stack.postgres import new_password
from services.common.broker_auth import ServiceAccount
from services.common.metrics_server import (
    LOST,
    NEVER_SUBSCRIBED,
    NOT_STARTED,
    STOPPING,
    Readiness,
    metrics_app,
    start_metrics_server,
)
from tests.ingest import IngestWorkers, wait_until
from tests.nats_single import single_nats

WAIT_S = 20.0


@dataclass
class Source:
    """What Readiness reads of a broker session."""

    connected: bool


def get(port: int, path: str) -> tuple[int, str]:
    """The status and body of ``GET http://127.0.0.1:<port><path>``."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def call(app_readiness: Readiness, path: str, registry: CollectorRegistry) -> tuple[str, bytes]:
    """One request through the WSGI app, no server."""
    environ: dict[str, object] = {"PATH_INFO": path, "wsgi.input": BytesIO()}
    setup_testing_defaults(environ)
    environ["PATH_INFO"] = path
    started: list[str] = []

    def start_response(
        status: str, headers: list[tuple[str, str]], exc_info: object = None
    ) -> None:
        started.append(status)

    body = b"".join(metrics_app(app_readiness, registry)(environ, start_response))  # type: ignore[arg-type]
    return started[0], body


def test_ready_follows_the_session_and_every_other_path_is_the_exposition() -> None:
    registry = CollectorRegistry()
    Gauge("probe_test_gauge", "a gauge of this test", registry=registry).set(7)
    readiness = Readiness()
    status, body = call(readiness, "/ready", registry)
    assert (status, body.decode()) == ("503 Service Unavailable", NOT_STARTED + "\n")
    readiness.observe(Source(connected=False))  # type: ignore[arg-type]
    assert call(readiness, "/ready", registry) == (
        "503 Service Unavailable",
        (NEVER_SUBSCRIBED + "\n").encode(),
    )
    readiness.observe(Source(connected=True))  # type: ignore[arg-type]
    assert call(readiness, "/ready", registry) == ("200 OK", b"ready\n")
    readiness.observe(Source(connected=False))  # type: ignore[arg-type]
    assert call(readiness, "/ready", registry)[1] == (LOST + "\n").encode()
    readiness.stopped()
    assert call(readiness, "/ready", registry)[1] == (STOPPING + "\n").encode()
    for path in ("/metrics", "/"):
        status, body = call(readiness, path, registry)
        assert status == "200 OK"
        assert "probe_test_gauge 7.0" in body.decode()
    assert call(readiness, "/ready/", registry)[0] == "200 OK"  # not the route: the exposition


def test_the_server_answers_both_routes_on_the_address_it_is_given() -> None:
    readiness = Readiness()
    port = free_port()
    server = start_metrics_server(port, "127.0.0.1", readiness)
    try:
        assert get(port, "/ready") == (503, NOT_STARTED + "\n")
        status, text = get(port, "/metrics")
        assert status == 200
        assert "python_info" in text
        readiness.observe(Source(connected=True))  # type: ignore[arg-type]
        assert get(port, "/ready") == (200, "ready\n")
        # Bound to 127.0.0.1 only: another local address of the host is refused.
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.2", port), timeout=2).close()
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class Relay:
    """A TCP relay on 127.0.0.1 to ``upstream``; ``open`` and ``close`` it to take the
    broker away from whoever connects through it (every relayed connection is cut)."""

    upstream: int
    port: int = field(default_factory=free_port)
    listener: socket.socket | None = None
    sockets: list[socket.socket] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def open(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def close(self) -> None:
        if self.listener is not None:
            # shutdown first: on Linux it wakes the thread in accept(), which close alone
            # does not, and the port would stay listening.
            with contextlib.suppress(OSError):
                self.listener.shutdown(socket.SHUT_RDWR)
            self.listener.close()
            self.listener = None
        with self.lock:
            for sock in self.sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self.sockets.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.upstream), timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self.lock:
                self.sockets += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


def assert_ready_follows_the_broker(workers: IngestWorkers, relay: Relay) -> None:
    """Started with the relay closed: 503 (never subscribed) while /metrics answers; 200 once
    the relay opens and the worker subscribes; 503 (lost) when the relay cuts it off."""
    workers.start(wait=False)
    port = workers.metrics_ports["1"]
    # First NOT_STARTED (the endpoint opens before the loop's first poll), then this.
    wait_until(lambda: get_or_none(port) == (503, NEVER_SUBSCRIBED + "\n"), WAIT_S, "a first poll")
    assert get(port, "/metrics")[0] == 200
    assert workers.metric("1", "galvani_ingest_connected") == 0
    relay.open()
    wait_until(lambda: get(port, "/ready")[0] == 200, WAIT_S, "the worker to be ready")
    assert get(port, "/ready") == (200, "ready\n")
    assert workers.subscribed("1")
    assert workers.metric("1", "galvani_ingest_connected") == 1
    relay.close()
    wait_until(lambda: get(port, "/ready")[0] == 503, WAIT_S, "the worker to lose the broker")
    assert get(port, "/ready") == (503, LOST + "\n")
    assert get(port, "/metrics")[0] == 200
    relay.open()
    wait_until(lambda: get(port, "/ready")[0] == 200, WAIT_S, "the worker to be ready again")


def get_or_none(port: int) -> tuple[int, str] | None:
    try:
        return get(port, "/ready")
    except OSError:
        return None


@pytest.fixture
def relay() -> Iterator[Relay]:
    """A relay whose upstream the test sets; closed afterwards."""
    made = Relay(upstream=0)
    yield made
    made.close()


def test_a_mosquitto_worker_is_ready_only_while_subscribed(
    ingest_database_url: str,
    broker: MosquittoBroker,
    service_passwords: dict[ServiceAccount, str],
    tmp_path: Path,
    relay: Relay,
) -> None:
    relay.upstream = broker.config.service_port
    workers = IngestWorkers.on_broker(ingest_database_url, broker, service_passwords, tmp_path)
    workers.mqtt_port = relay.port
    try:
        assert_ready_follows_the_broker(workers, relay)
    finally:
        workers.stop()
        workers.mqtt_port = broker.config.service_port  # to forget the session directly
        workers.close()


def test_a_jetstream_worker_is_ready_only_while_its_consumer_is_pulled(
    ingest_database_url: str, pki: DevelopmentPKI, tmp_path: Path, relay: Relay
) -> None:
    password = new_password()
    tls = (pki.server_cert, pki.server_key, pki.ca_file)
    with single_nats(tmp_path / "nats", {"galvani-ingest": password}, tls=tls) as server:
        relay.upstream = server.client_port
        workers = IngestWorkers.on_nats(
            ingest_database_url, f"tls://127.0.0.1:{relay.port}", password, tmp_path, pki.ca_file
        )
        try:
            assert_ready_follows_the_broker(workers, relay)
        finally:
            workers.close()
