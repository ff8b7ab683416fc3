"""A real webhook receiver for the dispatcher's tests: an HTTP server on loopback that checks
each request's Galvani signature and records it, and can answer 500, hang, or be down.

It verifies as a brand's receiver should (docs/api.md): HMAC-SHA256 with the channel's secret
over ``"<Galvani-Timestamp>." + body``, compared in constant time; a request that fails the
check is answered 401 and counted in ``bad_signatures``, never recorded as received. Without a
secret it stands in for Slack's or PagerDuty's endpoint: any JSON POST is recorded with its path,
and answered ``ok_status`` (PagerDuty's 202) or ``fail_status`` while failing.
"""

import contextlib
import hashlib
import hmac
import json
import socket
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class _Server(ThreadingHTTPServer):
    # socketserver's listen backlog is 5: a dispatcher opening 32 connections at once would
    # have SYNs dropped and retried a second later.
    request_queue_size = 256
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        # A dispatcher killed mid-request leaves a broken pipe: expected in the kill test.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Received:
    """One request whose signature verified."""

    key: str
    payload: dict[str, Any]
    body: bytes
    at: float
    path: str = ""


class Receiver:
    """The server; ``fail_until`` (500 before that monotonic time), ``delay_s`` (wait that long
    before answering), ``hang_until``/``hang_s`` (a request received before that time is
    answered only ``hang_s`` later) and ``stop``/``start`` (down, then up again on the same
    port)."""

    def __init__(self, secret: str | None, *, ok_status: int = 200) -> None:
        self.secret = None if secret is None else secret.encode()
        self.ok_status = ok_status
        self.fail_status = 500
        self.received: list[Received] = []
        self.bad_signatures = 0
        self.answered_500 = 0
        self.fail_until = 0.0
        self.fail_always = False
        self.delay_s = 0.0
        self.hang_until = 0.0
        self.hang_s = 0.0
        self.port = 0
        # Requests being answered (recorded, not yet answered) per path, and the most seen.
        self.in_progress: Counter[str] = Counter()
        self.max_in_progress: dict[str, int] = {}
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The URL a channel is pointed at."""
        return self.url_for("/hooks/galvani")

    def url_for(self, path: str) -> str:
        """The URL of ``path`` on this receiver."""
        return f"http://127.0.0.1:{self.port}{path}"

    def start(self) -> None:
        """Listen (on the port of the last start, once there was one)."""
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                # The status line and headers, then the body, are two writes: without
                # TCP_NODELAY the second waits for the client's delayed ACK (40 ms).
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                with receiver._lock:
                    receiver._connections.add(self.connection)

            def finish(self) -> None:
                with receiver._lock:
                    receiver._connections.discard(self.connection)
                super().finish()

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                receiver.handle(self, body)

            def log_message(self, format: str, *args: Any) -> None:
                return

        server = _Server(("127.0.0.1", self.port), Handler)
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop listening: connections are refused until the next ``start``, and the open ones
        (a client's kept-alive connections) are shut, so nothing more is answered."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self._lock:
            open_connections = list(self._connections)
            self._connections.clear()
        for connection in open_connections:
            # OSError: the client closed it already.
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def handle(self, request: BaseHTTPRequestHandler, body: bytes) -> None:
        """Verify, then answer as the current mode says."""
        if self.secret is not None and not self._verified(request, body):
            with self._lock:
                self.bad_signatures += 1
            self._answer(request, 401)
            return
        if self.fail_always or time.monotonic() < self.fail_until:
            with self._lock:
                self.answered_500 += 1
            self._answer(request, self.fail_status)
            return
        with self._lock:
            self.received.append(
                Received(
                    request.headers.get("Galvani-Idempotency-Key", ""),
                    json.loads(body),
                    body,
                    time.monotonic(),
                    request.path,
                )
            )
            self.in_progress[request.path] += 1
            self.max_in_progress[request.path] = max(
                self.max_in_progress.get(request.path, 0), self.in_progress[request.path]
            )
        try:
            if self.delay_s:
                time.sleep(self.delay_s)
            if time.monotonic() < self.hang_until:
                time.sleep(self.hang_s)
            self._answer(request, self.ok_status)
        finally:
            with self._lock:
                self.in_progress[request.path] -= 1

    def _verified(self, request: BaseHTTPRequestHandler, body: bytes) -> bool:
        assert self.secret is not None
        timestamp = request.headers.get("Galvani-Timestamp", "")
        signature = request.headers.get("Galvani-Signature", "")
        expected = (
            "v1="
            + hmac.new(self.secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
        )
        fresh = timestamp.isdigit() and abs(time.time() - int(timestamp)) < 300
        return fresh and hmac.compare_digest(signature, expected)

    def snapshot(self) -> list[Received]:
        """The requests received so far, in arrival order."""
        with self._lock:
            return list(self.received)

    @staticmethod
    def _answer(request: BaseHTTPRequestHandler, status: int) -> None:
        text = b"ok" if 200 <= status < 300 else b"receiver says no"
        request.send_response(status)
        request.send_header("Content-Length", str(len(text)))
        request.end_headers()
        request.wfile.write(text)
