"""One device's MQTT connection, run on an asyncio loop without a thread of its own.

paho-mqtt's client is driven through its external-loop hooks (``on_socket_open`` and
friends, as in paho's ``loop_asyncio`` example), so one process can hold thousands of
devices' connections without a thread each.

The outbox in the :class:`~device_agent.store.DeviceStore` is the only copy of a message until
the backend says it has stored it: a stored-ack on ``galvani/v1/d/{id}/ack`` naming its
``seq``. A PUBACK only says the broker took it, and Mosquitto keeps what it took in memory
(saved every 30 s), so a broker crash or a full queue can still lose it. Each message therefore
goes queued -> delivered (PUBACK 0x00: the publish window moves on, the row stays) -> stored
(the ack deletes the row). ``DeleteOn.PUBACK`` keeps the old contract, delete on PUBACK, for
backends that send no stored-acks.

Each connection attempt uses a fresh paho client with a clean start, and publishes the outbox
from its oldest message, so after an outage or a broker crash everything not yet stored goes
out again in ``seq`` order (the backend stores it once, by ``(device_id, seq)``, and acks it
again). While connected, delivered messages that no stored-ack covers within
:data:`ACK_TIMEOUT_S` are sent again too.
"""

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from device_agent.protocol import PROTOCOL_VERSION, Channel, MalformedAck, parse_ack, topic
from device_agent.store import DeviceStore

log = logging.getLogger("galvani.agent.link")

KEEPALIVE_S: Final = 60
CONNECT_TIMEOUT_S: Final = 5.0
BACKOFF_MIN_S: Final = 1.0
BACKOFF_MAX_S: Final = 60.0
# Messages handed to paho before their PUBACKs: Mosquitto's default max_inflight_messages.
PUBLISH_WINDOW: Final = 20
# Delivered messages with no stored-ack for this long (and no stored-ack at all in that time)
# are sent again; the wait doubles on each resend up to the cap and starts over at the next ack.
ACK_TIMEOUT_S: Final = 30.0
ACK_TIMEOUT_MAX_S: Final = 480.0
# After PUBACK 0x10 or a refusal that may clear, the link waits before it sends from that
# message again: doubling from the minimum to the cap, jittered, reset by the next success.
RETRY_BACKOFF_MIN_S: Final = 1.0
RETRY_BACKOFF_MAX_S: Final = 30.0
# How often a message refused with a code that may or may not clear is sent again before it
# is given up (dropped and reported as a drop).
REFUSED_RETRIES: Final = 5

# PUBACK reason codes, MQTT 5.0 section 3.4.2.1.
NO_MATCHING_SUBSCRIBERS: Final = 0x10
# Refusals that clear by themselves: the broker's quota (a rate or queue limit).
RETRY_ALWAYS: Final = frozenset({0x97})
# Refusals that never clear for this message: not authorized (0x87), topic name invalid
# (0x90), payload format invalid (0x99). Keeping it would block the outbox behind it forever.
GIVE_UP: Final = frozenset({0x87, 0x90, 0x99})
# Any other failure (0x80 unspecified, 0x83 implementation specific, 0x91 packet identifier in
# use, a code newer than this list) may be either: retried REFUSED_RETRIES times, then given up.


class DeleteOn(StrEnum):
    """When a message leaves the outbox."""

    STORED = "stored"  # a stored-ack from the backend covers its seq
    PUBACK = "puback"  # the broker's PUBACK (legacy: for backends that send no stored-acks)


@dataclass(frozen=True)
class BrokerAddress:
    """Where and how a device connects. Username and client id are the device id."""

    host: str
    port: int
    password: str
    ca_file: str | None = None  # TLS (production's 8883) when set


@dataclass
class LinkStats:
    """Counters a fleet or a CLI reports."""

    connects: int = 0
    disconnects: int = 0
    delivered: int = 0  # PUBACK success: the broker took it
    stored: int = 0  # outbox messages deleted by stored-acks
    no_subscribers: int = 0  # PUBACK 0x10 (kept, sent again after a backoff)
    retried: int = 0  # refusals that may clear, sent again after a backoff
    refused: int = 0  # refused for good: given up and counted as an outbox drop
    resends: int = 0  # times delivered messages were sent again for want of a stored-ack
    malformed_acks: int = 0
    last_delivery_s: float | None = None  # time.monotonic() of the last delivery


@dataclass(slots=True)
class _Sent:
    """An outbox message handed to paho on this connection and waiting for its PUBACK."""

    id: int
    seq: int
    stored: bool = False  # a stored-ack covered it before its PUBACK arrived


class Link:
    """The device's connection: reconnects with backoff, publishes the outbox, takes config
    and stored-acks."""

    def __init__(
        self,
        device_id: str,
        address: BrokerAddress,
        store: DeviceStore,
        on_config: Callable[[bytes], None],
        *,
        loop: asyncio.AbstractEventLoop,
        rng: random.Random,
        backoff_max_s: float = BACKOFF_MAX_S,
        delete_on: DeleteOn = DeleteOn.STORED,
    ) -> None:
        self.device_id = device_id
        self.address = address
        self.store = store
        self.on_config = on_config
        self.loop = loop
        self.rng = rng
        self.backoff_max_s = backoff_max_s
        self.delete_on = delete_on
        self.stats = LinkStats()
        self.connected = False
        self._client: mqtt.Client | None = None
        self._attempt = 0
        self._retry: asyncio.TimerHandle | None = None
        self._stopping = False
        self._inflight: dict[int, _Sent] = {}  # paho mid -> outbox message
        self._fed_up_to = 0  # the read cursor: highest outbox id looked at on this connection
        self._sent_up_to = 0  # highest outbox id handed to paho on this connection
        self._looked_at = -1  # store.enqueued when pump last read the outbox
        # Seqs delivered on this connection and not yet acked, with the loop.time() of their
        # PUBACK, oldest delivery first (dicts keep insertion order).
        self._unstored: dict[int, float] = {}
        self._unstored_since = 0.0  # loop.time() since they have waited with no ack arriving
        self._last_ack_at = 0.0  # loop.time() of the last stored-ack
        self._ack_timeout_s = ACK_TIMEOUT_S
        self._held: asyncio.TimerHandle | None = None  # no publishing until it fires
        self._resend_from: int | None = None  # the oldest outbox id to send again after it
        self._hold_attempt = 0
        self._refusals: dict[int, int] = {}  # outbox id -> retryable refusals so far
        self._config_topic = topic(device_id, Channel.CONFIG)
        self._ack_topic = topic(device_id, Channel.ACK)
        self._presence_topic = topic(device_id, Channel.PRESENCE)

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
        self._end_hold_state()
        client = self._client
        if client is not None and self.connected:
            client.publish(self._presence_topic, _presence(False), qos=1, retain=True)
            client.disconnect()
        elif client is not None:
            self._drop_client()

    def service(self) -> None:
        """Keepalive, timeouts and stored-ack timeouts; call at least once a second."""
        if self._client is None:
            return
        self._client.loop_misc()
        if self._unstored and self._held is None and self._ack_overdue(self.loop.time()):
            self._resend_unstored()

    def _ack_overdue(self, now: float) -> bool:
        """Whether delivered messages waited too long for their stored-ack.

        Two ways: no ack at all for the (doubling) timeout, the backend being slow or away; or
        the oldest delivered message waited ``ACK_TIMEOUT_S`` while acks for others kept
        arriving, so the backend is storing but its ack for that one was lost (an ingest
        worker killed between its commit and its publish). Without the second, a device that
        streams would keep such a message until it next reconnects.
        """
        if now - self._unstored_since >= self._ack_timeout_s:
            return True
        oldest_delivery = next(iter(self._unstored.values()))
        return self._last_ack_at > oldest_delivery and now - oldest_delivery >= ACK_TIMEOUT_S

    def pump(self, *, force: bool = False) -> None:
        """Hand paho the next outbox messages while the window has room.

        Without ``force`` it looks at the outbox only if something was enqueued since the
        last look; PUBACKs, stored-acks and new connections force a look.
        """
        client = self._client
        room = PUBLISH_WINDOW - len(self._inflight)
        if client is None or not self.connected or room <= 0 or self._held is not None:
            return
        if not force and self.store.enqueued == self._looked_at:
            return
        self._looked_at = self.store.enqueued
        # After a resend moved the cursor back, messages still in flight lie ahead of it: they
        # are skipped rather than put in flight twice.
        in_flight = (
            {sent.id for sent in self._inflight.values()}
            if self._fed_up_to < self._sent_up_to
            else set()
        )
        for message in self.store.pending(after_id=self._fed_up_to, limit=room + len(in_flight)):
            if message.id in in_flight:
                self._fed_up_to = message.id
                continue
            if room == 0:
                break
            info = client.publish(
                topic(self.device_id, message.channel),
                message.payload,
                qos=1,
                retain=message.retain,
            )
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                break  # the connection is going away; the next one starts from the outbox
            self._inflight[info.mid] = _Sent(message.id, message.seq)
            self._fed_up_to = message.id
            self._sent_up_to = max(self._sent_up_to, message.id)
            room -= 1

    # -- connection ----------------------------------------------------------------------

    def _connect(self) -> None:
        self._retry = None
        if self._stopping:
            return
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.device_id,
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        client.username_pw_set(self.device_id, self.address.password)
        if self.address.ca_file is not None:
            client.tls_set(ca_certs=self.address.ca_file)
        client.will_set(self._presence_topic, _presence(False, with_ts=False), qos=1, retain=True)
        client.max_inflight_messages_set(PUBLISH_WINDOW)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        self._client = client
        self._forget_connection()
        try:
            # A blocking TCP connect; on loopback or a LAN it returns in microseconds.
            client.connect(
                self.address.host,
                self.address.port,
                keepalive=KEEPALIVE_S,
                clean_start=True,
            )
        except (TimeoutError, OSError) as exc:
            log.debug("%s: connect failed: %s", self.device_id, exc)
            self._drop_client()
            self._schedule_reconnect()

    def _schedule_reconnect(self) -> None:
        if self._stopping or self._retry is not None:
            return
        # Full jitter: a fleet that lost its broker together does not return together.
        ceiling = min(self.backoff_max_s, BACKOFF_MIN_S * 2**self._attempt)
        self._attempt = min(self._attempt + 1, 30)
        self._retry = self.loop.call_later(self.rng.uniform(0, ceiling), self._connect)

    def _drop_client(self) -> None:
        client = self._client
        self._client = None
        self._forget_connection()
        if client is not None:
            sock = client.socket()
            if sock is not None:
                self._forget_socket(sock)
            client.on_socket_close = None
            client.on_disconnect = None
            client.disconnect()  # closes the socket if paho still holds one

    def _forget_connection(self) -> None:
        """What only meant something on the connection that ended: the next one republishes
        the outbox from its oldest message."""
        self.connected = False
        self._inflight.clear()
        self._fed_up_to = 0
        self._sent_up_to = 0
        self._unstored.clear()
        self._end_hold_state()

    # -- delivery ------------------------------------------------------------------------

    def _delivered(self, sent: _Sent) -> None:
        self.stats.delivered += 1
        self.stats.last_delivery_s = time.monotonic()
        self._hold_attempt = 0
        if self._refusals:
            self._refusals.pop(sent.id, None)
        if self.delete_on is DeleteOn.PUBACK:
            self.store.delete([sent.id])
        elif not sent.stored:
            now = self.loop.time()
            if not self._unstored:
                self._unstored_since = now
            self._unstored.pop(sent.seq, None)  # sent again: it waits from this delivery
            self._unstored[sent.seq] = now

    def _hold(self, sent: _Sent) -> None:
        """Stop publishing for a backoff, then send again from ``sent`` (and what follows)."""
        if self._resend_from is None or sent.id < self._resend_from:
            self._resend_from = sent.id
        if self._held is not None:
            return
        ceiling = min(
            self.backoff_max_s, RETRY_BACKOFF_MAX_S, RETRY_BACKOFF_MIN_S * 2**self._hold_attempt
        )
        self._hold_attempt = min(self._hold_attempt + 1, 30)
        # Never at once (what caused it takes time to clear), and jittered, so a fleet that met
        # a restarted broker together does not come back together.
        delay = self.rng.uniform(ceiling / 2, ceiling)
        log.debug("%s: sending again from seq %d in %.1f s", self.device_id, sent.seq, delay)
        self._held = self.loop.call_later(delay, self._end_hold)

    def _end_hold(self) -> None:
        self._held = None
        if self._resend_from is not None:
            self._fed_up_to = min(self._fed_up_to, self._resend_from - 1)
            self._resend_from = None
        self.pump(force=True)

    def _end_hold_state(self) -> None:
        if self._held is not None:
            self._held.cancel()
            self._held = None
        self._resend_from = None

    def _give_up(self, sent: _Sent, reason: ReasonCode) -> None:
        self._refusals.pop(sent.id, None)
        if self.store.give_up([sent.id]):
            self.stats.refused += 1
            log.error(
                "%s: the broker refused seq %d for good (%s): dropped, reported on state",
                self.device_id,
                sent.seq,
                reason,
            )

    def _resend_unstored(self) -> None:
        log.info(
            "%s: %d delivered messages not acknowledged as stored within %.0f s: sending again",
            self.device_id,
            len(self._unstored),
            self._ack_timeout_s,
        )
        self.stats.resends += 1
        self._unstored.clear()
        self._ack_timeout_s = min(ACK_TIMEOUT_MAX_S, 2 * self._ack_timeout_s)
        # From the oldest message in the outbox: anything older than the oldest unstored one
        # is in flight (skipped by pump) or waiting to be sent again anyway.
        self._fed_up_to = 0
        self.pump(force=True)

    def _on_ack(self, raw: bytes) -> None:
        try:
            ranges = parse_ack(raw)
        except MalformedAck as exc:
            self.stats.malformed_acks += 1
            log.debug("%s: ignored a malformed ack (%s): %r", self.device_id, exc, raw[:200])
            return
        self.stats.stored += self.store.delete_stored(ranges)
        # The backend is storing: the wait for the others starts over, at its shortest.
        self._ack_timeout_s = ACK_TIMEOUT_S
        self._unstored_since = self._last_ack_at = self.loop.time()
        for first, last in ranges:
            if last - first < len(self._unstored):
                for seq in range(first, last + 1):
                    self._unstored.pop(seq, None)
            elif self._unstored:
                self._unstored = {
                    seq: at for seq, at in self._unstored.items() if not first <= seq <= last
                }
            for sent in self._inflight.values():
                if first <= sent.seq <= last:
                    sent.stored = True
        self.pump(force=True)

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
        self.connected = True
        self._attempt = 0
        self.stats.connects += 1
        topics = [(self._config_topic, 1)]
        if self.delete_on is DeleteOn.STORED:
            # Subscribed before anything is published on this connection: the broker handles a
            # client's packets in order, so no ack for this connection's messages is missed.
            topics.append((self._ack_topic, 1))
        client.subscribe(topics)
        client.publish(self._presence_topic, _presence(True), qos=1, retain=True)
        self.pump(force=True)

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if client is not self._client:
            return
        if self.connected:
            self.stats.disconnects += 1
            log.info("%s: disconnected (%s)", self.device_id, reason)
        self._client = None
        self._forget_connection()
        self._schedule_reconnect()

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        sent = self._inflight.pop(mid, None)
        if sent is None:
            return  # presence: not from the outbox
        code = reason.value
        if code == 0 or (code == NO_MATCHING_SUBSCRIBERS and self.delete_on is DeleteOn.PUBACK):
            self._delivered(sent)
        elif sent.stored:
            pass  # a copy sent again was stored already: whatever this one met no longer matters
        elif code == NO_MATCHING_SUBSCRIBERS:
            # The broker took it and dropped it: nobody is subscribed, as after a broker
            # restart before the backend has subscribed again. Kept and sent again.
            self.stats.no_subscribers += 1
            self._hold(sent)
        elif code in RETRY_ALWAYS or (
            code not in GIVE_UP and self._refusals.get(sent.id, 0) < REFUSED_RETRIES
        ):
            if code not in RETRY_ALWAYS:
                self._refusals[sent.id] = self._refusals.get(sent.id, 0) + 1
            self.stats.retried += 1
            log.warning(
                "%s: the broker refused seq %d (%s); sending it again",
                self.device_id,
                sent.seq,
                reason,
            )
            self._hold(sent)
        else:
            self._give_up(sent, reason)
        self.pump(force=True)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if message.topic == self._ack_topic:
            self._on_ack(bytes(message.payload))
        elif message.topic == self._config_topic and message.payload:
            self.on_config(bytes(message.payload))

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


def _presence(online: bool, *, with_ts: bool = True) -> bytes:
    payload: dict[str, object] = {"v": PROTOCOL_VERSION, "online": online}
    if with_ts:
        payload["ts"] = int(time.time() * 1000)
    return json.dumps(payload, separators=(",", ":")).encode()
