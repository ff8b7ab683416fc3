"""One device's MQTT connection (5, or 3.1.1), run on an asyncio loop without a thread of its own.

paho-mqtt's client is driven through its external-loop hooks (``on_socket_open`` and
friends, as in paho's ``loop_asyncio`` example), so one process can hold thousands of
devices' connections without a thread each.

:class:`Connection` keeps the connection up until it is stopped: each attempt uses a fresh paho
client with a clean start, and a lost or refused connection is tried again after a backoff with
full jitter. On every connection it subscribes to its filters and says it is online on the
retained ``presence`` topic, whose last will says it is not. What travels over the connection
is its owner's business, the :class:`~device_agent.link.Link`'s: the connection hands it the
paho client once connected, the PUBACKs and the messages, and tells it when a connection's
state is to be forgotten.

A filter the SUBACK refuses is logged, counted, and subscribed again on the same connection
after a backoff (doubling, with full jitter, up to the reconnect backoff's ceiling). A refusal
may be for good (an ACL without the line) or for a while: NATS's MQTT gateway makes a
JetStream consumer for each QoS 1 filter and refuses the filter when JetStream does not answer
within its 4 s, as while a stream's leader is elected after a node stops. Without the retry a
device refused its ``ack`` then stayed connected and deaf: nothing left its outbox until the
connection happened to end.

With a CA file the connection is TLS; with the device's certificate too it is mutual TLS, for
the broker's certificate listener, which takes the username from the certificate's CN (so no
password is sent; the client id stays the device id). A handshake either side refuses (the
broker's certificate not from the CA, the device's revoked or expired) is logged with the
reason TLS gave, and tried again after the same backoff as any refused connection.

A broker address may name several nodes of a cluster: each new attempt after a failed or lost
connection goes to the next node in the list (after the same backoff), so a device whose node
dies comes back on another. The protocol is MQTT 5 by default, or MQTT 3.1.1 (protocol level
4) for a broker that speaks only 3.1.1, as NATS's MQTT gateway does: the same clean session,
will, subscriptions and QoS 1, without reason codes or properties.
"""

import asyncio
import json
import logging
import random
import ssl
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from device_agent.protocol import PROTOCOL_VERSION, Channel, topic
from device_agent.tls import client_context

# The link's logger, so that a filter on galvani.agent.link sees all of the link.
log = logging.getLogger("galvani.agent.link")

KEEPALIVE_S: Final = 60
# With a cluster's other nodes to go to, how long an attempt waits for its CONNACK before it
# tries the next node: a node stopped (SIGSTOP) or wedged still completes the TCP handshake in
# its kernel and then answers nothing, and paho would wait out the keepalive (60 s). With one
# node there is nowhere else to go, and an attempt waits as long as paho does.
CONNECT_TIMEOUT_S: Final = 5.0
BACKOFF_MIN_S: Final = 1.0
BACKOFF_MAX_S: Final = 60.0
# The backoff starts again from BACKOFF_MIN_S only after a connection has lasted this long
# (as the AWS IoT device SDKs' minimum connection time does): a broker that accepts a device
# and then ends its session at once, as a flood ban of a certificate device does, meets a
# growing backoff instead of a reconnect a second.
STABLE_CONNECTION_S: Final = 20.0
# The first wait before a refused filter is subscribed again (then doubling, with full jitter).
SUBSCRIBE_RETRY_MIN_S: Final = 2.0

# The CONNECT's protocol level (MQTT 3.1.1 section 3.1.2.2, MQTT 5.0 section 3.1.2.2).
MQTT_5: Final = 5
MQTT_311: Final = 4
PROTOCOLS: Final = {MQTT_5: MQTTProtocolVersion.MQTTv5, MQTT_311: MQTTProtocolVersion.MQTTv311}

# paho's callbacks (CallbackAPIVersion.VERSION2) for a PUBACK and for a message.
OnPublish = Callable[[mqtt.Client, Any, int, ReasonCode, Properties | None], None]
OnMessage = Callable[[mqtt.Client, Any, mqtt.MQTTMessage], None]


@dataclass(frozen=True)
class BrokerAddress:
    """Where and how a device connects. Username and client id are the device id.

    ``host``/``port`` is the node tried first; ``fallbacks`` are the cluster's other nodes,
    tried in turn after a failed or lost connection (with the same credentials and TLS)."""

    host: str
    port: int
    password: str
    ca_file: str | None = None  # TLS (production's 8883) when set
    # The device's own certificate and key, for the certificate listener (mutual TLS); the
    # username is then the certificate's CN and ``password`` is not sent.
    cert_file: str | None = None
    key_file: str | None = None
    # The context built from the three files (device_agent.tls.client_context), when the
    # caller shares one among many connections (a fleet's devices); else the connection
    # builds its own, once.
    tls_context: ssl.SSLContext | None = field(default=None, compare=False, repr=False)
    protocol: int = MQTT_5  # or MQTT_311
    fallbacks: tuple[tuple[str, int], ...] = ()
    # paho closes a connection that has heard nothing for one to two keepalives: what a node
    # that stops answering (SIGSTOP, a partition) costs before the device tries the next one.
    keepalive_s: int = KEEPALIVE_S

    def __post_init__(self) -> None:
        if self.ca_file is None and (self.cert_file or self.key_file or self.tls_context):
            raise ValueError("a device certificate or TLS context needs ca_file (TLS)")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"MQTT protocol level {self.protocol}: 5 (MQTT 5) or 4 (3.1.1)")
        if not 0 < self.keepalive_s <= 0xFFFF:  # two bytes in CONNECT (3.1.2.10 in both)
            raise ValueError(f"keepalive {self.keepalive_s} s: 1 to 65535")

    def nodes(self) -> list[tuple[str, int]]:
        """Every node to connect to, in the order they are tried: the first, then the rest."""
        return [(self.host, self.port), *self.fallbacks]

    def context(self) -> ssl.SSLContext | None:
        """The TLS context to connect with (None: plaintext), built here unless given."""
        if self.ca_file is None:
            return None
        if self.tls_context is not None:
            return self.tls_context
        return client_context(self.ca_file, cert_file=self.cert_file, key_file=self.key_file)


@dataclass(frozen=True)
class Subscription:
    """A filter's QoS, and what its refusal costs (for the log)."""

    qos: int
    refused: str


class ConnectionCounters(Protocol):
    """The counters a connection keeps (the link's :class:`~device_agent.link.LinkStats`)."""

    connects: int
    disconnects: int
    subscribe_refused: int


class Connection:
    """One device's connection to the broker, kept up until :meth:`stop`."""

    def __init__(
        self,
        device_id: str,
        address: BrokerAddress,
        *,
        loop: asyncio.AbstractEventLoop,
        rng: random.Random,
        backoff_max_s: float,
        subscriptions: Mapping[str, Subscription],
        max_inflight: int,
        stats: ConnectionCounters,
        on_connected: Callable[[], None],
        on_forget: Callable[[], None],
        on_publish: OnPublish,
        on_message: OnMessage,
        on_lost: Callable[[], None] = lambda: None,
    ) -> None:
        """``subscriptions`` maps each filter to its QoS and what its refusal costs, for the
        log. ``on_connected`` runs once a connection is up, subscribed and online;
        ``on_forget`` whenever what only meant something on a connection is to be forgotten
        (it ended, or a new attempt starts); ``on_lost`` just before, when an accepted
        connection ended without :meth:`stop` (the broker or the network ended it)."""
        self.device_id = device_id
        self.address = address
        self.loop = loop
        self.rng = rng
        self.backoff_max_s = backoff_max_s
        self.subscriptions = subscriptions
        self.max_inflight = max_inflight
        self.stats = stats
        self.on_connected = on_connected
        self.on_forget = on_forget
        self.on_publish = on_publish
        self.on_message = on_message
        self.on_lost = on_lost
        self.connected = False
        self.client: mqtt.Client | None = None  # from the attempt on, until it is dropped
        self._attempt = 0  # reconnects since the last stable connection
        self._connected_at = 0.0  # loop time of the current connection's CONNACK
        self._attempted_at = 0.0  # loop time of the current attempt's CONNECT
        self._nodes = address.nodes()
        self._node = 0  # index in _nodes of the node this (or the next) attempt goes to
        self._retry: asyncio.TimerHandle | None = None
        self._opening: mqtt.Client | None = None  # whose connect runs on a thread
        self._stopping = False
        self._subscribing: dict[int, list[str]] = {}  # SUBSCRIBE mid -> its filters
        # Filters refused on this connection, to subscribe again when the timer fires.
        self._refused: set[str] = set()
        self._resubscribe: asyncio.TimerHandle | None = None
        self._resubscribes = 0  # on this connection, for the backoff
        self._presence_topic = topic(device_id, Channel.PRESENCE)
        # Built here, once: every attempt's client shares it, and a file that cannot be read
        # fails now rather than on each attempt.
        self._tls = address.context()
        # What paho last reported as an error on this attempt's socket: a TLS 1.3 client
        # learns that the broker refused its certificate only when it next reads, inside
        # paho's loop_read, which logs the alert and reports a lost connection.
        self._socket_error: str | None = None

    def start(self) -> None:
        """Connect now (and keep reconnecting until :meth:`stop`)."""
        self._stopping = False
        self._connect()

    def stop(self) -> None:
        """Say offline, disconnect, and stop reconnecting."""
        self._stopping = True
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        client = self.client
        if client is not None and self.connected:
            client.publish(self._presence_topic, _presence(False), qos=1, retain=True)
            client.disconnect()
        elif client is not None:
            self._drop_client()

    def _connect(self) -> None:
        self._retry = None
        if self._stopping:
            return
        mqtt_311 = self.address.protocol == MQTT_311
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.device_id,
            protocol=PROTOCOLS[self.address.protocol],
            # 3.1.1's clean session (section 3.1.2.4); MQTT 5 says it with clean_start below.
            clean_session=True if mqtt_311 else None,
        )
        if self.address.cert_file is None:
            client.username_pw_set(self.device_id, self.address.password)
        if self._tls is not None:
            client.tls_set_context(self._tls)
            client.on_log = self._on_log  # until the CONNACK: see _socket_error
        client.will_set(self._presence_topic, _presence(False, with_ts=False), qos=1, retain=True)
        client.max_inflight_messages_set(self.max_inflight)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self.on_publish
        client.on_message = self.on_message
        client.on_subscribe = self._on_subscribe
        self.client = client
        self._socket_error = None
        self._forget_connection()
        host, port = self._nodes[self._node]
        self._attempted_at = self.loop.time()
        self._opening = client
        # paho's connect is a blocking TCP connect and TLS handshake (bounded by its 5 s
        # connect timeout). Run on the loop, a node that is stopped (SIGSTOP) or wedged, whose
        # kernel still completes the TCP handshake and which then answers nothing, held the
        # loop, and with it every other device of a fleet, for the whole 5 s of each attempt.
        # So it runs on a thread, and the socket joins the loop once it is open.
        opening = self.loop.run_in_executor(_opener(), self._open, client, host, port, mqtt_311)
        opening.add_done_callback(lambda done: self._opened(client, host, port, done))

    def _open(self, client: mqtt.Client, host: str, port: int, mqtt_311: bool) -> None:
        """On a thread: paho's connect, with no socket callback set (they touch the loop)."""
        if mqtt_311:
            client.connect(host, port, keepalive=self.address.keepalive_s)
        else:
            client.connect(host, port, keepalive=self.address.keepalive_s, clean_start=True)

    def _opened(
        self, client: mqtt.Client, host: str, port: int, done: "asyncio.Future[None]"
    ) -> None:
        """On the loop: the socket of ``client`` is open (or the attempt failed)."""
        if self._opening is client:
            self._opening = None
        exc = done.exception()
        if self.client is not client:  # dropped meanwhile (stopped)
            if exc is None:
                client.disconnect()  # closes the socket
            return
        if isinstance(exc, ssl.SSLError):
            log.warning(
                "%s: TLS handshake failed: %s (%s:%d)",
                self.device_id,
                _tls_reason(exc),
                host,
                port,
            )
        elif exc is not None:
            log.debug("%s: connect to %s:%d failed: %s", self.device_id, host, port, exc)
        sock = client.socket()
        if exc is not None or sock is None:
            self._drop_client()
            self._schedule_reconnect()
            return
        self._attempted_at = self.loop.time()  # the CONNACK's wait starts now
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        self._on_socket_open(client, None, sock)
        if client.want_write():  # the CONNECT, if the thread could not write all of it
            self.loop.add_writer(sock, client.loop_write)

    def service(self) -> None:
        """paho's timers (keepalive, retries), and the CONNACK timeout: call at least once a
        second."""
        client = self.client
        if client is None or client is self._opening:
            return
        client.loop_misc()
        if (
            not self.connected
            and self.client is client
            and len(self._nodes) > 1
            and self.loop.time() - self._attempted_at > CONNECT_TIMEOUT_S
        ):
            log.warning(
                "%s: no CONNACK from %s:%d in %.0f s: trying the next node",
                self.device_id,
                *self.node,
                CONNECT_TIMEOUT_S,
            )
            self._drop_client()
            self._schedule_reconnect()

    @property
    def node(self) -> tuple[str, int]:
        """The node the current connection (or the next attempt) is with."""
        return self._nodes[self._node]

    def _schedule_reconnect(self) -> None:
        if self._stopping or self._retry is not None:
            return
        # The next attempt goes to the next node: the one that failed or dropped the device
        # may be down, and the cluster's other nodes serve the device as well.
        self._node = (self._node + 1) % len(self._nodes)
        # Full jitter: a fleet that lost its broker together does not return together.
        ceiling = min(self.backoff_max_s, BACKOFF_MIN_S * 2**self._attempt)
        self._attempt = min(self._attempt + 1, 30)
        self._retry = self.loop.call_later(self.rng.uniform(0, ceiling), self._connect)

    def _drop_client(self) -> None:
        client = self.client
        self.client = None
        self._forget_connection()
        if client is not None and client is self._opening:
            return  # still opening on its thread: closed when it is done (see _opened)
        if client is not None:
            sock = client.socket()
            if sock is not None:
                self._forget_socket(sock)
            client.on_socket_close = None
            client.on_disconnect = None
            client.disconnect()  # closes the socket if paho still holds one

    def _forget_connection(self) -> None:
        self.connected = False
        self._subscribing.clear()
        self._refused.clear()
        if self._resubscribe is not None:
            self._resubscribe.cancel()
            self._resubscribe = None
        self._resubscribes = 0
        self.on_forget()

    # -- paho callbacks ------------------------------------------------------------------

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            log.warning("%s: broker refused the connection: %s", self.device_id, reason)
            return  # paho closes the socket; on_disconnect schedules the retry
        client.on_log = None  # paho formats every packet's log line for it
        log.debug("%s: connected to %s:%d", self.device_id, *self.node)
        self.connected = True
        self._connected_at = self.loop.time()
        self.stats.connects += 1
        # Subscribed before anything is published on this connection: the broker handles a
        # client's packets in order, so no ack for this connection's messages is missed.
        self._subscribe(client, list(self.subscriptions))
        client.publish(self._presence_topic, _presence(True), qos=1, retain=True)
        self.on_connected()

    def _subscribe(self, client: mqtt.Client, filters: list[str]) -> None:
        _, mid = client.subscribe([(name, self.subscriptions[name].qos) for name in filters])
        if mid is not None:
            self._subscribing[mid] = filters

    def _subscribe_again(self) -> None:
        self._resubscribe = None
        client = self.client
        if client is None or not self.connected or not self._refused:
            return
        filters = sorted(self._refused)
        self._refused.clear()
        log.info("%s: subscribing again to %s", self.device_id, ", ".join(filters))
        self._subscribe(client, filters)

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if client is not self.client:
            return
        if self.connected:
            self.stats.disconnects += 1
            if self.loop.time() - self._connected_at >= STABLE_CONNECTION_S:
                self._attempt = 0
            log.info("%s: disconnected from %s:%d (%s)", self.device_id, *self.node, reason)
            if not self._stopping:
                self.on_lost()
        elif self._socket_error is not None:
            log.warning(
                "%s: the connection closed before the broker accepted it: %s",
                self.device_id,
                self._socket_error,
            )
        self.client = None
        self._forget_connection()
        self._schedule_reconnect()

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        if client is not self.client:
            return
        filters = self._subscribing.pop(mid, [])
        for name, reason in zip(filters, reasons, strict=False):
            if not reason.is_failure:
                continue
            self.stats.subscribe_refused += 1
            self._refused.add(name)
            log.error(
                "%s: the broker refused the subscription to %s (%s): %s",
                self.device_id,
                name,
                reason,
                self.subscriptions[name].refused,
            )
        if self._refused and self._resubscribe is None:
            ceiling = min(self.backoff_max_s, SUBSCRIBE_RETRY_MIN_S * 2**self._resubscribes)
            self._resubscribes = min(self._resubscribes + 1, 30)
            delay = self.rng.uniform(SUBSCRIBE_RETRY_MIN_S / 2, ceiling)
            log.warning("%s: subscribing again in %.1f s", self.device_id, delay)
            self._resubscribe = self.loop.call_later(delay, self._subscribe_again)

    def _on_log(self, client: mqtt.Client, userdata: Any, level: int, message: str) -> None:
        if level == mqtt.MQTT_LOG_ERR and client is self.client:
            self._socket_error = message

    # -- the event loop's side of paho's socket --------------------------------------------

    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self.loop.add_reader(sock, client.loop_read)

    def _on_socket_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._forget_socket(sock)

    def _forget_socket(self, sock: Any) -> None:
        self.loop.remove_reader(sock)
        self.loop.remove_writer(sock)

    def _on_register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self.loop.add_writer(sock, client.loop_write)

    def _on_unregister_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self.loop.remove_writer(sock)


_OPENER: ThreadPoolExecutor | None = None
# Threads for paho's blocking connects (TCP and TLS handshakes), shared by a process's devices:
# a fleet's reconnect storm queues here, and a node that answers nothing holds one thread for
# paho's 5 s connect timeout, not the loop.
OPENER_THREADS: Final = 16


def _opener() -> ThreadPoolExecutor:
    global _OPENER  # one pool per process, made on first use
    if _OPENER is None:
        _OPENER = ThreadPoolExecutor(OPENER_THREADS, thread_name_prefix="mqtt-connect")
    return _OPENER


def _tls_reason(exc: ssl.SSLError) -> str:
    """Why a handshake failed, as a person would look it up: OpenSSL's verification message
    (our side refused the broker's certificate) or the alert the broker sent."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"the broker's certificate: {exc.verify_message}"
    return exc.reason or str(exc)


def _presence(online: bool, *, with_ts: bool = True) -> bytes:
    payload: dict[str, object] = {"v": PROTOCOL_VERSION, "online": online}
    if with_ts:
        payload["ts"] = int(time.time() * 1000)
    return json.dumps(payload, separators=(",", ":")).encode()
