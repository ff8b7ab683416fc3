"""A backend worker's MQTT session: persistent, shared, acknowledged only after commit.

Ingest and rules each run workers of their own share group on it.

* MQTT 5 with clean start off and a long session expiry: while a worker is down the broker
  keeps its subscriptions and queues its share of the messages, and redelivers every QoS 1
  message the worker received but did not acknowledge.
* A shared subscription (``$share/<group>/...``): the broker deals messages round-robin to
  the workers of the group. Mosquitto keeps dealing to a member that is offline (its
  session queues them), so a worker that dies must be restarted under the same client id.
* ``manual_ack``: paho does not send PUBACK on receipt; the worker acknowledges each message
  after the transaction that stores it commits, in arrival order.
* Bounded memory: the worker asks for at most ``receive_maximum`` unacknowledged messages
  (MQTT 5 Receive Maximum) and also stops reading its socket once it holds that many.
  Mosquitto 2.0 honours Receive Maximum only until the first acknowledgements arrive and
  then sends everything queued (measured: 300 requested, 9,850 received after 150 acks), so
  the worker's own limit is what holds; the rest waits in TCP buffers and the broker's queue.

Single-threaded by design: the worker calls :meth:`poll` to run the network and
:meth:`ack` after a commit from the same thread, so an acknowledgement can never be queued
on a connection other than the one the message arrived on.
"""

import logging
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Inbound:
    """One message as the subscriber received it."""

    topic: str
    payload: bytes
    mid: int
    qos: int
    received_at: datetime
    generation: int


# Long enough that a worker which stops reading while the database is down (and so does not
# see PINGRESP) rides out a short outage without reconnecting.
KEEPALIVE_S: Final = 60
RECONNECT_MIN_DELAY_S: Final = 0.2
RECONNECT_MAX_DELAY_S: Final = 10.0
# Reads per poll before the worker looks at its batch again; bounds the time between flushes.
MAX_READS_PER_POLL: Final = 2000


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


class Subscriber:
    """One worker's MQTT session and the messages it holds but has not acknowledged."""

    def __init__(self, config: SubscriberConfig) -> None:
        self.config = config
        self.pending: deque[tuple[Inbound, float]] = deque()
        self.unacked = 0
        self.reconnects = 0
        self.connected = False  # connected and subscribed
        self._generation = 0
        self._ever_connected = False
        self._next_attempt = 0.0
        self._delay = RECONNECT_MIN_DELAY_S
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=config.client_id,
            protocol=paho.MQTTv5,
            manual_ack=True,
        )
        self._client.username_pw_set(config.username, config.password)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        self._client.on_pre_connect = self._on_pre_connect

    def _connect_properties(self) -> Properties:
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = self.config.session_expiry_s
        properties.ReceiveMaximum = self.config.receive_maximum
        return properties

    def _on_pre_connect(self, client: paho.Client, userdata: Any) -> None:
        # Messages of the previous connection will be redelivered on this one; their old
        # packet ids must not be acknowledged here, where they may name other messages.
        self._generation += 1
        self.unacked = 0

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            log.error("broker refused the connection: %s", reason)
            return
        self._delay = RECONNECT_MIN_DELAY_S
        if self._ever_connected:
            self.reconnects += 1
        self._ever_connected = True
        log.info(
            "connected to %s:%d as %s (session present: %s)",
            self.config.host,
            self.config.port,
            self.config.client_id,
            flags.session_present,
        )
        # MQTT 5 says shared subscriptions get no retained messages; Mosquitto 2.0 sends them
        # anyway, so on every (re)subscribe the worker would be handed the whole fleet's
        # retained state and presence again. Ingest has already seen them live: say so.
        options = SubscribeOptions(qos=1, retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND)
        client.subscribe([(topic, options) for topic in self.config.topic_filters])

    def _on_subscribe(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        refused = [str(reason) for reason in reasons if reason.is_failure]
        if refused:
            log.error("broker refused the subscription: %s", ", ".join(refused))
            return
        self.connected = True
        log.info("subscribed to %s", ", ".join(self.config.topic_filters))

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason.value == 0:
            log.info("disconnected from the broker")
        elif self.connected:
            log.warning("disconnected from the broker: %s", reason)
        self.connected = False

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        inbound = Inbound(
            topic=message.topic,
            payload=bytes(message.payload),
            mid=message.mid,
            qos=message.qos,
            received_at=datetime.now(UTC),
            generation=self._generation,
        )
        self.pending.append((inbound, time.monotonic()))
        if message.qos > 0:
            self.unacked += 1

    def poll(self, timeout_s: float) -> None:
        """Run the network for up to ``timeout_s``: read, write, keep alive, reconnect."""
        # No socket means never connected, or the connection was lost or refused; a socket
        # without CONNACK yet is a connection in progress, which loop() completes.
        if self._client.socket() is None and not self._try_connect():
            time.sleep(min(timeout_s, max(0.0, self._next_attempt - time.monotonic())))
            return
        if self.full():
            self._hold(timeout_s)
            return
        rc = self._client.loop(timeout=timeout_s)
        reads = 1
        while rc is MQTTErrorCode.MQTT_ERR_SUCCESS and reads < MAX_READS_PER_POLL:
            # loop() reads one packet per select(); once the socket is readable, read on
            # with loop_read() (paho's external-loop API: no select, no write pass) until a
            # read yields no message. Writes and keepalive run on the next loop().
            before = len(self.pending)
            if self.full():
                break
            rc = self._client.loop_read()
            reads += 1
            if len(self.pending) == before:
                break
        if rc is not MQTTErrorCode.MQTT_ERR_SUCCESS:
            self.connected = False

    def full(self) -> bool:
        """Whether the worker holds as many unacknowledged messages as it allows itself."""
        return self.unacked >= self.config.receive_maximum

    def _hold(self, timeout_s: float) -> None:
        # Leave incoming data in the socket: TCP pushes back on the broker, which queues. Keep
        # sending (acknowledgements, pings); if the keepalive lapses because PINGRESP sits
        # unread, loop_misc closes the connection and the next poll reconnects, after which
        # the broker redelivers what was not acknowledged.
        self._client.loop_write()
        if self._client.loop_misc() is not MQTTErrorCode.MQTT_ERR_SUCCESS:
            self.connected = False
        time.sleep(timeout_s)

    def _try_connect(self) -> bool:
        now = time.monotonic()
        if now < self._next_attempt:
            return False
        self._next_attempt = now + self._delay
        self._delay = min(self._delay * 2, RECONNECT_MAX_DELAY_S)
        try:
            self._client.connect(
                self.config.host,
                self.config.port,
                keepalive=KEEPALIVE_S,
                clean_start=False,
                properties=self._connect_properties(),
            )
        except OSError as exc:
            log.warning(
                "cannot reach the broker at %s:%d: %s", self.config.host, self.config.port, exc
            )
            return False
        return True

    def oldest_age_s(self) -> float:
        """Seconds since the oldest pending message arrived (0 when none is pending)."""
        return time.monotonic() - self.pending[0][1] if self.pending else 0.0

    def take(self, limit: int) -> list[Inbound]:
        """Remove and return up to ``limit`` pending messages, oldest first."""
        count = min(limit, len(self.pending))
        return [self.pending.popleft()[0] for _ in range(count)]

    def ack(self, messages: list[Inbound]) -> int:
        """Acknowledge stored messages in arrival order; returns how many were sent.

        Messages that arrived on an earlier connection are skipped: the broker redelivers
        them on this one, and their stored copies make the redelivery a duplicate.
        """
        sent = 0
        for message in messages:
            if message.qos > 0 and message.generation == self._generation:
                self._client.ack(message.mid, message.qos)
                self.unacked -= 1
                sent += 1
        return sent

    def close(self) -> None:
        """Disconnect cleanly; the session (and anything unacknowledged) stays on the broker."""
        if self._client.is_connected():
            self._client.disconnect()
            self._client.loop(timeout=0.1)
