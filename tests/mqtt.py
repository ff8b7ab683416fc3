"""The suite's one synchronous MQTT test client over paho-mqtt 2, for talking to real brokers.

:class:`MqttClient` speaks MQTT 5 (Mosquitto) or 3.1.1 (``protocol=MQTT_311``: NATS's MQTT
gateway refuses 5), publishes and reads the PUBACK, subscribes and collects what arrives.
A refused connection raises :class:`Refused` with the CONNACK's code, in the protocol's own
numbers; :func:`connack_of` gives just that code.

Every listener of the suite's brokers is TLS; :func:`use_suite_ca` (called by the ``pki``
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

TIMEOUT_S = 5.0
# Unacknowledged publishes a client keeps in flight in publish_many (the broker allows 1000).
PUBLISH_WINDOW = 500
# The protocol levels of the CONNECT packet.
MQTT_5 = 5
MQTT_311 = 4
# MQTT 3.1.1 CONNACK return codes (section 3.2.2.3).
CONNACK_ACCEPTED = 0
CONNACK_BAD_CREDENTIALS = 4
CONNACK_NOT_AUTHORIZED = 5
# paho 2 reports a 3.1.1 CONNACK as the MQTT 5 reason its return code maps to
# (_packet.py: convert_connack_rc_to_reason_code); back to 3.1.1's return codes 1..5.
_RETURN_CODE_311 = {0x84: 1, 0x85: 2, 0x88: 3, 0x86: 4, 0x87: 5}


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


class Refused(Exception):
    """The broker refused the CONNECT. ``code``: the CONNACK's MQTT 5 reason code, or its
    MQTT 3.1.1 return code (1..5); -1 when the socket or TLS handshake failed, or the
    connection closed or timed out without a CONNACK (``detail`` says which)."""

    def __init__(self, code: int, detail: str = "") -> None:
        super().__init__(f"CONNACK {code} {detail}".strip())
        self.code = code
        self.detail = detail


@dataclass
class Received:
    """A message a test client received."""

    topic: str
    payload: bytes
    retain: bool


@dataclass
class MqttClient:
    """Connect, publish and read the PUBACK reason, subscribe and collect, over MQTT 5 or
    3.1.1 (``protocol``)."""

    host: str
    port: int
    username: str | None
    password: str | None
    client_id: str = ""
    protocol: int = MQTT_5
    # (topic, payload): a retained QoS 1 last will, as the device agent sets on presence.
    will: tuple[str, bytes] | None = None
    # MQTT 5 only (3.1.1 always starts a clean session): clean_start=False with a session
    # expiry keeps the session (and its subscriptions) in the broker across connections, as
    # the backend workers' sessions are kept.
    clean_start: bool = True
    session_expiry_s: int = 0
    # TLS verifying the broker (the run's CA by default); None connects in plaintext.
    tls: ssl.SSLContext | None = field(default_factory=suite_tls)
    received: list[Received] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.protocol not in (MQTT_5, MQTT_311):
            raise ValueError(f"protocol {self.protocol}: MQTT_5 or MQTT_311")
        v5 = self.protocol == MQTT_5
        if not v5 and (not self.clean_start or self.session_expiry_s):
            raise ValueError("MQTT 3.1.1 clients here always start a clean session")
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
            clean_session=None if v5 else True,
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
        self._connack: int | None = None
        self._puback: dict[int, int] = {}
        self._suback: dict[int, int] = {}
        self._lock = threading.Condition()
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # type: ignore[no-untyped-def]
        code = int(reason_code.value)
        self._connack = code if self.protocol == MQTT_5 else _RETURN_CODE_311.get(code, code)
        self._connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:  # type: ignore[no-untyped-def]
        self._disconnected.set()
        self._connected.set()

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:  # type: ignore[no-untyped-def]
        with self._lock:
            self._puback[mid] = int(reason_code.value)
            self._lock.notify_all()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:  # type: ignore[no-untyped-def]
        with self._lock:
            self._suback[mid] = int(reason_codes[0].value)
            self._lock.notify_all()

    def _on_message(self, client, userdata, message) -> None:  # type: ignore[no-untyped-def]
        with self._lock:
            self.received.append(Received(message.topic, message.payload, message.retain))
            self._lock.notify_all()

    def connect(self, timeout_s: float = TIMEOUT_S) -> "MqttClient":
        """Connect, or raise :class:`Refused` with the CONNACK's code (-1 without one)."""
        try:
            if self.protocol == MQTT_5:
                properties = Properties(PacketTypes.CONNECT)
                properties.SessionExpiryInterval = self.session_expiry_s
                self._client.connect(
                    self.host,
                    self.port,
                    keepalive=30,
                    clean_start=self.clean_start,
                    properties=properties,
                )
            else:
                self._client.connect(self.host, self.port, keepalive=30)
        except OSError as exc:
            raise Refused(-1, str(exc)) from exc
        self._client.loop_start()
        if not self._connected.wait(timeout_s):
            self.close()
            raise Refused(-1, "timeout")
        code = self._connack
        if code != 0:
            self.close()
            raise Refused(-1, "closed without a CONNACK") if code is None else Refused(code)
        return self

    @property
    def connected(self) -> bool:
        """Whether the session is still up."""
        return self._client.is_connected()

    def wait_disconnected(self, timeout_s: float = TIMEOUT_S) -> bool:
        """Whether the connection closed within ``timeout_s``."""
        return self._disconnected.wait(timeout_s)

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        timeout_s: float = TIMEOUT_S,
    ) -> int:
        """Publish; at QoS 1 wait for the PUBACK and return its reason code (0 or 16 mean
        accepted; always 0 in 3.1.1, which has none), at QoS 0 return 0 once sent.
        TimeoutError when that does not happen within ``timeout_s``."""
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        with self._lock:
            if not self._lock.wait_for(lambda: info.mid in self._puback, timeout_s):
                raise TimeoutError(f"no PUBACK for {topic} within {timeout_s} s")
            return self._puback[info.mid]

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
            return [self._puback[info.mid] for info in infos]

    def subscribe(self, topic: str, qos: int = 1) -> int:
        """Subscribe and return the SUBACK's code (the granted QoS; 0x80 and above: refused)."""
        _, mid = self._client.subscribe(topic, qos=qos)
        with self._lock:
            if not self._lock.wait_for(lambda: mid in self._suback, TIMEOUT_S):
                raise TimeoutError(f"no SUBACK for {topic}")
            return self._suback[mid]

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

    def messages(self, topic: str) -> list[Received]:
        """Every message received on ``topic`` so far."""
        with self._lock:
            return [m for m in self.received if m.topic == topic]

    def drop(self) -> None:
        """Close the socket without DISCONNECT, as a device losing power would (its will
        fires)."""
        self._client.loop_stop()
        sock = self._client.socket()
        if sock is not None:
            sock.close()
        self._release_sockpair()

    def close(self) -> None:
        """Disconnect cleanly and stop the network thread."""
        self._client.disconnect()
        self._client.loop_stop()
        self._release_sockpair()

    def _release_sockpair(self) -> None:
        # paho 2.x closes the wake-up socket pair loop_start() opened only on a later
        # reconnect; left to the garbage collector it surfaces as a ResourceWarning (an error
        # under filterwarnings) in whichever test happens to collect it.
        self._client._reset_sockets(sockpair_only=True)


def connack_of(
    port: int,
    client_id: str,
    username: str | None,
    password: str | None,
    *,
    host: str = "127.0.0.1",
    protocol: int = MQTT_311,
) -> int:
    """The CONNACK code a CONNECT with these credentials gets (0 = accepted; -1 = none)."""
    client = MqttClient(host, port, username, password, client_id=client_id, protocol=protocol)
    try:
        client.connect()
    except Refused as refused:
        return refused.code
    client.close()
    return CONNACK_ACCEPTED


__all__ = [
    "CONNACK_ACCEPTED",
    "CONNACK_BAD_CREDENTIALS",
    "CONNACK_NOT_AUTHORIZED",
    "MQTT_5",
    "MQTT_311",
    "MqttClient",
    "Properties",
    "Received",
    "Refused",
    "connack_of",
]
