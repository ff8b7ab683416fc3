"""A small synchronous client of the NATS protocol, for the workers and the broker services.

Why our own rather than nats-py: nats-py is asyncio, and the workers are single-threaded
loops that run the network between batches (services.common.worker); and, as with the MQTT
subscriber (services.common.subscriber), one ``recv`` of up to READ_SIZE bytes is parsed
here into every message it holds, so the CPU per message stays a few string operations.

What it speaks (https://docs.nats.io/reference/reference-protocols/nats-protocol):

* INFO, then CONNECT with ``verbose`` and ``pedantic`` off (no +OK per command), ``headers``
  and ``no_responders`` on (a request nobody serves is answered at once with status 503),
  user and password when given; then PING, and the connection is up at its PONG. An -ERR
  before it (an authorisation violation) fails the attempt and the next server is tried.
* TLS: upgraded right after INFO when the URL is ``tls://`` or the server says
  ``tls_required``; the server's certificate and host name are verified with the context the
  caller gives (services.common.tls.client_context).
* SUB/UNSUB, PUB/HPUB, and MSG/HMSG with headers and status lines ("NATS/1.0 404 No
  Messages", 408 Request Timeout, 409, 100 Idle Heartbeat, 503 No Responders).
* PING/PONG both ways: the server's PINGs are answered; the client PINGs after
  PING_INTERVAL_S without traffic from the server, and a connection whose MAX_PINGS_OUT
  PINGs go unanswered is declared lost.
* -ERR: permission violations and invalid subjects leave the connection open (the server
  keeps it); any other -ERR is followed by the server closing it, and is a lost connection.

Reconnection is the caller's: a lost connection raises :class:`ConnectionLost` from
:meth:`NatsClient.poll` (or :meth:`flush`), and the next :meth:`NatsClient.connect` tries
the next server of the list. A reconnection subscribes again to everything subscribed, under
the same sids, and bumps :attr:`NatsClient.generation`.
"""

import json
import logging
import re
import secrets
import select
import socket
import ssl
import time
from collections import deque
from typing import Any, Final, NamedTuple
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

READ_SIZE: Final = 256 * 1024
# The longest control line (MSG/HMSG/INFO/-ERR) accepted; the server's own limit is 4 KiB
# for what clients send, and an INFO with a long connect_urls list can exceed that.
MAX_CONTROL_LINE_BYTES: Final = 64 * 1024
# A server that stops answering (SIGSTOP, a partition: its TCP connection stays open) is left
# after 3 PING_INTERVAL_S (PINGs at 1 and 2 intervals of silence, lost at 3). At 20 s, the
# auth-callout responders of a paused node stayed there a minute, and every login on the
# other nodes, devices' and services', was refused meanwhile (tests/test_cluster_faults.py).
# An idle connection costs a PING every 2 s.
PING_INTERVAL_S: Final = 2.0
MAX_PINGS_OUT: Final = 2
FLUSH_TIMEOUT_S: Final = 5.0
CLOSE_TIMEOUT_S: Final = 1.0
CLIENT_LANG: Final = "python-galvani"
CLIENT_VERSION: Final = "1"
HEADER_LINE: Final = b"NATS/1.0"
MSG_FIRST: Final = ord("M")
SPACE: Final = ord(" ")
# -ERR messages after which the server keeps the connection (server/client.go sendErr calls
# that do not close): the rest precede a close.
# Reply subjects: ``_INBOX.<user>.<random>.<n>``; a user name must be one subject token.
INBOX: Final = "_INBOX"
_SUBJECT_TOKEN: Final = re.compile(r"[^\s.*>]+")
NON_FATAL_ERRORS: Final = ("permissions violation", "invalid subject", "invalid publish subject")


class ConnectionLost(Exception):
    """No connection (any more): the message says why. Connect again to go on."""


class NatsError(Exception):
    """The server said -ERR, or a request could not be made."""


class NatsMessage(NamedTuple):
    """One MSG or HMSG. ``status`` is the status line's code (an HMSG without a payload from
    the server: 100 heartbeat, 404, 408, 409, 503), None for an ordinary message."""

    subject: str
    reply: str
    headers: dict[str, str]
    status: int | None
    payload: bytes


def encode_headers(headers: dict[str, str]) -> bytes:
    """The header block of an HPUB: the version line, one line per header, an empty line."""
    lines = [HEADER_LINE]
    for key, value in headers.items():
        if any(c in key for c in ":\r\n ") or any(c in value for c in "\r\n"):
            raise ValueError(f"header {key!r} cannot be sent")
        lines.append(f"{key}: {value}".encode())
    return b"\r\n".join(lines) + b"\r\n\r\n"


def decode_headers(block: bytes) -> tuple[int | None, dict[str, str]]:
    """The status code and headers of an HMSG's header block.

    The first line is ``NATS/1.0`` with an optional status code and description ("NATS/1.0
    404 No Messages"); the description is kept as the ``Description`` header.
    """
    text = block.decode("utf-8", "replace")
    lines = text.split("\r\n")
    first = lines[0]
    if not first.startswith("NATS/1.0"):
        raise NatsError(f"a header block that starts {first[:40]!r}")
    status: int | None = None
    headers: dict[str, str] = {}
    rest = first[len("NATS/1.0") :].strip()
    if rest:
        code, _, description = rest.partition(" ")
        if code.isdigit():
            status = int(code)
            if description:
                headers["Description"] = description
    for line in lines[1:]:
        if not line:
            continue
        key, sep, value = line.partition(":")
        if sep:
            headers[key.strip()] = value.strip()
    return status, headers


def inbox_root(user: str) -> str:
    """Where the replies to ``user``'s requests come: ``_INBOX.<user>``. A login's permissions
    can then let it read its own replies and no other login's (services/broker_access/
    callout.py grants ``_INBOX.<account>.>``)."""
    if not _SUBJECT_TOKEN.fullmatch(user):
        raise ValueError(f"{user!r} cannot be a subject token")
    return f"{INBOX}.{user}"


def new_inbox_prefix(user: str) -> str:
    """A reply-subject prefix no other client will use: ``_INBOX.<user>.<random>``."""
    return f"{inbox_root(user)}.{secrets.token_hex(11)}"


class _Server(NamedTuple):
    url: str
    host: str
    port: int
    tls: bool  # tls:// insists on TLS even if the server would take plaintext


def _parse_url(url: str) -> _Server:
    parts = urlsplit(url)
    if parts.scheme not in ("nats", "tls") or not parts.hostname or parts.port is None:
        raise ValueError(f"{url!r} is not nats://host:port or tls://host:port")
    return _Server(url, parts.hostname, parts.port, parts.scheme == "tls")


class _Lost(Exception):
    """Raised inside a read to end the connection; turned into ConnectionLost."""


class NatsClient:
    """One connection to one server of a list, used from one thread.

    Messages arrive from :meth:`poll` (and the ones that arrive during a :meth:`request` are
    kept for the next poll). Publishes are queued and leave with the next :meth:`flush` or
    :meth:`poll`, so many of them go in one write.
    """

    def __init__(
        self,
        servers: list[str],
        *,
        user: str,
        password: str,
        tls: ssl.SSLContext | None,
        name: str,
    ) -> None:
        if not servers:
            raise ValueError("no NATS servers")
        self._servers = [_parse_url(url) for url in servers]
        self._user = user
        self._password = password
        self._tls = tls
        self._name = name
        self._next = 0  # the index of the server the next connect tries first
        self.connected = False
        self.generation = 0  # bumped by every accepted connection
        self.server = ""  # the URL connected to
        self.info: dict[str, Any] = {}
        self.last_error = ""  # the last -ERR, fatal or not
        self._sock: socket.socket | None = None
        self._in = bytearray()
        self._out = bytearray()
        self._ready: deque[NatsMessage] = deque()  # parsed, not yet returned by poll
        self._pongs = 0
        self._pings_out = 0
        self._last_in = 0.0
        self._max_payload = 1024 * 1024
        self._sid = 0
        self._subscriptions: dict[int, tuple[str, str]] = {}
        self._inbox = ""
        self._inbox_sid = 0
        self._request_id = 0

    # -- connection -------------------------------------------------------------------------

    def connect(self, timeout_s: float) -> None:
        """Connect to the first server that accepts, from the one after the last used; each
        attempt is bounded by ``timeout_s``. Raises ConnectionLost when none accepts."""
        self._drop()
        failures = []
        count = len(self._servers)
        for step in range(count):
            index = (self._next + step) % count
            server = self._servers[index]
            try:
                self._handshake(server, timeout_s)
            except (OSError, _Lost, NatsError, ConnectionLost) as exc:
                self._drop()
                failures.append(f"{server.url}: {_why(exc)}")
                continue
            self._next = (index + 1) % count
            return
        self._next = (self._next + 1) % count
        raise ConnectionLost("no NATS server accepted the connection: " + "; ".join(failures))

    def _handshake(self, server: _Server, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        sock = socket.create_connection((server.host, server.port), timeout=timeout_s)
        self._sock = sock
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        line = self._read_line(sock, deadline)
        if not line.startswith(b"INFO "):
            raise _Lost(f"expected INFO, got {bytes(line[:40])!r}")
        info = json.loads(line[5:])
        wants_tls = server.tls or bool(info.get("tls_required"))
        if wants_tls:
            if self._tls is None:
                raise NatsError("the server requires TLS and no TLS context was given")
            if not (info.get("tls_required") or info.get("tls_available")):
                raise NatsError("tls:// given but the server does not offer TLS")
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            sock = self._tls.wrap_socket(sock, server_hostname=server.host)
            self._sock = sock
        self.info = info
        self._max_payload = int(info.get("max_payload", self._max_payload))
        self._in.clear()
        self._out.clear()
        self._ready.clear()
        self._pongs = self._pings_out = 0
        connect: dict[str, Any] = {
            "verbose": False,
            "pedantic": False,
            "tls_required": wants_tls,
            "name": self._name,
            "lang": CLIENT_LANG,
            "version": CLIENT_VERSION,
            "protocol": 1,
            "headers": True,
            "no_responders": True,
            "echo": True,
        }
        if self._user:
            connect["user"] = self._user
            connect["pass"] = self._password
        self._out += b"CONNECT " + json.dumps(connect, separators=(",", ":")).encode() + b"\r\n"
        for sid, (subject, queue) in self._subscriptions.items():
            self._out += _sub_line(subject, queue, sid)
        self._out += b"PING\r\n"
        sock.setblocking(False)
        self._last_in = time.monotonic()
        while self._pongs == 0:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Lost("no PONG to the CONNECT in time")
            self._pump(remaining)
        self.connected = True
        self.generation += 1
        self.server = server.url
        log.info("connected to NATS at %s as %s", server.url, self._name)

    def _read_line(self, sock: socket.socket, deadline: float) -> bytearray:
        """The first line the server sends (INFO), read blocking before any TLS."""
        buf = bytearray()
        while b"\r\n" not in buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Lost("no INFO in time")
            sock.settimeout(remaining)
            data = sock.recv(4096)
            if not data:
                raise _Lost("the server closed the connection before INFO")
            buf += data
            if len(buf) > MAX_CONTROL_LINE_BYTES:
                raise _Lost("INFO line too long")
        line, _, rest = buf.partition(b"\r\n")
        if rest:
            raise _Lost("data after INFO before CONNECT")
        return line

    def close(self) -> None:
        """Send what is queued (briefly) and close the connection; subscriptions are kept
        for a later connect."""
        sock = self._sock
        if sock is not None and self.connected and self._out:
            try:
                sock.settimeout(CLOSE_TIMEOUT_S)
                sock.sendall(self._out)
            except OSError as exc:
                log.info("could not send what was queued before closing: %s", exc)
        self._drop()

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock = None
        self.connected = False
        self._in.clear()
        self._out.clear()

    def _lost(self, why: str) -> ConnectionLost:
        if self.connected:
            log.warning("lost the connection to NATS at %s: %s", self.server, why)
        self._drop()
        return ConnectionLost(why)

    # -- commands ---------------------------------------------------------------------------

    def subscribe(self, subject: str, *, queue: str = "") -> int:
        """Subscribe (in queue group ``queue`` when given); the subscription id. Kept across
        reconnections."""
        self._sid += 1
        sid = self._sid
        self._subscriptions[sid] = (subject, queue)
        if self.connected:
            self._out += _sub_line(subject, queue, sid)
        return sid

    def unsubscribe(self, sid: int) -> None:
        """End subscription ``sid``."""
        if self._subscriptions.pop(sid, None) is not None and self.connected:
            self._out += b"UNSUB %d\r\n" % sid

    def publish(
        self,
        subject: str,
        payload: bytes,
        *,
        reply: str = "",
        headers: dict[str, str] | None = None,
    ) -> None:
        """Queue a message, to leave with the next flush or poll. Raises ConnectionLost when
        not connected, ValueError when over the server's max_payload."""
        if not self.connected:
            raise ConnectionLost("not connected")
        head = encode_headers(headers) if headers else b""
        total = len(head) + len(payload)
        if total > self._max_payload:
            raise ValueError(f"{total} bytes, over the server's max_payload {self._max_payload}")
        out = self._out
        if head:
            out += b"HPUB %s %s%d %d\r\n" % (
                subject.encode(),
                reply.encode() + b" " if reply else b"",
                len(head),
                total,
            )
            out += head
        else:
            out += b"PUB %s %s%d\r\n" % (
                subject.encode(),
                reply.encode() + b" " if reply else b"",
                len(payload),
            )
        out += payload
        out += b"\r\n"

    def publish_each(self, subjects: list[str], payload: bytes) -> None:
        """Queue ``payload`` to each of ``subjects`` (JetStream acks: one append for a batch).
        Raises ConnectionLost when not connected."""
        if not self.connected:
            raise ConnectionLost("not connected")
        tail = b" %d\r\n%s\r\n" % (len(payload), payload)
        self._out += b"".join(b"PUB " + subject.encode() + tail for subject in subjects)

    def flush(self) -> None:
        """Send everything queued, waiting up to FLUSH_TIMEOUT_S for the socket to take it."""
        deadline = time.monotonic() + FLUSH_TIMEOUT_S
        while self._out:
            if self._sock is None:
                raise ConnectionLost("not connected")
            self._send()
            if not self._out:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._lost(f"could not send {len(self._out)} bytes in time")
            select.select([], [self._sock], [], remaining)

    def poll(self, timeout_s: float) -> list[NatsMessage]:
        """Run the network for up to ``timeout_s`` (returning early once messages arrive):
        send what is queued, read, answer PINGs, keep the connection alive. Raises
        ConnectionLost when the connection is gone."""
        if self._ready:
            self._pump(0.0)
        else:
            self._pump(timeout_s)
        messages = list(self._ready)
        self._ready.clear()
        return messages

    def request(self, subject: str, payload: bytes, timeout_s: float) -> NatsMessage:
        """Publish ``payload`` with a reply subject of this client's inbox and wait for the
        answer (a 503 status when nothing serves ``subject``). Raises TimeoutError."""
        if not self._inbox:
            self._inbox = new_inbox_prefix(self._user)
            self._inbox_sid = self.subscribe(f"{self._inbox}.*")
        self._request_id += 1
        reply = f"{self._inbox}.{self._request_id}"
        self.publish(subject, payload, reply=reply)
        deadline = time.monotonic() + timeout_s
        before = len(self._ready)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no answer on {subject} within {timeout_s:g} s")
            self._pump(remaining)
            for index in range(before, len(self._ready)):
                message = self._ready[index]
                if message.subject == reply:
                    del self._ready[index]
                    return message
            before = len(self._ready)

    # -- network ----------------------------------------------------------------------------

    def _pump(self, timeout_s: float) -> None:
        """One round: send, wait up to ``timeout_s`` for input, read and parse it."""
        sock = self._sock
        if sock is None:
            raise ConnectionLost("not connected")
        now = time.monotonic()
        if now - self._last_in >= PING_INTERVAL_S * (self._pings_out + 1):
            if self._pings_out >= MAX_PINGS_OUT:
                raise self._lost(f"{MAX_PINGS_OUT} PINGs unanswered")
            self._pings_out += 1
            self._out += b"PING\r\n"
        self._send()
        buffered = isinstance(sock, ssl.SSLSocket) and sock.pending() > 0
        if not buffered:
            readable, _, _ = select.select(
                [sock], [sock] if self._out else [], [], max(0.0, timeout_s)
            )
            if not readable:
                self._send()
                return
        try:
            self._read(sock)
        except _Lost as exc:
            raise self._lost(str(exc)) from None
        self._send()

    def _send(self) -> None:
        if not self._out or self._sock is None:
            return
        try:
            sent = self._sock.send(self._out)
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            return
        except OSError as exc:
            raise self._lost(f"write failed: {exc}") from None
        del self._out[:sent]

    def _read(self, sock: socket.socket) -> None:
        size = 0
        while size < READ_SIZE:
            try:
                data = sock.recv(READ_SIZE - size)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                break
            except OSError as exc:
                raise _Lost(f"read failed: {exc}") from None
            if not data:
                if size:
                    break  # parse what came; the next read finds the end again
                raise _Lost("the server closed the connection")
            self._in += data
            size += len(data)
            if not isinstance(sock, ssl.SSLSocket):
                # One recv takes what the kernel holds; an SSL recv returns one TLS record
                # (16 KiB at most) and is repeated until it would block.
                break
        if size:
            self._last_in = time.monotonic()
            self._pings_out = 0
            self._parse()

    def _parse(self) -> None:
        """Handle every complete protocol message in the input buffer and drop it from there."""
        buf = self._in
        size = len(buf)
        pos = 0
        ready = self._ready
        try:
            while pos < size:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    if size - pos > MAX_CONTROL_LINE_BYTES:
                        raise _Lost("a control line over the limit")
                    break
                first = buf[pos]
                if first == MSG_FIRST and buf[pos + 3] == SPACE:  # "MSG "
                    args = buf[pos + 4 : eol].split()
                    end = eol + 2 + int(args[-1])
                    if end + 2 > size:
                        break
                    ready.append(
                        NatsMessage(
                            args[0].decode(),
                            args[2].decode() if len(args) == 4 else "",
                            {},
                            None,
                            bytes(buf[eol + 2 : end]),
                        )
                    )
                    pos = end + 2
                elif buf[pos : pos + 4] == b"HMSG":
                    args = buf[pos + 5 : eol].split()
                    head_length = int(args[-2])
                    total = int(args[-1])
                    end = eol + 2 + total
                    if end + 2 > size:
                        break
                    reply = args[2].decode() if len(args) == 5 else ""
                    start = eol + 2
                    status, headers = decode_headers(bytes(buf[start : start + head_length]))
                    ready.append(
                        NatsMessage(
                            args[0].decode(),
                            reply,
                            headers,
                            status,
                            bytes(buf[start + head_length : end]),
                        )
                    )
                    pos = end + 2
                else:
                    self._control(bytes(buf[pos:eol]))
                    pos = eol + 2
        except (ValueError, IndexError, NatsError) as exc:
            raise _Lost(f"protocol error: {exc}") from None
        finally:
            del buf[:pos]

    def _control(self, line: bytes) -> None:
        if line == b"PING":
            self._out += b"PONG\r\n"
        elif line == b"PONG":
            self._pongs += 1
        elif line.startswith(b"-ERR"):
            error = line[4:].strip().strip(b"'").decode("utf-8", "replace")
            self.last_error = error
            if error.lower().startswith(NON_FATAL_ERRORS):
                log.warning("NATS at %s: %s", self.server or "?", error)
                return
            raise _Lost(f"the server said: {error}")
        elif line.startswith(b"INFO "):
            info = json.loads(line[5:])
            self.info.update(info)
            if info.get("ldm"):
                log.info("NATS at %s is entering lame duck mode", self.server)
        elif line == b"+OK":
            return
        else:
            raise _Lost(f"unknown protocol line {line[:40]!r}")


def _sub_line(subject: str, queue: str, sid: int) -> bytes:
    if queue:
        return b"SUB %s %s %d\r\n" % (subject.encode(), queue.encode(), sid)
    return b"SUB %s %d\r\n" % (subject.encode(), sid)


def _why(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"the server's certificate did not verify: {exc.verify_message}"
    return str(exc) or type(exc).__name__
