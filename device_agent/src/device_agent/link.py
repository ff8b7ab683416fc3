"""One device's MQTT connection, run on an asyncio loop without a thread of its own.

paho-mqtt's client is driven through its external-loop hooks (``on_socket_open`` and
friends, as in paho's ``loop_asyncio`` example), so one process can hold thousands of
devices' connections without a thread each.

The outbox in the :class:`~device_agent.store.DeviceStore` is the only copy of what is not
yet delivered: a message leaves it when the broker's PUBACK arrives, never before. Each
connection attempt uses a fresh paho client with a clean start, and publishes the outbox from
its oldest message, so after an outage everything buffered goes out in ``seq`` order (a
message already delivered before the PUBACK was lost is sent again and the backend stores it
once, by ``(device_id, seq)``).
"""

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from device_agent.protocol import PROTOCOL_VERSION, Channel, topic
from device_agent.store import DeviceStore

log = logging.getLogger("galvani.agent.link")

KEEPALIVE_S: Final = 60
CONNECT_TIMEOUT_S: Final = 5.0
BACKOFF_MIN_S: Final = 1.0
BACKOFF_MAX_S: Final = 60.0
# Messages handed to paho before their PUBACKs: Mosquitto's default max_inflight_messages.
PUBLISH_WINDOW: Final = 20


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
    delivered: int = 0
    refused: int = 0
    last_delivery_s: float | None = None  # time.monotonic() of the last PUBACK


class Link:
    """The device's connection: reconnects with backoff, publishes the outbox, takes config."""

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
    ) -> None:
        self.device_id = device_id
        self.address = address
        self.store = store
        self.on_config = on_config
        self.loop = loop
        self.rng = rng
        self.backoff_max_s = backoff_max_s
        self.stats = LinkStats()
        self.connected = False
        self._client: mqtt.Client | None = None
        self._attempt = 0
        self._retry: asyncio.TimerHandle | None = None
        self._stopping = False
        self._inflight: dict[int, int] = {}  # paho mid -> outbox id
        self._fed_up_to = 0  # highest outbox id handed to paho on this connection
        self._looked_at = -1  # store.enqueued when pump last read the outbox
        self._config_topic = topic(device_id, Channel.CONFIG)
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
        client = self._client
        if client is not None and self.connected:
            client.publish(self._presence_topic, _presence(False), qos=1, retain=True)
            client.disconnect()
        elif client is not None:
            self._drop_client()

    def service(self) -> None:
        """Keepalive and timeouts; call at least once a second."""
        if self._client is not None:
            self._client.loop_misc()

    def pump(self, *, force: bool = False) -> None:
        """Hand paho the next outbox messages while the window has room.

        Without ``force`` it looks at the outbox only if something was enqueued since the
        last look; PUBACKs and new connections force a look.
        """
        client = self._client
        room = PUBLISH_WINDOW - len(self._inflight)
        if client is None or not self.connected or room <= 0:
            return
        if not force and self.store.enqueued == self._looked_at:
            return
        self._looked_at = self.store.enqueued
        for message in self.store.pending(after_id=self._fed_up_to, limit=room):
            info = client.publish(
                topic(self.device_id, message.channel),
                message.payload,
                qos=1,
                retain=message.retain,
            )
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                break  # the connection is going away; the next one starts from the outbox
            self._inflight[info.mid] = message.id
            self._fed_up_to = message.id

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
        self._inflight.clear()
        self._fed_up_to = 0
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
        self.connected = False
        self._inflight.clear()
        if client is not None:
            sock = client.socket()
            if sock is not None:
                self._forget_socket(sock)
            client.on_socket_close = None
            client.on_disconnect = None
            client.disconnect()  # closes the socket if paho still holds one

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
        client.subscribe(self._config_topic, qos=1)
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
        self.connected = False
        self._inflight.clear()
        self._schedule_reconnect()

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        outbox_id = self._inflight.pop(mid, None)
        if outbox_id is None:
            return  # presence: not from the outbox
        if reason.is_failure:
            # The broker answered and will never take it (e.g. 0x87, not authorized):
            # keeping it would block everything behind it forever.
            self.stats.refused += 1
            log.error("%s: broker refused outbox message %d: %s", self.device_id, outbox_id, reason)
        else:
            self.stats.delivered += 1
            self.stats.last_delivery_s = time.monotonic()
        self.store.ack([outbox_id])
        self.pump(force=True)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if message.topic == self._config_topic and message.payload:
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
