"""A worker's HTTP endpoint: Prometheus' ``/metrics`` and the readiness route ``/ready``.

``GET /ready`` answers 200 ``ready`` while the worker's broker session is connected and
subscribed (an MQTT shared subscription acknowledged by SUBACK, or a JetStream consumer made
and pulled from), else 503 with one line saying why: not yet subscribed, subscription lost,
stopping. Every other path goes to ``prometheus_client.make_wsgi_app()`` unchanged. The app
is served by prometheus_client's own threading WSGI server, as ``start_http_server`` serves
its app, on a daemon thread: the worker's loop records its session's state in a
:class:`Readiness` after every poll, the server's threads read it.
"""

import socket
import threading
from collections.abc import Iterable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from prometheus_client import REGISTRY, CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from services.common.broker.source import InboundSource

READY_PATH = "/ready"
NOT_STARTED = "the worker has not opened its broker session yet"
NEVER_SUBSCRIBED = "not subscribed: the broker session is not connected yet"
LOST = "not subscribed: the broker session was lost; reconnecting"
STOPPING = "stopping: the broker session is closed"


class Readiness:
    """Whether the worker consumes: written by its loop, read by the endpoint's threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reason: str | None = NOT_STARTED
        self._was_subscribed = False

    def observe(self, source: InboundSource) -> None:
        """Take the broker session's state after a poll."""
        with self._lock:
            if source.connected:
                self._reason = None
                self._was_subscribed = True
            else:
                self._reason = LOST if self._was_subscribed else NEVER_SUBSCRIBED

    def stopped(self) -> None:
        """The session is closed for good."""
        with self._lock:
            self._reason = STOPPING

    def reason(self) -> str | None:
        """None when ready, else why not (one line)."""
        with self._lock:
            return self._reason


# The process's one worker loop records its state here (as metrics go to REGISTRY).
WORKER_READINESS = Readiness()


def metrics_app(readiness: Readiness, registry: CollectorRegistry = REGISTRY) -> WSGIApplication:
    """``/ready`` from ``readiness``; anything else is Prometheus' exposition of ``registry``."""
    metrics: WSGIApplication = make_wsgi_app(registry)

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != READY_PATH:
            return metrics(environ, start_response)
        reason = readiness.reason()
        status = "200 OK" if reason is None else "503 Service Unavailable"
        body = f"{reason or 'ready'}\n".encode()
        start_response(
            status,
            [
                ("Content-Type", "text/plain; charset=utf-8"),
                ("Content-Length", str(len(body))),
                ("Cache-Control", "no-store"),
            ],
        )
        return [body] if environ.get("REQUEST_METHOD") != "HEAD" else []

    return app


class _SilentHandler(WSGIRequestHandler):
    """Logs no request (probes come every few seconds), as prometheus_client's handler."""

    def log_message(self, format: str, *args: object) -> None:
        """Log nothing."""


def start_metrics_server(
    port: int, addr: str, readiness: Readiness = WORKER_READINESS
) -> WSGIServer:
    """Serve :func:`metrics_app` on ``addr:port`` from a daemon thread, the way
    ``prometheus_client.start_http_server`` serves its own app (IPv6 addresses included)."""

    class Server(ThreadingWSGIServer):
        """ThreadingWSGIServer with the address family of ``addr``."""

    family, _, _, _, sockaddr = socket.getaddrinfo(
        addr, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    Server.address_family = family
    httpd = make_server(
        str(sockaddr[0]), port, metrics_app(readiness), Server, handler_class=_SilentHandler
    )
    threading.Thread(target=httpd.serve_forever, name="metrics-server", daemon=True).start()
    return httpd
