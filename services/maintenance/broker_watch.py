"""Mosquitto's own statistics (``$SYS``) as Prometheus metrics on the maintenance endpoint.

The broker publishes its statistics on ``$SYS/broker/...`` every ``sys_interval`` seconds, each
value only when it changed since the last interval (``uptime`` every time), retained with a
60 s message expiry (Mosquitto 2.0.11, ``src/sys_tree.c``). The watch subscribes to the few
that tell whether the backend keeps up, keeps the last value of each, and serves them from a
custom collector:

* ``galvani_broker_messages_dropped_total`` is ``$SYS/broker/publish/messages/dropped``: the
  copies of a PUBLISH the broker did not queue for a subscriber because that subscriber's
  queue was full (``max_queued_messages`` / ``max_queued_bytes``; ``db__message_insert`` in
  ``src/database.c``; deploy/prometheus/README.md says exactly what it counts). It is the
  broker's own cumulative count, so it is exported as a counter that starts again from 0 when
  the broker restarts, which Prometheus' ``increase()`` reads as a counter reset.
* gauges for connected clients, offline sessions, subscriptions (shared ones apart: Mosquitto
  2.0 does not restore those after a restart), stored messages and bytes, and uptime;
* ``galvani_broker_watch_connected``: 1 while the watch is connected and subscribed, and
  ``galvani_broker_watch_last_message_timestamp_seconds``: when the last statistic arrived.
  The second catches what the first cannot: Mosquitto 2.0.11 grants every subscription and
  applies the ACL file to each delivery only (``src/security_default.c``), so a watch whose
  account may not read ``$SYS`` is subscribed and hears nothing. ``uptime`` comes every
  ``sys_interval``, so a silence of a minute means the values are not current.

Values are the last the broker published; the two ``galvani_broker_watch_*`` gauges say
whether they are current. Because a value is published only when it changes and its retained
copy expires after 60 s, a watch that connects to a broker whose value has not changed for a
minute learns it only at the next change; until then that metric is absent rather than
guessed. A smaller ``$SYS/broker/uptime`` than the last one means the broker restarted: every
kept value is then forgotten, since each belonged to the broker that is gone.
"""

import logging
import os
import ssl
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

UPTIME_TOPIC: Final = "$SYS/broker/uptime"
DROPPED_TOPIC: Final = "$SYS/broker/publish/messages/dropped"
RECONNECT_MIN_DELAY_S: Final = 1
RECONNECT_MAX_DELAY_S: Final = 30
KEEPALIVE_S: Final = 30
# How long the network thread waits on the socket at a time, and so how long close() may wait
# for it: without loop_start()'s wake-up socket pair, nothing interrupts that wait.
LOOP_TIMEOUT_S: Final = 0.25
STOP_TIMEOUT_S: Final = 5.0
# Statistics are a few short strings; anything longer is not one of them.
MAX_PAYLOAD_BYTES: Final = 64


@dataclass(frozen=True)
class BrokerGauge:
    """One ``$SYS`` value exported as a gauge."""

    topic: str
    name: str
    documentation: str


GAUGES: Final = (
    BrokerGauge(UPTIME_TOPIC, "galvani_broker_uptime_seconds", "Seconds since the broker started"),
    BrokerGauge(
        "$SYS/broker/clients/connected",
        "galvani_broker_clients_connected",
        "Clients connected to the broker (devices and backend)",
    ),
    BrokerGauge(
        "$SYS/broker/clients/disconnected",
        "galvani_broker_clients_disconnected",
        "Persistent sessions whose client is not connected; their QoS 1 messages queue",
    ),
    BrokerGauge(
        "$SYS/broker/subscriptions/count",
        "galvani_broker_subscriptions",
        "Subscriptions the broker holds, shared ones included",
    ),
    BrokerGauge(
        "$SYS/broker/shared_subscriptions/count",
        "galvani_broker_shared_subscriptions",
        "Shared subscriptions (ingest and rules workers); none survive a broker restart",
    ),
    BrokerGauge(
        "$SYS/broker/store/messages/count",
        "galvani_broker_stored_messages",
        "Messages in the broker's store: queued for sessions, in flight, or retained",
    ),
    BrokerGauge(
        "$SYS/broker/store/messages/bytes",
        "galvani_broker_stored_bytes",
        "Payload bytes of the messages in the broker's store",
    ),
)
# Uptime first: Mosquitto sends the retained messages of one SUBSCRIBE filter by filter, in
# order (src/handle_subscribe.c), so a restart is noticed before the new broker's values land.
TOPICS: Final = (*(gauge.topic for gauge in GAUGES), DROPPED_TOPIC)


def parse_value(payload: bytes) -> float | None:
    """The number a ``$SYS`` payload carries (``uptime`` reads ``"<n> seconds"``), or None."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        return None
    words = payload.split()
    if not words:
        return None
    try:
        return float(int(words[0]))
    except ValueError:
        return None


class BrokerStats:
    """The broker's latest statistics as the watch received them; safe across threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, float] = {}
        self._connected = False
        self._last_message_at = 0.0  # time.time(); 0 until the first statistic

    @property
    def connected(self) -> bool:
        """Whether the watch is connected and subscribed."""
        with self._lock:
            return self._connected

    def set_connected(self, connected: bool) -> None:
        """Record whether the watch is connected and subscribed."""
        with self._lock:
            self._connected = connected

    def forget(self) -> None:
        """Drop every value kept: on a new connection they may describe a broker that has
        since restarted (its uptime going back is noticed only while connected)."""
        with self._lock:
            self._values.clear()

    def update(self, topic: str, payload: bytes) -> None:
        """Keep the value ``payload`` carries for ``topic``; a malformed one is logged."""
        value = parse_value(payload)
        if value is None:
            log.warning("unexpected payload on %s: %r", topic, payload[:MAX_PAYLOAD_BYTES])
            return
        with self._lock:
            self._last_message_at = time.time()
            if topic == UPTIME_TOPIC:
                previous = self._values.get(UPTIME_TOPIC)
                if previous is not None and value < previous:
                    # A broker's uptime only grows: this is a new broker, and every value kept
                    # (the dropped count above all) described the one before it.
                    self._values.clear()
                    log.info("the broker restarted (uptime %.0f s, was %.0f s)", value, previous)
            self._values[topic] = value

    def value(self, topic: str) -> float | None:
        """The last value received on ``topic`` from the current broker."""
        with self._lock:
            return self._values.get(topic)

    def snapshot(self) -> tuple[bool, float, dict[str, float]]:
        """Whether connected, when the last statistic arrived, and every known value by topic,
        read together."""
        with self._lock:
            return self._connected, self._last_message_at, dict(self._values)


class BrokerCollector(Collector):
    """Serves :class:`BrokerStats` at each scrape."""

    def __init__(self, stats: BrokerStats) -> None:
        self.stats = stats

    def collect(self) -> Iterable[Metric]:
        """The broker's metrics as last received."""
        connected, last_message_at, values = self.stats.snapshot()
        yield GaugeMetricFamily(
            "galvani_broker_watch_connected",
            "1 while maintenance is connected to the broker and subscribed to its statistics",
            value=1 if connected else 0,
        )
        yield GaugeMetricFamily(
            "galvani_broker_watch_last_message_timestamp_seconds",
            "When the last of the broker's statistics arrived (Unix time; 0: none yet)",
            value=last_message_at,
        )
        dropped = values.get(DROPPED_TOPIC)
        if dropped is not None:
            yield CounterMetricFamily(
                "galvani_broker_messages_dropped",
                "Messages the broker did not queue for a subscriber whose queue was full "
                "(max_queued_messages, max_queued_bytes), counted per subscriber since the "
                "broker started ($SYS/broker/publish/messages/dropped)",
                value=dropped,
            )
        for gauge in GAUGES:
            value = values.get(gauge.topic)
            if value is not None:
                yield GaugeMetricFamily(gauge.name, gauge.documentation, value=value)


@dataclass(frozen=True)
class BrokerAddress:
    """Where the watch connects, and as whom."""

    host: str
    port: int
    username: str
    password: str
    tls: ssl.SSLContext | None  # verification on; None only for a plaintext listener


class BrokerWatch:
    """A broker client on a network thread of its own that keeps :class:`BrokerStats` current.

    The thread runs paho's ``loop_forever``, which reconnects with backoff. ``loop_start`` would
    do the same but opens a socket pair that ``loop_stop`` leaves open (paho-mqtt 2.x).
    """

    def __init__(self, address: BrokerAddress, stats: BrokerStats) -> None:
        self.address = address
        self.stats = stats
        # Clean start, no session: nothing is queued for the watch while it is away (each value
        # comes back retained, or at its next change). The pid keeps two maintenance processes
        # from taking over each other's connection (Mosquitto keys sessions by client id).
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"{address.username}-{os.getpid()}",
            protocol=paho.MQTTv5,
        )
        self._client.username_pw_set(address.username, address.password)
        if address.tls is not None:
            self._client.tls_set_context(address.tls)
        self._client.reconnect_delay_set(RECONNECT_MIN_DELAY_S, RECONNECT_MAX_DELAY_S)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._client.on_disconnect = self._on_disconnect
        self._thread = threading.Thread(
            target=self._client.loop_forever,
            kwargs={"timeout": LOOP_TIMEOUT_S, "retry_first_connection": True},
            name="broker-watch",
            daemon=True,
        )

    def start(self) -> None:
        """Connect (and reconnect, with backoff) on the watch's network thread."""
        log.info(
            "watching the broker's statistics at %s:%d as %s",
            self.address.host,
            self.address.port,
            self.address.username,
        )
        self._client.connect_async(self.address.host, self.address.port, keepalive=KEEPALIVE_S)
        self._thread.start()

    def close(self) -> None:
        """Disconnect and stop the network thread."""
        self._client.disconnect()
        self._thread.join(STOP_TIMEOUT_S)
        self.stats.set_connected(False)

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            # paho tries again after its backoff; a wrong password stays wrong, and says so.
            log.warning("the broker refused the watch's connection: %s", reason)
            return
        self.stats.forget()
        client.subscribe([(topic, 0) for topic in TOPICS])

    def _on_subscribe(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        if len(reasons) != len(TOPICS):
            log.error("the broker answered %d filters with %d codes", len(TOPICS), len(reasons))
            return
        refused = [topic for topic, r in zip(TOPICS, reasons, strict=True) if r.is_failure]
        if refused:
            log.error("the broker refused the watch's subscriptions to %s", ", ".join(refused))
            return
        self.stats.set_connected(True)
        log.info("subscribed to the broker's statistics")

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        self.stats.update(message.topic, bytes(message.payload))

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if self.stats.connected:
            log.warning("the watch lost the broker: %s; reconnecting", reason)
        self.stats.set_connected(False)
