"""One device's link to the backend: its outbox, published over its MQTT connection.

The connection itself (paho on an asyncio loop, reconnects, presence, subscriptions) is a
:class:`~device_agent.connection.Connection`; this module decides what goes over it.

The outbox in the :class:`~device_agent.store.DeviceStore` is the only copy of a message until
the backend says it has stored it: a stored-ack on ``galvani/v1/d/{id}/ack`` naming its
``seq``. A PUBACK only says the broker took it, and Mosquitto keeps what it took in memory
(saved every 30 s), so a broker crash or a full queue can still lose it. Each message therefore
goes queued -> delivered (PUBACK 0x00: the publish window moves on, the row stays) -> stored
(the ack deletes the row). ``DeleteOn.PUBACK`` keeps the old contract, delete on PUBACK, for
backends that send no stored-acks.

Each connection starts clean and publishes the outbox from its oldest message, so after an
outage or a broker crash everything not yet stored goes out again in ``seq`` order (the backend
stores it once, by ``(device_id, seq)``, and acks it again). While connected, a delivered
message is sent again only on its own stored-ack timer, as TCP retransmits a segment: when acks
for later seqs show its ack was lost, or, as a single probe of the oldest, when no ack arrives
at all. Those timers are kept by :mod:`device_agent.unstored`; what a PUBACK's reason code does
to a message is decided by :mod:`device_agent.puback`.

Over MQTT 3.1.1 a PUBACK carries no reason code: every PUBACK is a success, and the rules
that read codes never fire. What they did is done by other means: a message the broker took
with nobody subscribed (MQTT 5's 0x10) is sent again by its stored-ack timers; a refusal is
either a silent drop (Mosquitto 2.0 and NATS answer a publish their ACL forbids with a plain
PUBACK), which those timers also send again, or the broker closing the connection, which
:meth:`Link._on_lost` counts against the earliest message still waiting for its PUBACK and,
once it has been sent again ``REFUSED_RETRIES`` times that way, gives up at the next end, as
MQTT 5's 0x87 rule does.
"""

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from device_agent.connection import (
    BACKOFF_MAX_S,
    MQTT_311,
    BrokerAddress,
    Connection,
    Subscription,
)
from device_agent.protocol import Channel, MalformedAck, parse_ack, topic
from device_agent.puback import GIVE_UP, HUNG_UP, NO_MATCHING_SUBSCRIBERS, Refusals
from device_agent.store import DeviceStore, Pending
from device_agent.unstored import Unacked, Unstored

# BrokerAddress and BACKOFF_MAX_S are the connection's, and part of the link's interface too.
__all__ = ["BACKOFF_MAX_S", "PUBLISH_WINDOW", "BrokerAddress", "DeleteOn", "Link", "LinkStats"]

log = logging.getLogger("galvani.agent.link")

# Messages handed to paho before their PUBACKs: Mosquitto's default max_inflight_messages.
PUBLISH_WINDOW: Final = 20


class DeleteOn(StrEnum):
    """When a message leaves the outbox."""

    STORED = "stored"  # a stored-ack from the backend covers its seq
    PUBACK = "puback"  # the broker's PUBACK (legacy: for backends that send no stored-acks)


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
    hung_up: int = 0  # MQTT 3.1.1: connections the broker ended with a message awaiting PUBACK
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


class Link:
    """The device's link: keeps its connection up, publishes the outbox, takes config and
    stored-acks, and sends again what is not stored."""

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
        self.store = store
        self.on_config = on_config
        self.loop = loop
        self.rng = rng
        self.backoff_max_s = backoff_max_s
        self.delete_on = delete_on
        self.clock = loop.time if clock is None else clock
        self.stats = LinkStats()
        self._inflight: dict[int, _Sent] = {}  # paho mid -> outbox message
        self._fed_up_to = 0  # the read cursor: highest outbox id looked at on this connection
        self._sent_up_to = 0  # highest outbox id handed to paho on this connection
        self._looked_at = -1  # store.enqueued when pump last read the outbox
        # Messages delivered on this connection and not yet acked, and their resend timers.
        self._unstored = Unstored(device_id, slack=PUBLISH_WINDOW)
        self._held: asyncio.TimerHandle | None = None  # no publishing until it fires
        self._resend_from: int | None = None  # the oldest outbox id to send again after it
        self._refusals = Refusals()
        self._mqtt_311 = address.protocol == MQTT_311
        self._config_topic = topic(device_id, Channel.CONFIG)
        self._ack_topic = topic(device_id, Channel.ACK)
        # Each filter, its QoS, and what its refusal in a SUBACK costs. Without ``ack``
        # nothing ever leaves the outbox but by its bounds. Stored-acks are published at QoS
        # 0 (protocol.md), so a QoS 1 ``ack`` filter would receive them at 0 all the same;
        # subscribed at 0 it costs NATS's MQTT gateway no JetStream consumer, which it makes
        # for each QoS 1 filter, so a JetStream election cannot refuse it.
        subscriptions = {self._config_topic: Subscription(1, "no mode table will arrive")}
        if delete_on is DeleteOn.STORED:
            subscriptions[self._ack_topic] = Subscription(
                0, "no stored-ack will arrive, so the outbox keeps every message until it is full"
            )
        self._connection = Connection(
            device_id,
            address,
            loop=loop,
            rng=rng,
            backoff_max_s=backoff_max_s,
            subscriptions=subscriptions,
            max_inflight=PUBLISH_WINDOW,
            stats=self.stats,
            on_connected=self._on_connected,
            on_forget=self._forget_connection,
            on_publish=self._on_publish,
            on_message=self._on_message,
            on_lost=self._on_lost,
        )

    @property
    def connected(self) -> bool:
        """Whether the broker has accepted the current connection."""
        return self._connection.connected

    def start(self) -> None:
        """Connect now (and keep reconnecting until :meth:`stop`)."""
        self._connection.start()

    def stop(self) -> None:
        """Say offline, disconnect, and stop reconnecting."""
        self._end_hold_state()
        self._connection.stop()

    def service(self) -> None:
        """Keepalive, timeouts and stored-ack timeouts; call at least once a second.

        A delivered message whose stored-ack is overdue (by the rules in
        :mod:`device_agent.unstored`) is sent again, read from the outbox by id, through the
        same publish window. Everything else waits for the next connection, which sends the
        whole outbox again.
        """
        connection = self._connection
        connection.service()
        if connection.client is None:
            return
        if self._unstored.entries and self._held is None and connection.connected:
            self._send_overdue(self.clock())

    @property
    def node(self) -> tuple[str, int]:
        """The broker node (host, port) the link is connected to, or tries next."""
        return self._connection.node

    @property
    def awaiting_ack(self) -> int:
        """Messages delivered on this connection that wait for their stored-acks."""
        return len(self._unstored.entries)

    @property
    def acks_overdue(self) -> bool:
        """Whether a message delivered on this connection has waited longer than
        ``ACK_TIMEOUT_MAX_S`` for its stored-ack (the backend away, or acks never reaching the
        device: a broker grants an ``ack`` filter its ACL forbids, then delivers nothing)."""
        return self._unstored.waited_too_long(self.clock())

    def pump(self, *, force: bool = False) -> None:
        """Hand paho the next outbox messages while the window has room.

        Without ``force`` it looks at the outbox only if something was enqueued since the
        last look; PUBACKs, stored-acks and new connections force a look.
        """
        connection = self._connection
        client = connection.client
        room = PUBLISH_WINDOW - len(self._inflight)
        if client is None or not connection.connected or room <= 0 or self._held is not None:
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
                    message.id in in_flight or message.seq in self._unstored.entries
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

    # -- the connection's events -----------------------------------------------------------

    def _on_connected(self) -> None:
        self.pump(force=True)

    def _on_lost(self) -> None:
        """MQTT 3.1.1: a broker that refuses a publish may close the connection instead of
        answering (3.1.1 has no reason code to say so; section 3.3.5 lets a server close it).
        The earliest message still awaiting its PUBACK is then the one it could not take: it
        is sent again on the next connection (perhaps to another node) and given up after
        ``REFUSED_RETRIES`` + 1 ends in a row with no PUBACK for it, so that one message the
        broker will never take cannot hold the outbox back. A PUBACK for it starts the count
        over, so a node that dies or a network that fails costs nothing unless the same message
        is the one in flight at each of the ends. MQTT 5 says why with a reason code instead."""
        if not self._mqtt_311 or not self._inflight:
            return
        self.stats.hung_up += 1
        sent = next(iter(self._inflight.values()))  # paho sends and PUBACKs come in this order
        if self._refusals.may_retry(sent.id, HUNG_UP):
            log.warning(
                "%s: the connection ended while seq %d awaited its PUBACK; sending it again",
                self.device_id,
                sent.seq,
            )
            return
        self._give_up(sent, "the broker ended the connection each time it was sent")

    def _forget_connection(self) -> None:
        """What only meant something on the connection that ended: the next one republishes
        the outbox from its oldest message."""
        self._inflight.clear()
        self._fed_up_to = 0
        self._sent_up_to = 0
        self._unstored.clear()
        self._end_hold_state()

    # -- delivery ------------------------------------------------------------------------

    def _delivered(self, sent: _Sent) -> None:
        self.stats.delivered += 1
        self.stats.last_delivery_s = time.monotonic()
        self._refusals.delivered(sent.id)
        # Lets a test (or a person with --verbose) see the PUBACK reach the device.
        log.debug("%s: seq %d delivered", self.device_id, sent.seq)
        if self.delete_on is DeleteOn.PUBACK:
            self.store.delete([sent.id])
        elif sent.stored:
            pass
        elif (entry := self._unstored.entries.get(sent.seq)) is not None:
            # A copy sent on its timer: it waits from this delivery.
            self._unstored.wait_again(entry, self.clock())
        elif self._unstored.delivered(sent.id, sent.seq, self.clock()):
            self._unstored.prune(self.store.kept)

    def _send_overdue(self, now: float) -> None:
        """Send again the delivered messages whose stored-acks are overdue (see service)."""
        room = PUBLISH_WINDOW - len(self._inflight)
        if room <= 0:
            return
        due = self._unstored.timed_out(now, room)
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
        probe = self._unstored.probe(now)
        if probe is not None:
            self._send_again([probe], now)

    def _send_again(self, entries: list[Unacked], now: float) -> list[int]:
        """Publish copies of ``entries`` (read again from the outbox by id); their seqs."""
        client = self._connection.client
        assert client is not None
        messages = {
            message.id: message for message in self.store.pending_by_id(e.id for e in entries)
        }
        sent: list[int] = []
        for entry in entries:
            message = messages.get(entry.id)
            if message is None:
                # The outbox dropped it meanwhile (its limits, or given up): nothing to wait for.
                self._unstored.forget(entry.seq)
                continue
            # Not retained: the broker took the original on this connection and retained it
            # then; a copy retained now could put an older state back over a newer one.
            if not self._publish(client, message, retain=False):
                break  # the connection is going away; the next one starts from the outbox
            self._unstored.copy_sent(entry, now)
            self.stats.resends += 1
            sent.append(entry.seq)
        return sent

    def _hold(self, sent: _Sent) -> None:
        """Stop publishing for a backoff, then send again from ``sent`` (and what follows)."""
        if self._resend_from is None or sent.id < self._resend_from:
            self._resend_from = sent.id
        if self._held is not None:
            return
        delay = self._refusals.wait_s(self.rng, self.backoff_max_s)
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

    def _give_up(self, sent: _Sent, reason: ReasonCode | str) -> None:
        self._refusals.forget(sent.id)
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
        self._unstored.acked(ranges, self.clock())
        for first, last in ranges:
            for sent in self._inflight.values():
                if first <= sent.seq <= last:
                    sent.stored = True
        self.pump(force=True)

    # -- paho callbacks, handed over by the connection -------------------------------------

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
        elif sent.seq in self._unstored.entries:
            self._copy_refused(sent, reason)
        elif code == NO_MATCHING_SUBSCRIBERS:
            # The broker took it and dropped it: nobody is subscribed, as after a broker
            # restart before the backend has subscribed again. Kept and sent again.
            self.stats.no_subscribers += 1
            self._hold(sent)
        elif self._refusals.may_retry(sent.id, code):
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
        entry = self._unstored.entries[sent.seq]
        if reason.value in GIVE_UP:
            self._unstored.forget(sent.seq)
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
        self._unstored.wait_again(entry, self.clock())

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if message.topic == self._ack_topic:
            self._on_ack(bytes(message.payload))
        elif message.topic == self._config_topic and message.payload:
            self.on_config(bytes(message.payload))
