"""The notify HTTP transport (services/notify/http_post.py) against a real local HTTP server:
connections kept alive and reused per thread, dropped when the server closes them or says
``Connection: close``, and a request the server may have acted on never sent twice by it."""

import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from services.common.outbound_urls import CheckedUrl
from services.notify import http_post

TIMEOUT_S = 2.0


class Server:
    """Counts connections and requests; can close a connection after its answer (silently, as
    an idle timeout does), say ``Connection: close``, or read a request and hang up."""

    def __init__(self) -> None:
        self.connections = 0
        self.requests: list[tuple[int, bytes]] = []
        self.close_silently = False
        self.say_close = False
        self.hang_up = False
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                with server._lock:
                    server.connections += 1
                    self.number = server.connections

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with server._lock:
                    server.requests.append((self.number, body))
                if server.hang_up:
                    self.close_connection = True
                    return
                self.send_response(200)
                self.send_header("Content-Length", "2")
                if server.say_close:
                    self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(b"ok")
                if server.close_silently:
                    self.close_connection = True

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http.daemon_threads = True
        self.port = self.http.server_address[1]
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def target(self) -> CheckedUrl:
        return CheckedUrl(
            url=f"http://127.0.0.1:{self.port}/hook",
            scheme="http",
            host="127.0.0.1",
            port=self.port,
            addresses=(ipaddress.ip_address("127.0.0.1"),),
        )


@pytest.fixture
def server() -> Iterator[Server]:
    running = Server()
    yield running
    running.http.shutdown()
    running.http.server_close()


def post(server: Server, body: bytes) -> http_post.Outcome:
    return http_post.send(
        server.target(), body, {}, timeout_s=TIMEOUT_S, tls=ssl.create_default_context()
    )


def in_thread(server: Server, bodies: list[bytes]) -> list[http_post.Outcome]:
    """Send from a thread of its own (a delivery thread: its own kept connections)."""
    outcomes: list[http_post.Outcome] = []
    thread = threading.Thread(target=lambda: outcomes.extend(post(server, b) for b in bodies))
    thread.start()
    thread.join()
    return outcomes


def test_requests_from_one_thread_reuse_one_connection(server: Server) -> None:
    outcomes = in_thread(server, [b'{"n": %d}' % n for n in range(20)])
    assert all(o.delivered for o in outcomes)
    assert len(server.requests) == 20
    assert server.connections == 1


def test_each_thread_has_its_own_connection(server: Server) -> None:
    in_thread(server, [b"{}"] * 3)
    in_thread(server, [b"{}"] * 3)
    assert len(server.requests) == 6
    assert server.connections == 2


def test_connection_closed_by_the_server_while_idle_is_replaced_and_nothing_is_sent_twice(
    server: Server,
) -> None:
    server.close_silently = True

    def three() -> list[http_post.Outcome]:
        outcomes = []
        for n in range(3):
            outcomes.append(post(server, b'{"n": %d}' % n))
            time.sleep(0.2)  # the server's FIN arrives while the connection is idle
        return outcomes

    outcomes: list[http_post.Outcome] = []
    thread = threading.Thread(target=lambda: outcomes.extend(three()))
    thread.start()
    thread.join()
    assert [o.delivered for o in outcomes] == [True, True, True]
    assert [body for _, body in server.requests] == [b'{"n": 0}', b'{"n": 1}', b'{"n": 2}']
    assert server.connections == 3


def test_connection_close_answer_is_not_reused(server: Server) -> None:
    server.say_close = True
    outcomes = in_thread(server, [b"{}"] * 4)
    assert all(o.delivered for o in outcomes)
    assert server.connections == 4


def test_request_written_whole_then_unanswered_is_not_sent_again(server: Server) -> None:
    def two() -> list[http_post.Outcome]:
        first = post(server, b'{"n": 1}')
        server.hang_up = True  # reads the next request in full, then closes without answering
        return [first, post(server, b'{"n": 2}')]

    outcomes: list[http_post.Outcome] = []
    thread = threading.Thread(target=lambda: outcomes.extend(two()))
    thread.start()
    thread.join()
    assert outcomes[0].delivered
    assert not outcomes[1].delivered
    assert "RemoteDisconnected" in str(outcomes[1].error)
    # The second request went over the kept connection, reached the server, and was not
    # repeated: the dispatcher's retry (same idempotency key) decides what happens next.
    assert server.requests == [(1, b'{"n": 1}'), (1, b'{"n": 2}')]


def test_refused_connection_is_a_failed_attempt() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    target = CheckedUrl(
        url=f"http://127.0.0.1:{port}/hook",
        scheme="http",
        host="127.0.0.1",
        port=port,
        addresses=(ipaddress.ip_address("127.0.0.1"),),
    )
    outcome = http_post.send(
        target, b"{}", {}, timeout_s=TIMEOUT_S, tls=ssl.create_default_context()
    )
    assert not outcome.delivered
    assert "ConnectionRefusedError" in str(outcome.error)
