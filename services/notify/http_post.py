"""The HTTP transport every HTTP channel kind shares: one POST to a checked address.

The connection goes to an address the URL check accepted (:class:`CheckedUrl`), not to a second
resolution of the name, so a name re-pointed at 127.0.0.1 between the check and the connect
(DNS rebinding) reaches nothing it should not; TLS still verifies the certificate for the name
(SNI and the Host header carry the name too). Redirects are never followed: a 3xx is a failed
attempt, so a receiver cannot bounce the dispatcher to another address.

Connections are kept alive and reused, per thread, for the same (scheme, host, port, checked
address), so sustained deliveries to one receiver pay the TCP (and TLS) handshake once per
delivery thread, not per request. A connection is dropped after any error, a timeout, an
answer with ``Connection: close`` (or without keep-alive), an answer body longer than what is
read of it, or ``KEEPALIVE_IDLE_S`` unused. Before a kept connection is used it is polled: if
the receiver closed it meanwhile (its FIN is readable), it is closed and a new one opened,
nothing having been sent on it. If sending on a kept connection fails (reset, broken pipe),
the receiver did not get the whole request (its Content-Length was not reached), so it is sent
once more on a new connection. If the whole request was written and the connection then
closed without an answer, it is NOT sent again here: the receiver may have acted on it; the
attempt fails and the dispatcher retries it after its backoff with the same idempotency key
(at-least-once, as after a timeout).
"""

import http.client
import select
import socket
import ssl
import threading
import time
import urllib.parse

from services.common.outbound_urls import CheckedUrl

USER_AGENT = "Galvani-Notify/1"
# Enough of a receiver's error answer to say what went wrong (it is shown to the brand in the
# delivery log), never more.
ERROR_TEXT_CHARS = 200
# The most of an answer's body read; a longer body leaves the connection unusable (dropped).
ANSWER_READ_BYTES = 64 * 1024
# A kept connection unused this long is closed rather than reused (receivers close idle ones
# themselves, nginx after 75 s, Node.js after 5 s; the poll before reuse catches those).
KEEPALIVE_IDLE_S = 60.0
# Kept connections per delivery thread (one per receiver address in use).
KEEPALIVE_PER_THREAD = 8

_Key = tuple[str, str, int, str]


class Outcome:
    """What one attempt gave: delivered (a 2xx answer), or the error and status to record;
    ``final`` when retrying cannot succeed (the receiver refused this very request for good:
    PagerDuty's 400, an SMTP 5xx), so the row fails at once rather than at the give-up time."""

    __slots__ = ("delivered", "error", "final", "status_code")

    def __init__(
        self,
        delivered: bool,
        status_code: int | None = None,
        error: str | None = None,
        *,
        final: bool = False,
    ) -> None:
        self.delivered = delivered
        self.status_code = status_code
        self.error = error
        self.final = final


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Plain HTTP to ``address``, with ``host`` in the Host header."""

    def __init__(self, target: CheckedUrl, timeout_s: float) -> None:
        super().__init__(target.host, target.port, timeout=timeout_s)
        self._address = str(target.addresses[0])

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """TLS to ``address``, verifying the certificate for ``host`` (SNI and Host too)."""

    def __init__(self, target: CheckedUrl, timeout_s: float, tls: ssl.SSLContext) -> None:
        super().__init__(target.host, target.port, timeout=timeout_s, context=tls)
        self._address = str(target.addresses[0])
        self._tls = tls

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = self._tls.wrap_socket(sock, server_hostname=self.host)


class _Idle(dict[_Key, tuple[http.client.HTTPConnection, float]]):
    """A thread's idle connections, least recently used first; closed when the thread ends
    (its thread-local state is dropped)."""

    def __del__(self) -> None:
        for connection, _ in self.values():
            connection.close()


class _Kept(threading.local):
    def __init__(self) -> None:
        self.idle = _Idle()


_kept = _Kept()


def _take(key: _Key) -> http.client.HTTPConnection | None:
    """A kept connection for ``key`` still open at the other end, or None."""
    entry = _kept.idle.pop(key, None)
    if entry is None:
        return None
    connection, last_used = entry
    sock = connection.sock
    if sock is None or time.monotonic() - last_used > KEEPALIVE_IDLE_S:
        connection.close()
        return None
    # Readable while idle means the receiver closed it (EOF) or sent something unasked: either
    # way it cannot carry a request.
    readable, _, _ = select.select([sock], [], [], 0)
    if readable:
        connection.close()
        return None
    return connection


def _keep(key: _Key, connection: http.client.HTTPConnection) -> None:
    idle = _kept.idle
    idle[key] = (connection, time.monotonic())
    while len(idle) > KEEPALIVE_PER_THREAD:
        oldest = next(iter(idle))
        idle.pop(oldest)[0].close()


def _new(target: CheckedUrl, timeout_s: float, tls: ssl.SSLContext) -> http.client.HTTPConnection:
    if target.scheme == "https":
        return _PinnedHTTPSConnection(target, timeout_s, tls)
    return _PinnedHTTPConnection(target, timeout_s)


def send(
    target: CheckedUrl,
    body: bytes,
    headers: dict[str, str],
    *,
    timeout_s: float,
    tls: ssl.SSLContext,
) -> Outcome:
    """POST ``body`` with ``headers`` (``User-Agent`` and ``Content-Type: application/json``
    added unless given) to ``target``'s first checked address; a 2xx answer is delivered."""
    key = (target.scheme, target.host, target.port, str(target.addresses[0]))
    parts = urllib.parse.urlsplit(target.url)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    sent = {"User-Agent": USER_AGENT, "Content-Type": "application/json", **headers}
    connection = _take(key)
    reused = connection is not None
    if connection is None:
        connection = _new(target, timeout_s, tls)
    else:
        connection.timeout = timeout_s
        assert connection.sock is not None
        connection.sock.settimeout(timeout_s)
    try:
        try:
            connection.request("POST", path, body=body, headers=sent)
        except ConnectionError:
            if not reused:
                raise
            # The kept connection died under the request before all of it was written.
            connection.close()
            connection = _new(target, timeout_s, tls)
            connection.request("POST", path, body=body, headers=sent)
        response = connection.getresponse()
        answer = response.read(ANSWER_READ_BYTES)
    except TimeoutError:
        connection.close()
        return Outcome(False, error=f"no answer within {timeout_s:g} s")
    except (OSError, http.client.HTTPException) as exc:
        connection.close()
        return Outcome(False, error=f"{type(exc).__name__}: {exc}"[:ERROR_TEXT_CHARS])
    # A response read to its end closes itself; one still open had a longer body.
    if response.will_close or not response.isclosed() or connection.sock is None:
        connection.close()
    else:
        _keep(key, connection)
    if 200 <= response.status < 300:
        return Outcome(True, status_code=response.status)
    text = answer.decode("utf-8", "replace")[:ERROR_TEXT_CHARS]
    return Outcome(False, status_code=response.status, error=f"HTTP {response.status}: {text}")
