"""A backend worker's connection to the broker: connect, subscribe, keep alive, reconnect.

The part of :class:`services.common.subscriber.Subscriber` that is about the connection
rather than the messages on it (those are subscriber.py's).

* MQTT 5 with clean start off and a long session expiry: while a worker is down the broker
  keeps its subscriptions and queues its share of the messages, and redelivers every QoS 1
  message the worker received but did not acknowledge.
* A shared subscription (``$share/<group>/...``): the broker deals messages round-robin to
  the workers of the group. Mosquitto keeps dealing to a member that is offline (its
  session queues them), so a worker that dies must be restarted under the same client id.
* A subscription is whole or the connection is not kept: a SUBACK that refuses a filter
  (reason 0x80 or above), grants it QoS 0 instead of 1, or does not carry exactly one reason
  code per filter is logged, counted, answered with a DISCONNECT and retried with backoff; a
  worker that went on would store nothing, or lose messages at QoS 0, without a sign.
* A lost session is visible: a CONNACK with Session Present 0 after this process has
  connected before means the broker dropped the session and the messages it queued for it
  (a broker restart without persistence, an expiry, an administrator). It is logged and
  counted. The first connection of a process cannot tell a lost session from one that never
  existed, and is not counted.
* TLS when the config carries a context (``SubscriberConfig.tls``, from the service's
  ``mqtt_tls_context()``): the handshake runs blocking, bounded by ``CONNECT_TIMEOUT_S``,
  right after the TCP connection, verifying the broker's certificate and its host name
  (``server_name`` = ``host``); the socket is non-blocking after it. A broker that fails
  verification is logged with OpenSSL's reason and retried with backoff like one that
  refuses the connection: a certificate rotated on the broker before its CA reached the
  workers must not need a worker restart once the CA arrives.
* Reconnect delays grow from ``RECONNECT_MIN_DELAY_S`` to ``RECONNECT_MAX_DELAY_S`` and are
  jittered, so workers that lost the broker together do not return in one burst. The delay
  is reset once a connection is subscribed, not merely accepted.

Packets are built and read by :mod:`services.common.mqtt5`.
"""

import logging
import random
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from services.common import mqtt5
from services.common.mqtt5 import PacketType, ProtocolViolation

# The subscriber's logger: one name for everything a worker's MQTT session says.
log = logging.getLogger("services.common.subscriber")

# Long enough that a worker which stops reading while the database is down (and so does not
# see PINGRESP) rides out a short outage without reconnecting.
KEEPALIVE_S: Final = 60
CONNECT_TIMEOUT_S: Final = 5.0
RECONNECT_MIN_DELAY_S: Final = 0.2
RECONNECT_MAX_DELAY_S: Final = 10.0
# The share of each reconnect delay taken off at random (a fraction of the delay): at 0.5,
# "equal jitter", a delay d becomes a uniform draw from (d/2, d]. Workers that lost the
# broker together (a broker restart) then come back spread out, not as one burst of
# CONNECTs and session resumptions, and none waits less than half its backoff.
RECONNECT_JITTER_FRACTION: Final = 0.5
READ_SIZE: Final = 256 * 1024
# Sent as Maximum Packet Size in CONNECT: the broker must not send a larger packet; it
# discards it instead (3.1.2.11.4), and one that arrives anyway closes the connection with
# reason 0x95. Twice READ_SIZE, which is also the largest packet the broker takes from a
# device (deploy/stack/mosquitto.py MAX_PACKET_BYTES): a packet the broker accepted grows
# by a packet id and its properties on the way to a worker, and must still reach it, or
# ingest would lose, unseen, an oversized payload it keeps as a dead letter. Above READ_SIZE,
# a packet over it can never arrive whole in one read (see Subscriber._parse).
MAXIMUM_PACKET_SIZE_BYTES: Final = 2 * READ_SIZE
SUBSCRIBE_PACKET_ID: Final = 1


class ConnectionLost(Exception):
    """The connection cannot go on; the message says why.

    ``reason`` is the code of the DISCONNECT to send before closing, None when none is sent:
    the connection is gone, or the broker ended it (3.14.4).
    """

    def __init__(self, why: str, reason: int | None = None) -> None:
        super().__init__(why)
        self.reason = reason


def jittered(delay_s: float, draw: float) -> float:
    """``delay_s`` less up to RECONNECT_JITTER_FRACTION of it; ``draw`` is uniform in [0, 1)."""
    return delay_s * (1.0 - RECONNECT_JITTER_FRACTION * draw)


def tls_failure(exc: ssl.SSLError) -> str:
    """Why a TLS handshake failed, in words: for a refused certificate, OpenSSL's reason
    (an unknown issuer, a host name mismatch, an expired or revoked certificate)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"the broker's certificate did not verify: {exc.verify_message}"
    return str(exc)


@dataclass(frozen=True)
class SubscriberConfig:
    """Where to connect and how to subscribe."""

    host: str
    port: int
    username: str
    password: str
    client_id: str
    topic_filters: tuple[str, ...]
    receive_maximum: int
    session_expiry_s: int
    # TLS with verification on when set; None only for a plaintext listener (development).
    tls: ssl.SSLContext | None


@dataclass
class SubscriberStats:
    """Running totals since the Subscriber was made. Each service's metrics exporter turns
    their increase since it last looked into Prometheus counters."""

    reconnects: int = 0  # connections accepted after the first
    subscribe_failures: int = 0  # SUBACKs refusing, downgrading or miscounting the filters
    sessions_lost: int = 0  # reconnections on which the broker had no session for us
    publishes_dropped: int = 0  # QoS 0 publishes asked for while not connected
    publishes_too_large: int = 0  # QoS 0 publishes over the broker's Maximum Packet Size


class BrokerSession:
    """One worker's connection to the broker and the state of its MQTT session.

    Counts what it has been sent and not acknowledged (``unacked``) per connection: a
    reconnection starts again from 0, since the broker redelivers on the new one.
    """

    def __init__(
        self, config: SubscriberConfig, *, draw: Callable[[], float] = random.random
    ) -> None:
        """``draw`` gives the uniform [0, 1) numbers that jitter reconnect delays."""
        self.config = config
        self.unacked = 0
        self.stats = SubscriberStats()
        self.connected = False  # connected and subscribed
        self._draw = draw
        self._generation = 0
        self._ever_connected = False  # a CONNACK accepted us before, in this process
        self._next_attempt = 0.0
        self._delay = RECONNECT_MIN_DELAY_S
        self._broker_maximum_packet_size = mqtt5.MAX_PACKET_SIZE
        self._sock: socket.socket | None = None
        self._in = bytearray()
        self._out = bytearray()
        self._connacked = False
        self._keepalive_s: float = KEEPALIVE_S
        self._opened_at = 0.0
        self._last_in = 0.0
        self._last_out = 0.0
        self._ping_sent_at = 0.0  # 0 when no PINGREQ is waiting for its PINGRESP

    def _writing(self) -> socket.socket | None:
        """Send what is queued and keep the connection alive; the socket, if still open."""
        now = time.monotonic()
        if not self._connacked:
            if now - self._opened_at > CONNECT_TIMEOUT_S:
                self._close(f"no CONNACK within {CONNECT_TIMEOUT_S:g} s")
        elif self._ping_sent_at:
            if now - self._ping_sent_at >= self._keepalive_s:
                self._close(f"no PINGRESP within {self._keepalive_s:g} s")
        elif now - min(self._last_in, self._last_out) >= self._keepalive_s:
            self._ping_sent_at = now
            self._queue(mqtt5.PINGREQ)
        self._flush()
        return self._sock

    def _try_connect(self) -> bool:
        now = time.monotonic()
        if now < self._next_attempt:
            return False
        address = (self.config.host, self.config.port)
        try:
            sock = self._open(address)
        except ssl.SSLError as exc:
            delay = self._retry_later()
            # The reason is the message; a traceback on every retry would add nothing.
            log.error(  # noqa: TRY400
                "TLS with the broker at %s:%d failed: %s; trying again in %.2f s",
                *address,
                tls_failure(exc),
                delay,
            )
            return False
        except OSError as exc:
            delay = self._retry_later()
            log.warning(
                "cannot reach the broker at %s:%d: %s; trying again in %.2f s",
                *address,
                exc,
                delay,
            )
            return False
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        # Messages of the previous connection will be redelivered on this one; their old
        # packet ids must not be acknowledged here, where they may name other messages.
        self._generation += 1
        self.unacked = 0
        self._sock = sock
        self._in.clear()
        self._out.clear()
        self._connacked = False
        self._keepalive_s = KEEPALIVE_S  # until this connection's CONNACK says otherwise
        self._broker_maximum_packet_size = mqtt5.MAX_PACKET_SIZE  # likewise
        self._ping_sent_at = 0.0
        self._opened_at = self._last_in = now
        self._queue(
            mqtt5.connect(
                self.config.client_id,
                self.config.username,
                self.config.password,
                keepalive_s=KEEPALIVE_S,
                session_expiry_s=self.config.session_expiry_s,
                receive_maximum=self.config.receive_maximum,
                maximum_packet_size=MAXIMUM_PACKET_SIZE_BYTES,
            )
        )
        return True

    def _open(self, address: tuple[str, int]) -> socket.socket:
        """A TCP connection to ``address``, TLS-wrapped and handshaken when configured."""
        sock = socket.create_connection(address, timeout=CONNECT_TIMEOUT_S)
        context = self.config.tls
        if context is None:
            return sock
        try:
            # The handshake runs in wrap_socket, under the connection's timeout (per read or
            # write, as socket timeouts are), before the socket turns non-blocking.
            return context.wrap_socket(sock, server_hostname=address[0])
        except BaseException:
            sock.close()
            raise

    def _retry_later(self) -> float:
        """Schedule the next connection attempt after a jittered, growing delay; the delay."""
        delay = jittered(self._delay, self._draw())
        self._next_attempt = time.monotonic() + delay
        self._delay = min(self._delay * 2, RECONNECT_MAX_DELAY_S)
        return delay

    def _guarded(self, step: Callable[[], None]) -> None:
        try:
            step()
        except ProtocolViolation as exc:
            self._close(f"protocol violation: {exc}", exc.reason)
        except ConnectionLost as exc:
            self._close(str(exc), exc.reason)

    def _control(self, kind: int, body: bytes) -> None:
        if not self._connacked and kind != PacketType.CONNACK:
            raise ProtocolViolation(f"packet type {kind} before CONNACK", mqtt5.PROTOCOL_ERROR)
        if kind == PacketType.CONNACK:
            self._on_connack(mqtt5.read_connack(body))
        elif kind == PacketType.SUBACK:
            self._on_suback(mqtt5.read_suback(body))
        elif kind == PacketType.PINGRESP:
            self._ping_sent_at = 0.0
        elif kind == PacketType.DISCONNECT:
            reason, properties = mqtt5.read_disconnect(body)
            said = properties.reason_string()
            raise ConnectionLost(
                f"the broker disconnected: {mqtt5.reason_name(reason)}"
                + (f": {said}" if said else "")
            )
        else:
            raise ProtocolViolation(f"unexpected packet type {kind}", mqtt5.PROTOCOL_ERROR)

    def _on_connack(self, ack: mqtt5.ConnAck) -> None:
        if self._connacked:
            raise ProtocolViolation("a second CONNACK", mqtt5.PROTOCOL_ERROR)  # 3.2
        if ack.reason >= 0x80:
            said = ack.properties.reason_string()
            log.error(
                "broker refused the connection: %s%s",
                mqtt5.reason_name(ack.reason),
                f": {said}" if said else "",
            )
            raise ConnectionLost("connection refused")  # the broker closes it (3.2.2.2)
        maximum = ack.properties.values.get(mqtt5.MAXIMUM_PACKET_SIZE)
        if maximum == 0:
            raise ProtocolViolation("Maximum Packet Size 0", mqtt5.PROTOCOL_ERROR)  # 3.2.2.3.6
        if isinstance(maximum, int):
            self._broker_maximum_packet_size = maximum
        self._connacked = True
        keepalive = ack.properties.values.get(mqtt5.SERVER_KEEP_ALIVE)
        if isinstance(keepalive, int) and keepalive > 0:
            self._keepalive_s = keepalive  # the broker's word overrides ours (3.2.2.3.14)
        if self._ever_connected:
            self.stats.reconnects += 1
            if not ack.session_present:
                # Clean start was off and the session outlives a disconnect by its expiry
                # (3.1.2.4, 3.1.2.11.2): without it, what the broker queued for us is gone.
                self.stats.sessions_lost += 1
                log.warning(
                    "the broker had no session for %s (Session Present 0 on a reconnection):"
                    " the messages it held for this worker are lost",
                    self.config.client_id,
                )
        self._ever_connected = True
        log.info(
            "connected to %s:%d as %s (session present: %s)",
            self.config.host,
            self.config.port,
            self.config.client_id,
            ack.session_present,
        )
        # MQTT 5 says shared subscriptions get no retained messages; Mosquitto 2.0 sends them
        # anyway, so on every (re)subscribe the worker would be handed the whole fleet's
        # retained state and presence again. Ingest has already seen them live: say so.
        options = mqtt5.QOS_1 | mqtt5.RETAIN_DO_NOT_SEND
        self._queue(mqtt5.subscribe(SUBSCRIBE_PACKET_ID, self.config.topic_filters, options))

    def _on_suback(self, ack: mqtt5.SubAck) -> None:
        if ack.packet_id != SUBSCRIBE_PACKET_ID:
            raise ProtocolViolation(
                f"SUBACK for packet id {ack.packet_id}, never used", mqtt5.PROTOCOL_ERROR
            )
        filters = self.config.topic_filters
        said = ack.properties.reason_string()
        because = f": {said}" if said else ""
        if len(ack.reasons) != len(filters):
            self.stats.subscribe_failures += 1
            log.error(
                "broker answered the subscription to %s with %d reason codes (%s)%s",
                ", ".join(filters),
                len(ack.reasons),
                ", ".join(map(mqtt5.suback_reason_name, ack.reasons)),
                because,
            )
            # One reason code per filter, in order (3.9.3); anything else is a protocol error.
            raise ProtocolViolation(
                f"SUBACK with {len(ack.reasons)} reason codes for {len(filters)} filters",
                mqtt5.PROTOCOL_ERROR,
            )
        # Anything but QoS 1 fails: 0x80 and above refuse the filter (nothing would arrive),
        # QoS 0 would have the broker deliver at most once, never redelivering a message the
        # worker received but did not store.
        failed = [
            (f, r) for f, r in zip(filters, ack.reasons, strict=True) if r != mqtt5.GRANTED_QOS_1
        ]
        if failed:
            self.stats.subscribe_failures += 1
            for topic_filter, reason in failed:
                log.error(
                    "broker refused or downgraded the subscription to %s: %s%s",
                    topic_filter,
                    mqtt5.suback_reason_name(reason),
                    because,
                )
            # A valid packet this client does not accept (2.4, reason code 0x83). The session
            # and what it holds stay on the broker; the next connection subscribes again.
            raise ConnectionLost("subscription refused", mqtt5.IMPLEMENTATION_SPECIFIC_ERROR)
        # Reset only now: a broker that accepts connections and refuses the subscription is
        # asked again after a growing delay, not every RECONNECT_MIN_DELAY_S.
        self._delay = RECONNECT_MIN_DELAY_S
        self.connected = True
        log.info("subscribed to %s", ", ".join(filters))

    def _queue(self, packet: bytes) -> None:
        self._out += packet
        self._last_out = time.monotonic()

    def _flush(self) -> None:
        if not self._out or self._sock is None:
            return
        try:
            # On a TLS socket a write that cannot finish raises SSLWantWriteError (or
            # SSLWantReadError), OSErrors but not BlockingIOError; OpenSSL retries it with the
            # same leading bytes, which _out keeps (only appended to) until a send succeeds.
            sent = self._sock.send(self._out)
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            return
        except OSError as exc:
            self._close(f"write failed: {exc}")
            return
        del self._out[:sent]

    def _close(self, why: str, reason: int | None = None) -> None:
        """Close the connection (with a DISCONNECT when ``reason`` is given) and schedule the
        next attempt."""
        sock = self._sock
        if sock is not None:
            if reason is not None:
                # Say why before closing (4.13.1): one write, as far as the socket takes it at
                # once, of what is queued (acknowledgements, valid on this connection) and the
                # DISCONNECT, after which nothing more may be sent (3.14.4).
                self._queue(mqtt5.disconnect(reason))
                try:
                    sock.send(self._out)
                except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                    log.info("could not send the DISCONNECT: the socket is full")
                except OSError as exc:
                    log.info("could not send the DISCONNECT: %s", exc)
            sock.close()
            self._sock = None
        delay = self._retry_later()
        if self.connected:
            log.warning("disconnected from the broker: %s; reconnecting in %.2f s", why, delay)
        else:
            log.info("connection to the broker closed: %s; trying again in %.2f s", why, delay)
        self.connected = False
        self._connacked = False
        self._in.clear()
        self._out.clear()

    def close(self) -> None:
        """Send what is queued and disconnect; the session (and anything unacknowledged)
        stays on the broker."""
        sock = self._sock
        if sock is None:
            return
        if self._connacked:
            self._queue(mqtt5.disconnect(mqtt5.NORMAL_DISCONNECTION))
            try:
                # Blocking with a timeout: Python's ssl waits out "want read/write" itself.
                sock.settimeout(1.0)
                sock.sendall(self._out)
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
                log.warning("could not say goodbye to the broker: the socket is full")
            except OSError as exc:
                log.warning("could not say goodbye to the broker: %s", exc)
        self._out.clear()
        sock.close()
        self._sock = None
        self.connected = False
        self._connacked = False
        log.info("disconnected from the broker")
