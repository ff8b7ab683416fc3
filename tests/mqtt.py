"""A small synchronous MQTT 5 test client over paho-mqtt 2, for talking to the real broker.

Every listener of the suite's broker is TLS; :func:`use_suite_ca` (called by the ``pki``
fixture) makes every client of the run verify the broker against the suite's CA unless a
test passes its own ``tls`` (None for plaintext).
"""

import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

TIMEOUT_S = 5.0
# Unacknowledged publishes a client keeps in flight in publish_many (the broker allows 1000).
PUBLISH_WINDOW = 500


_suite: dict[str, object] = {}


def use_suite_ca(ca_file: Path, context: ssl.SSLContext) -> None:
    """Make ``context`` (trusting ``ca_file``) every client's default for this run."""
    _suite["ca_file"] = ca_file
    _suite["context"] = context


def suite_tls() -> ssl.SSLContext | None:
    """The run's client TLS context (None before the ``pki`` fixture has run)."""
    context = _suite.get("context")
    return context if isinstance(context, ssl.SSLContext) else None


def suite_ca_file() -> Path | None:
    """The CA file every client of the run trusts (None before the ``pki`` fixture)."""
    ca_file = _suite.get("ca_file")
    return ca_file if isinstance(ca_file, Path) else None


class ConnectRefused(Exception):
    """The broker refused the connection."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class Received:
    """A message a test client received."""

    topic: str
    payload: bytes
    retain: bool


@dataclass
class MqttClient:
    """Connect, publish at QoS 1 and read the PUBACK reason, subscribe and collect."""

    host: str
    port: int
    username: str | None
    password: str | None
    client_id: str = ""
    will: tuple[str, bytes] | None = None
    # clean_start=False with a session expiry keeps the session (and its subscriptions) in
    # the broker across connections, as the backend workers' sessions are kept.
    clean_start: bool = True
    session_expiry_s: int = 0
    # TLS verifying the broker (the run's CA by default); None connects in plaintext.
    tls: ssl.SSLContext | None = field(default_factory=suite_tls)
    received: list[Received] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=paho.MQTTv5
        )
        self._client.max_inflight_messages_set(PUBLISH_WINDOW)
        if self.tls is not None:
            self._client.tls_set_context(self.tls)
        if self.username is not None:
            self._client.username_pw_set(self.username, self.password)
        if self.will is not None:
            self._client.will_set(self.will[0], self.will[1], qos=1, retain=True)
        self._connected = threading.Event()
        self._disconnected = threading.Event()
        self._connect_reason: ReasonCode | None = None
        self._puback: dict[int, ReasonCode] = {}
        self._suback: dict[int, list[ReasonCode]] = {}
        self._lock = threading.Condition()
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # type: ignore[no-untyped-def]
        self._connect_reason = reason_code
        self._connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:  # type: ignore[no-untyped-def]
        self._disconnected.set()
        self._connected.set()

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:  # type: ignore[no-untyped-def]
        with self._lock:
            self._puback[mid] = reason_code
            self._lock.notify_all()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:  # type: ignore[no-untyped-def]
        with self._lock:
            self._suback[mid] = list(reason_codes)
            self._lock.notify_all()

    def _on_message(self, client, userdata, message) -> None:  # type: ignore[no-untyped-def]
        with self._lock:
            self.received.append(Received(message.topic, message.payload, message.retain))
            self._lock.notify_all()

    def connect(self) -> "MqttClient":
        """Connect or raise :class:`ConnectRefused` with the broker's reason."""
        try:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = self.session_expiry_s
            self._client.connect(
                self.host,
                self.port,
                keepalive=30,
                clean_start=self.clean_start,
                properties=properties,
            )
        except OSError as exc:
            raise ConnectRefused(str(exc)) from exc
        self._client.loop_start()
        if not self._connected.wait(TIMEOUT_S):
            self.close()
            raise ConnectRefused("timeout")
        reason = self._connect_reason
        if reason is None or reason.is_failure:
            self.close()
            raise ConnectRefused(str(reason))
        return self

    @property
    def connected(self) -> bool:
        """Whether the session is still up."""
        return self._client.is_connected()

    def wait_disconnected(self, timeout_s: float = TIMEOUT_S) -> bool:
        """Whether the broker closed the connection within ``timeout_s``."""
        return self._disconnected.wait(timeout_s)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> int:
        """Publish at QoS 1 and return the PUBACK reason code (0 or 16 mean accepted)."""
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        with self._lock:
            if not self._lock.wait_for(lambda: info.mid in self._puback, TIMEOUT_S):
                raise TimeoutError(f"no PUBACK for {topic}")
            return int(self._puback[info.mid].value)

    def publish_many(
        self, messages: list[tuple[str, bytes]], timeout_s: float = 120.0
    ) -> list[int]:
        """Publish at QoS 1 without waiting in between; return every PUBACK reason code."""
        infos = [self._client.publish(topic, payload, qos=1) for topic, payload in messages]
        deadline = time.monotonic() + timeout_s
        for info in infos:
            info.wait_for_publish(max(0.0, deadline - time.monotonic()))
            if not info.is_published():
                raise TimeoutError(f"no PUBACK for message {info.mid}")
        with self._lock:
            return [int(self._puback[info.mid].value) for info in infos]

    def subscribe(self, topic: str) -> int:
        """Subscribe at QoS 1 and return the SUBACK reason code."""
        _, mid = self._client.subscribe(topic, qos=1)
        with self._lock:
            if not self._lock.wait_for(lambda: mid in self._suback, TIMEOUT_S):
                raise TimeoutError(f"no SUBACK for {topic}")
            return int(self._suback[mid][0].value)

    def wait_for(self, topic: str, timeout_s: float = TIMEOUT_S) -> Received | None:
        """The first message received on ``topic`` within ``timeout_s``, or None."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while True:
                for message in self.received:
                    if message.topic == topic:
                        return message
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._lock.wait(remaining)

    def drop(self) -> None:
        """Close the socket without DISCONNECT, as a device losing power would."""
        self._client.loop_stop()
        sock = self._client.socket()
        if sock is not None:
            sock.close()

    def close(self) -> None:
        """Disconnect cleanly and stop the network thread."""
        self._client.disconnect()
        self._client.loop_stop()
        # paho 2.x closes the wake-up socket pair loop_start() opened only on a later
        # reconnect; left to the garbage collector it surfaces as a ResourceWarning (an error
        # under filterwarnings) in whichever test happens to collect it.
        self._client._reset_sockets(sockpair_only=True)


__all__ = ["ConnectRefused", "MqttClient", "Properties", "Received"]
