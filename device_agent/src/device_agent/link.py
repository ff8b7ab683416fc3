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
again). While connected, a delivered message is sent again only on its own stored-ack timer,
as TCP retransmits a segment: when acks for later seqs show its ack was lost, or, as a single
probe of the oldest, when no ack arrives at all (see :meth:`Link.service`).
"""

import asyncio
import heapq
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
from device_agent.store import DeviceStore, Pending

log = logging.getLogger("galvani.agent.link")

KEEPALIVE_S: Final = 60
CONNECT_TIMEOUT_S: Final = 5.0
BACKOFF_MIN_S: Final = 1.0
BACKOFF_MAX_S: Final = 60.0
# Messages handed to paho before their PUBACKs: Mosquitto's default max_inflight_messages.
PUBLISH_WINDOW: Final = 20
# How long a delivered message waits for its stored-ack, from its delivery and from the first
# ack for a later seq, before it is sent again; doubling with each copy up to the cap. The same
# wait, doubling the same way and starting over at every ack, times the probe sent when no ack
# arrives at all.
ACK_TIMEOUT_S: Final = 30.0
ACK_TIMEOUT_MAX_S: Final = 480.0
# Delivered messages waiting for stored-acks at which the link first checks that the outbox
# still holds them (then each time their number doubles).
PRUNE_MIN: Final = 1024
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
    resends: int = 0  # copies of delivered messages sent for want of a stored-ack
    malformed_acks: int = 0
    subscribe_refused: int = 0  # filters (config, ack) a SUBACK refused
    last_delivery_s: float | None = None  # time.monotonic() of the last delivery


@dataclass(slots=True)
class _Sent:
    """An outbox message handed to paho on this connection and waiting for its PUBACK."""

    id: int
    seq: int
    stored: bool = False  # a stored-ack covered it before its PUBACK arrived


@dataclass(slots=True)
class _Unacked:
    """A message delivered on this connection (PUBACK 0x00) that no stored-ack has covered."""

    id: int
    seq: int
    since: float  # clock() of its first delivery on this connection
    timeout_s: float  # its wait for a stored-ack: ACK_TIMEOUT_S, doubled by each copy sent
    due: float  # clock() when that wait is over
    sending: bool = False  # a copy is in flight: its PUBACK is not back yet


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
        clock: Callable[[], float] | None = None,
    ) -> None:
        """``clock`` (seconds, monotonic; the loop's time by default) times the stored-acks."""
        self.device_id = device_id
        self.address = address
        self.store = store
        self.on_config = on_config
        self.loop = loop
        self.rng = rng
        self.backoff_max_s = backoff_max_s
        self.delete_on = delete_on
        self.clock = loop.time if clock is None else clock
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
        # Messages delivered on this connection and not yet acked, by seq, in the order of
        # their first delivery (dicts keep insertion order). Memory and work are per message
        # delivered and per ack, never per tick: service() only looks at the tops of heaps.
        self._unacked: dict[int, _Unacked] = {}
        self._acked_max = 0  # the highest seq a stored-ack named on this connection
        # Seqs of _unacked below _acked_max were passed over: the backend stored a later one,
        # so their acks may be lost. Those wait on _passed, a heap of (due, seq); the others on
        # _unpassed, a heap of seqs, until an ack passes them. Both heaps may hold stale items
        # (acked, dropped, or re-timed messages), skipped when they surface.
        self._passed: list[tuple[float, int]] = []
        self._unpassed: list[int] = []
        # clock() of the last thing the backend could answer or did: an ack, a copy sent, or a
        # delivery when nothing waited.
        self._silent_since = 0.0
        self._ack_timeout_s = ACK_TIMEOUT_S  # the probe's wait for an ack, doubling
        self._prune_at = PRUNE_MIN  # len(_unacked) at which to forget what the outbox dropped
        self._subscribing: dict[int, list[str]] = {}  # SUBSCRIBE mid -> its filters
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
        """Keepalive, timeouts and stored-ack timeouts; call at least once a second.

        A delivered message is sent again, through the same publish window, in two cases:

        - acks for later seqs arrived but not for it, and it has waited its own timeout
          (``ACK_TIMEOUT_S``, doubling with each copy up to ``ACK_TIMEOUT_MAX_S``) both from
          its delivery and from the first ack that passed it over: its ack was lost (an
          ingest worker killed between its commit and its publish) or it sits in a lagging
          worker's queue. Only such messages are sent, each on its own timer;
        - no ack has arrived and no copy has been sent for ``_ack_timeout_s`` (doubling the
          same way with each probe, back to ``ACK_TIMEOUT_S`` at every ack): the backend is
          away. One probe, the oldest delivered message (unless acks passed it over: then its
          own timer sends it), not the outbox, which the broker holds for the backend anyway.
          When acks come back, messages they pass over follow by the first rule, so a backend
          that works through its queue in order, acking the oldest first, is sent no copies.

        Everything else waits for the next connection, which sends the whole outbox again.
        """
        if self._client is None:
            return
        self._client.loop_misc()
        if self._unacked and self._held is None and self.connected:
            self._send_overdue(self.clock())

    @property
    def awaiting_ack(self) -> int:
        """Messages delivered on this connection that wait for their stored-acks."""
        return len(self._unacked)

    @property
    def acks_overdue(self) -> bool:
        """Whether a message delivered on this connection has waited longer than
        ``ACK_TIMEOUT_MAX_S`` for its stored-ack (the backend away, or acks never reaching the
        device: a broker grants an ``ack`` filter its ACL forbids, then delivers nothing)."""
        if not self._unacked:
            return False
        oldest = next(iter(self._unacked.values()))
        return self.clock() - oldest.since > ACK_TIMEOUT_MAX_S

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
        # After a hold moved the cursor back, messages sent on this connection lie ahead of it:
        # those in flight, and those delivered, which wait for their stored-acks on their own
        # timers. Both are skipped rather than sent twice.
        in_flight = (
            {sent.id for sent in self._inflight.values()}
            if self._fed_up_to < self._sent_up_to
            else set()
        )
        while room > 0:
            limit = room
            batch = self.store.pending(after_id=self._fed_up_to, limit=limit)
            for message in batch:
                if message.id <= self._sent_up_to and (
                    message.id in in_flight or message.seq in self._unacked
                ):
                    self._fed_up_to = message.id
                    continue
                if not self._publish(client, message, retain=message.retain):
                    return  # the connection is going away; the next one starts from the outbox
                self._fed_up_to = message.id
                self._sent_up_to = max(self._sent_up_to, message.id)
                room -= 1
            if len(batch) < limit:
                break

    def _publish(self, client: mqtt.Client, message: Pending, *, retain: bool) -> bool:
        """Hand ``message`` to paho, in flight until its PUBACK; False if paho refused it."""
        info = client.publish(
            topic(self.device_id, message.channel), message.payload, qos=1, retain=retain
        )
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            return False
        self._inflight[info.mid] = _Sent(message.id, message.seq)
        return True

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
        client.on_subscribe = self._on_subscribe
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
        self._unacked.clear()
        self._prune_at = PRUNE_MIN
        self._acked_max = 0
        self._passed.clear()
        self._unpassed.clear()
        self._subscribing.clear()
        self._end_hold_state()

    # -- delivery ------------------------------------------------------------------------

    def _delivered(self, sent: _Sent) -> None:
        self.stats.delivered += 1
        self.stats.last_delivery_s = time.monotonic()
        self._hold_attempt = 0
        if self._refusals:
            self._refusals.pop(sent.id, None)
        # Lets a test (or a person with --verbose) see the PUBACK reach the device.
        log.debug("%s: seq %d delivered", self.device_id, sent.seq)
        if self.delete_on is DeleteOn.PUBACK:
            self.store.delete([sent.id])
        elif sent.stored:
            pass
        elif (entry := self._unacked.get(sent.seq)) is not None:
            self._wait_again(entry)  # a copy sent on its timer: it waits from this delivery
        else:
            now = self.clock()
            if not self._unacked:
                self._silent_since = now
            entry = _Unacked(sent.id, sent.seq, now, ACK_TIMEOUT_S, now + ACK_TIMEOUT_S)
            self._unacked[sent.seq] = entry
            if sent.seq < self._acked_max:
                heapq.heappush(self._passed, (entry.due, entry.seq))
            else:
                heapq.heappush(self._unpassed, entry.seq)
            if len(self._unacked) >= self._prune_at:
                self._prune()

    def _prune(self) -> None:
        """Forget delivered messages the outbox has dropped since (over its limits, while no
        ack came): with acks that never arrive, they would pile up for as long as the
        connection lasts. Run when the count doubles, so its cost is O(1) per delivery."""
        kept = self.store.kept(entry.id for entry in self._unacked.values())
        self._unacked = {seq: e for seq, e in self._unacked.items() if e.id in kept}
        self._prune_at = max(PRUNE_MIN, 2 * len(self._unacked))
        self._unpassed = [seq for seq in self._unacked if seq >= self._acked_max]
        heapq.heapify(self._unpassed)
        self._rebuild_passed()

    def _rebuild_passed(self) -> None:
        self._passed = [
            (entry.due, entry.seq)
            for entry in self._unacked.values()
            if entry.seq < self._acked_max and not entry.sending
        ]
        heapq.heapify(self._passed)

    def _wait_again(self, entry: _Unacked) -> None:
        """Start ``entry``'s wait for its stored-ack over, from now, with its current timeout."""
        entry.sending = False
        entry.due = self.clock() + entry.timeout_s
        if entry.seq < self._acked_max:
            heapq.heappush(self._passed, (entry.due, entry.seq))
        # Otherwise it is still on _unpassed (only a pass takes it off), or acked.

    def _send_overdue(self, now: float) -> None:
        """Send again the delivered messages whose stored-acks are overdue (see service)."""
        room = PUBLISH_WINDOW - len(self._inflight)
        if room <= 0:
            return
        due: list[_Unacked] = []
        passed = self._passed
        while passed and passed[0][0] <= now and len(due) < room:
            at, seq = heapq.heappop(passed)
            entry = self._unacked.get(seq)
            if entry is not None and not entry.sending and entry.due == at:
                due.append(entry)
        if due:
            sent = self._send_again(due, now)
            if sent:
                log.info(
                    "%s: acks for later seqs came, none for %d delivered messages (seq %s) in "
                    "time: sending them again",
                    self.device_id,
                    len(sent),
                    ", ".join(map(str, sent[:10])) + (", ..." if len(sent) > 10 else ""),
                )
            return
        if now - self._silent_since < self._ack_timeout_s:
            return
        oldest = next(iter(self._unacked.values()))
        if oldest.sending or oldest.seq < self._acked_max:
            # A copy is in flight, or acks passed the oldest over and it waits on its own timer,
            # whose copies ask the backend as well as a probe would.
            self._silent_since = now
            return
        # An outage of the backend reaches here again and again: warn once it has lasted.
        log.log(
            logging.WARNING if self._ack_timeout_s >= ACK_TIMEOUT_MAX_S else logging.INFO,
            "%s: no stored-ack for %.0f s, %d delivered messages wait for one: sending seq %d "
            "again as a probe",
            self.device_id,
            now - self._silent_since,
            len(self._unacked),
            oldest.seq,
        )
        self._ack_timeout_s = min(ACK_TIMEOUT_MAX_S, 2 * self._ack_timeout_s)
        self._send_again([oldest], now)

    def _send_again(self, entries: list[_Unacked], now: float) -> list[int]:
        """Publish copies of ``entries`` (read again from the outbox by id); their seqs."""
        client = self._client
        assert client is not None
        messages = {
            message.id: message for message in self.store.pending_by_id(e.id for e in entries)
        }
        sent: list[int] = []
        for entry in entries:
            message = messages.get(entry.id)
            if message is None:
                # The outbox dropped it meanwhile (its limits, or given up): nothing to wait for.
                del self._unacked[entry.seq]
                continue
            # Not retained: the broker took the original on this connection and retained it
            # then; a copy retained now could put an older state back over a newer one.
            if not self._publish(client, message, retain=False):
                break  # the connection is going away; the next one starts from the outbox
            entry.sending = True
            entry.timeout_s = min(ACK_TIMEOUT_MAX_S, 2 * entry.timeout_s)
            self.stats.resends += 1
            sent.append(entry.seq)
        if sent:
            # Copies are something the backend can answer: no probe while they go out.
            self._silent_since = now
        return sent

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

    def _on_ack(self, raw: bytes) -> None:
        try:
            ranges = parse_ack(raw)
        except MalformedAck as exc:
            self.stats.malformed_acks += 1
            log.debug("%s: ignored a malformed ack (%s): %r", self.device_id, exc, raw[:200])
            return
        self.stats.stored += self.store.delete_stored(ranges)
        # The backend is storing: the probe's wait starts over, at its shortest.
        now = self.clock()
        self._ack_timeout_s = ACK_TIMEOUT_S
        self._silent_since = now
        for first, last in ranges:
            if last - first < len(self._unacked):
                for seq in range(first, last + 1):
                    self._unacked.pop(seq, None)
            elif self._unacked:
                self._unacked = {
                    seq: entry for seq, entry in self._unacked.items() if not first <= seq <= last
                }
            for sent in self._inflight.values():
                if first <= sent.seq <= last:
                    sent.stored = True
            self._acked_max = max(self._acked_max, last)
        self._pass_over(now)
        self.pump(force=True)

    def _pass_over(self, now: float) -> None:
        """Put the messages an ack passed over (a later seq stored) on their timers.

        Each waits its timeout from now, not only from its delivery: after an outage every
        message's wait is long over, and workers of a share group draining their queues side
        by side ack out of order by moments, which must not send copies.
        """
        unpassed = self._unpassed
        while unpassed and unpassed[0] < self._acked_max:
            entry = self._unacked.get(heapq.heappop(unpassed))
            if entry is None:
                continue
            entry.due = max(entry.due, now + entry.timeout_s)
            if not entry.sending:
                heapq.heappush(self._passed, (entry.due, entry.seq))
        # Acked messages leave their items on _passed behind; rebuilt when they outnumber the
        # live ones, so the heap stays proportional to what waits.
        if len(self._passed) > 2 * len(self._unacked) + PUBLISH_WINDOW:
            self._rebuild_passed()

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
        _, mid = client.subscribe(topics)
        if mid is not None:
            self._subscribing[mid] = [name for name, _ in topics]
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
        elif sent.seq in self._unacked:
            self._copy_refused(sent, reason)
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

    def _copy_refused(self, sent: _Sent, reason: ReasonCode) -> None:
        """A copy sent on its stored-ack timer met a refusal: it goes back on its timer (the
        original was delivered, so nothing is held up behind it), or is given up for good."""
        entry = self._unacked[sent.seq]
        if reason.value in GIVE_UP:
            del self._unacked[sent.seq]
            self._give_up(sent, reason)
            return
        if reason.value == NO_MATCHING_SUBSCRIBERS:
            self.stats.no_subscribers += 1
        else:
            self.stats.retried += 1
        log.warning(
            "%s: the broker refused the copy of seq %d (%s); sending it again in %.0f s",
            self.device_id,
            sent.seq,
            reason,
            entry.timeout_s,
        )
        self._wait_again(entry)

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        if client is not self._client:
            return
        filters = self._subscribing.pop(mid, [])
        for name, reason in zip(filters, reasons, strict=False):
            if not reason.is_failure:
                continue
            self.stats.subscribe_refused += 1
            log.error(
                "%s: the broker refused the subscription to %s (%s): %s",
                self.device_id,
                name,
                reason,
                "no stored-ack will arrive, so the outbox keeps every message until it is full"
                if name == self._ack_topic
                else "no mode table will arrive",
            )

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
