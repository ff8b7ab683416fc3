"""The Subscriber's network behaviour against a scripted broker on a loopback port.

The test plays the broker's side byte by byte, so it decides exactly what arrives and when:
splits, bursts, refusals, take-overs, silence. The scripted broker needs no thread: the
kernel completes the client's TCP handshake from the listen backlog, and every wait on the
broker's side polls the subscriber, so the two ends take turns in one thread and each test
runs in the same order every time. Against a real Mosquitto: test_ingest*.py, test_rules_live.py.
"""

import logging
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple, Protocol

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties, VariableByteIntegers

from deploy.stack.mosquitto import MAX_PACKET_BYTES
from services.common import broker_session as session_module
from services.common import mqtt5, pki
from services.common import subscriber as subscriber_module
from services.common.subscriber import Inbound, Subscriber, SubscriberConfig
from services.common.tls import client_context, server_context

WAIT_S = 2.0
POLL_S = 0.05
TOPIC_FILTER = "$share/g/a/+"
OTHER_FILTER = "$share/g/b/+"

PINGRESP = b"\xd0\x00"
SUBACK_GRANTED = b"\x90\x04\x00\x01\x00\x01"  # packet id 1, no properties, QoS 1 granted


class Packet(NamedTuple):
    """One packet the client sent: its first byte (type and flags) and its body."""

    first: int
    body: bytes


PINGREQ = Packet(0xC0, b"")
DISCONNECT = Packet(0xE0, b"")  # reason code 0x00 (normal), left out as 3.14.2.1 allows


def disconnect_with(reason: int) -> Packet:
    """The DISCONNECT a client sends to say why it closes: the reason code, no properties."""
    return Packet(0xE0, bytes((reason,)))


def packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + VariableByteIntegers.encode(len(body)) + body


def utf8(text: str) -> bytes:
    data = text.encode()
    return len(data).to_bytes(2, "big") + data


def publish(topic: str, payload: bytes, mid: int, qos: int = 1) -> bytes:
    """PUBLISH without properties; ``mid`` is left out at QoS 0."""
    packet_id = mid.to_bytes(2, "big") if qos else b""
    return packet(0x30 | qos << 1, utf8(topic) + packet_id + b"\x00" + payload)


def connack(
    reason: int = 0,
    *,
    session_present: bool = False,
    keepalive_s: int = 0,
    maximum_packet_size: int = 0,
) -> bytes:
    properties = Properties(PacketTypes.CONNACK)
    if keepalive_s:
        properties.ServerKeepAlive = keepalive_s
    if maximum_packet_size:
        properties.MaximumPacketSize = maximum_packet_size
    return packet(0x20, bytes((int(session_present), reason)) + properties.pack())


def disconnect(reason: int, reason_string: str) -> bytes:
    properties = Properties(PacketTypes.DISCONNECT)
    properties.ReasonString = reason_string
    return packet(0xE0, bytes((reason,)) + properties.pack())


def suback(*reasons: int) -> bytes:
    """SUBACK for packet id 1, no properties, one reason code per argument."""
    return packet(0x90, b"\x00\x01\x00" + bytes(reasons))


def puback(mid: int) -> Packet:
    return Packet(0x40, mid.to_bytes(2, "big"))


def run_until(sub: Subscriber, condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {WAIT_S:g} s: {what}")
        sub.poll(POLL_S)


def run_for(sub: Subscriber, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        sub.poll(POLL_S)


class Peer:
    """The broker's end of one connection. Every wait polls the subscriber, so it runs."""

    def __init__(self, conn: socket.socket, sub: Subscriber) -> None:
        conn.setblocking(False)
        # Each write leaves at once, as the test wrote it, not held back by Nagle's algorithm.
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.conn = conn
        self.sub = sub
        self.sub_closed = False
        self.inbox = bytearray()
        self.eof = False

    def close_subscriber(self) -> None:
        """Close the subscriber and stop polling it: a poll would connect it again."""
        self.sub.close()
        self.sub_closed = True

    def send(self, data: bytes) -> None:
        """Write ``data`` in one write (as far as the socket takes it)."""
        view = memoryview(data)
        while view:
            try:
                view = view[self.conn.send(view) :]
            except BlockingIOError:
                self._turn()

    def send_in_pieces(self, data: bytes, size: int) -> None:
        """Write ``data`` ``size`` bytes at a time, letting the subscriber read each piece."""
        for start in range(0, len(data), size):
            self.send(data[start : start + size])
            self._turn()

    def read_packet(self, timeout_s: float = WAIT_S) -> Packet:
        deadline = time.monotonic() + timeout_s
        while True:
            self._receive()
            if (taken := self._take_packet()) is not None:
                return taken
            if self.eof:
                pytest.fail("the client closed the connection instead of sending a packet")
            if time.monotonic() > deadline:
                pytest.fail(f"no packet from the client within {timeout_s:g} s")
            self._turn()

    def wait_closed(self, timeout_s: float = WAIT_S) -> None:
        """Wait until the client closes the connection, having sent nothing more."""
        deadline = time.monotonic() + timeout_s
        self._receive()
        while not self.eof:
            if time.monotonic() > deadline:
                pytest.fail(f"the client kept the connection open for {timeout_s:g} s")
            self._turn()
            self._receive()
        assert not self.inbox, f"unexpected bytes before the close: {bytes(self.inbox)!r}"

    def expect_silence(self, seconds: float) -> None:
        """The client sends nothing and keeps the connection open for ``seconds``."""
        run_for(self.sub, seconds)
        self._receive()
        assert not self.inbox, f"unexpected bytes: {bytes(self.inbox)!r}"
        assert not self.eof, "the client closed the connection"

    def _turn(self) -> None:
        if self.sub_closed:
            time.sleep(0.01)
        else:
            self.sub.poll(POLL_S)

    def _receive(self) -> None:
        while not self.eof:
            try:
                data = self.conn.recv(65536)
            except BlockingIOError:
                return
            self.eof = not data
            self.inbox += data

    def _take_packet(self) -> Packet | None:
        length = shift = 0
        for at in range(1, min(len(self.inbox), 5)):
            length |= (self.inbox[at] & 0x7F) << shift
            shift += 7
            if self.inbox[at] < 0x80:
                end = at + 1 + length
                if len(self.inbox) < end:
                    return None
                taken = Packet(self.inbox[0], bytes(self.inbox[at + 1 : end]))
                del self.inbox[:end]
                return taken
        return None


class ScriptedBroker:
    """A listening socket on a free loopback port; the test accepts and scripts each peer."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.setblocking(False)
        self.port: int = self.listener.getsockname()[1]
        self.peers: list[Peer] = []

    def accept(self, sub: Subscriber, timeout_s: float = WAIT_S) -> Peer:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                conn, _ = self.listener.accept()
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail(f"the client did not connect within {timeout_s:g} s")
                sub.poll(POLL_S)
                continue
            self.peers.append(Peer(conn, sub))
            return self.peers[-1]

    def accept_connect(self, sub: Subscriber, timeout_s: float = WAIT_S) -> Peer:
        """The next connection, its CONNECT read and checked."""
        peer = self.accept(sub, timeout_s)
        assert peer.read_packet() == connect_packet(sub)
        return peer

    def handshake(
        self,
        sub: Subscriber,
        *,
        keepalive_s: int = 0,
        session_present: bool = False,
        maximum_packet_size: int = 0,
    ) -> Peer:
        """The next connection through CONNACK, SUBSCRIBE and SUBACK."""
        peer = self.accept_connect(sub)
        peer.send(
            connack(
                keepalive_s=keepalive_s,
                session_present=session_present,
                maximum_packet_size=maximum_packet_size,
            )
        )
        filters = sub.config.topic_filters
        assert peer.read_packet() == subscribe_packet(filters)
        peer.send(suback(*[mqtt5.GRANTED_QOS_1] * len(filters)))
        run_until(sub, lambda: sub.connected, "connected after SUBACK")
        return peer

    def close(self) -> None:
        for peer in self.peers:
            peer.conn.close()
        self.listener.close()


def connect_packet(sub: Subscriber) -> Packet:
    """The CONNECT this subscriber must send (its encoding is tested in test_mqtt5)."""
    config = sub.config
    first, body = split(
        mqtt5.connect(
            config.client_id,
            config.username,
            config.password,
            keepalive_s=session_module.KEEPALIVE_S,
            session_expiry_s=config.session_expiry_s,
            receive_maximum=config.receive_maximum,
            maximum_packet_size=session_module.MAXIMUM_PACKET_SIZE_BYTES,
        )
    )
    return Packet(first, body)


def subscribe_packet(filters: tuple[str, ...] = (TOPIC_FILTER,)) -> Packet:
    return Packet(0x82, b"\x00\x01\x00" + b"".join(utf8(f) + b"\x21" for f in filters))


def split(data: bytes) -> tuple[int, bytes]:
    length, used = VariableByteIntegers.decode(data[1:])
    assert len(data) == 1 + used + length
    return data[0], data[1 + used :]


@pytest.fixture
def broker() -> Iterator[ScriptedBroker]:
    scripted = ScriptedBroker()
    yield scripted
    scripted.close()


def no_jitter() -> float:
    """A draw that takes nothing off a reconnect delay, so timings are the backoff's own."""
    return 0.0


class NewSubscriber(Protocol):
    def __call__(
        self,
        receive_maximum: int = 16,
        *,
        topic_filters: tuple[str, ...] = (TOPIC_FILTER,),
        draw: Callable[[], float] = no_jitter,
    ) -> Subscriber: ...


@pytest.fixture
def new_subscriber(broker: ScriptedBroker) -> Iterator[NewSubscriber]:
    """Subscribers of the scripted broker with a given receive maximum, closed at the end."""
    made: list[Subscriber] = []

    def make(
        receive_maximum: int = 16,
        *,
        topic_filters: tuple[str, ...] = (TOPIC_FILTER,),
        draw: Callable[[], float] = no_jitter,
    ) -> Subscriber:
        config = SubscriberConfig(
            host="127.0.0.1",
            port=broker.port,
            username="u",
            password="p",
            client_id="c",
            topic_filters=topic_filters,
            receive_maximum=receive_maximum,
            session_expiry_s=3600,
            tls=None,
        )
        made.append(Subscriber(config, draw=draw))
        return made[-1]

    yield make
    for sub in made:
        sub.close()


def message_of(item: Inbound) -> tuple[str, bytes, int, int]:
    return item.topic, item.payload, item.qos, item.mid


# Connecting


def test_connect_keeps_the_session_and_carries_the_credentials_then_subscribes(
    broker: ScriptedBroker, new_subscriber: NewSubscriber
) -> None:
    sub = new_subscriber(7)
    peer = broker.accept(sub)

    sent = peer.read_packet()
    assert sent.first == 0x10
    assert sent.body[:8] == b"\x00\x04MQTT\x05\xc0"  # MQTT 5; user name, password, no clean start
    assert sent.body.endswith(utf8("c") + utf8("u") + utf8("p"))
    assert sent == connect_packet(sub)  # session expiry 3600, receive maximum 7
    peer.expect_silence(0.1)  # nothing more before the CONNACK

    peer.send(connack())
    assert peer.read_packet() == subscribe_packet()
    assert not sub.connected

    peer.send(SUBACK_GRANTED)
    run_until(sub, lambda: sub.connected, "connected after SUBACK")
    assert sub.stats.reconnects == 0


def test_connect_carries_maximum_packet_size(
    broker: ScriptedBroker, new_subscriber: NewSubscriber
) -> None:
    sub = new_subscriber(16)
    peer = broker.accept(sub)

    sent = peer.read_packet()

    # Protocol name (6 bytes), version, flags and keep alive (4) come before the properties.
    properties, _ = Properties(PacketTypes.CONNECT).unpack(sent.body[10:])
    assert properties.MaximumPacketSize == 512 * 1024
    assert properties.MaximumPacketSize == session_module.MAXIMUM_PACKET_SIZE_BYTES
    # Whatever the broker took from a device still reaches the worker, with room for the
    # packet id and properties it gains on the way.
    assert properties.MaximumPacketSize >= MAX_PACKET_BYTES + 1024
    # A packet over the limit cannot arrive whole in one read with a few header bytes left
    # from the read before: the subscriber checks only incomplete packets.
    assert properties.MaximumPacketSize > session_module.READ_SIZE + 5


def test_a_refused_connection_is_closed_and_tried_again_after_a_delay(
    broker: ScriptedBroker, new_subscriber: NewSubscriber
) -> None:
    started = time.monotonic()
    sub = new_subscriber(16)
    peer = broker.accept_connect(sub)

    peer.send(connack(0x86))  # bad user name or password

    peer.wait_closed()
    assert not sub.connected
    again = broker.accept_connect(sub)
    assert time.monotonic() - started >= session_module.RECONNECT_MIN_DELAY_S
    again.send(connack())
    assert again.read_packet() == subscribe_packet()
    again.send(SUBACK_GRANTED)
    run_until(sub, lambda: sub.connected, "connected on the second attempt")
    assert sub.stats.reconnects == 0  # the first attempt never connected


def test_a_broker_that_never_answers_the_connect_is_left(
    broker: ScriptedBroker,
    new_subscriber: NewSubscriber,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(session_module, "CONNECT_TIMEOUT_S", 0.3)
    sub = new_subscriber(16)
    peer = broker.accept_connect(sub)

    peer.wait_closed(timeout_s=1.0)
    broker.accept_connect(sub)


# Subscribing


def refused_subscription(
    broker: ScriptedBroker, sub: Subscriber, answer: bytes, disconnect_reason: int
) -> None:
    """Connect ``sub``, answer its SUBSCRIBE with ``answer`` and check that it leaves with a
    DISCONNECT of ``disconnect_reason``, one subscribe failure counted."""
    peer = broker.accept_connect(sub)
    peer.send(connack())
    assert peer.read_packet() == subscribe_packet(sub.config.topic_filters)

    peer.send(answer)

    assert peer.read_packet() == disconnect_with(disconnect_reason)
    peer.wait_closed()
    assert not sub.connected
    assert sub.stats.subscribe_failures == 1


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_suback_refusal_closes_and_reconnects(
    broker: ScriptedBroker, new_subscriber: NewSubscriber, caplog: pytest.LogCaptureFixture
) -> None:
    filters = (TOPIC_FILTER, OTHER_FILTER)
    sub = new_subscriber(16, topic_filters=filters)

    # The second filter: not authorized.
    answer = suback(mqtt5.GRANTED_QOS_1, 0x87)
    refused_subscription(broker, sub, answer, mqtt5.IMPLEMENTATION_SPECIFIC_ERROR)

    assert errors_logged(caplog) == [
        f"broker refused or downgraded the subscription to {OTHER_FILTER}: not authorized (0x87)"
    ]
    broker.handshake(sub)  # subscribes again, this time granted
    assert sub.connected
    assert sub.stats.subscribe_failures == 1


def test_qos0_grant_is_a_failed_subscription(
    broker: ScriptedBroker, new_subscriber: NewSubscriber, caplog: pytest.LogCaptureFixture
) -> None:
    sub = new_subscriber(16)

    # Granted QoS 0: the broker would deliver at most once and never redeliver what the worker
    # received but did not store.
    refused_subscription(broker, sub, suback(0x00), mqtt5.IMPLEMENTATION_SPECIFIC_ERROR)

    assert errors_logged(caplog) == [
        f"broker refused or downgraded the subscription to {TOPIC_FILTER}: granted QoS 0 (0x00)"
    ]
    broker.accept_connect(sub)


@pytest.mark.parametrize(
    "reasons",
    [
        pytest.param((), id="none"),
        pytest.param((0x01, 0x01), id="two-for-one-filter"),
    ],
)
def test_suback_with_wrong_count_of_reason_codes_fails(
    broker: ScriptedBroker,
    new_subscriber: NewSubscriber,
    caplog: pytest.LogCaptureFixture,
    reasons: tuple[int, ...],
) -> None:
    sub = new_subscriber(16)

    # One reason code per filter, in order (3.9.3): anything else is a protocol error.
    refused_subscription(broker, sub, suback(*reasons), mqtt5.PROTOCOL_ERROR)

    [logged] = errors_logged(caplog)
    assert logged.startswith(
        f"broker answered the subscription to {TOPIC_FILTER} with {len(reasons)} reason codes"
    )
    broker.accept_connect(sub)


def test_repeated_subscription_refusals_back_off(
    broker: ScriptedBroker, new_subscriber: NewSubscriber, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(session_module, "RECONNECT_MIN_DELAY_S", 0.3)
    sub = new_subscriber(16)
    gaps = []
    peer = broker.accept_connect(sub)
    for _ in range(3):
        peer.send(connack())
        assert peer.read_packet() == subscribe_packet()
        peer.send(suback(0x87))
        refused_at = time.monotonic()
        assert peer.read_packet() == disconnect_with(mqtt5.IMPLEMENTATION_SPECIFIC_ERROR)
        peer.wait_closed()
        peer = broker.accept_connect(sub)
        gaps.append(time.monotonic() - refused_at)

    # The connection was accepted each time; the delay grows all the same, from 0.3 s.
    assert gaps[0] >= 0.3
    assert gaps[1] >= 0.6
    assert gaps[2] >= 1.2
    assert sub.stats.subscribe_failures == 3


# Receiving


def test_publishes_sent_a_byte_at_a_time_arrive_intact_and_in_order(
    broker: ScriptedBroker, new_subscriber: NewSubscriber
) -> None:
    sub = new_subscriber(16)
    peer = broker.handshake(sub)
    sent = [
        ("a/dev-1", b'{"seq":1}', 1, 1),
        ("a/dev-2", b"", 1, 2),
        ("a/dev-3", bytes(range(256)) * 2, 1, 0x0102),  # a two-byte remaining length
        ("a/gerät", b"qos 0", 0, 0),
        ("a/dev-1", b'{"seq":2}', 1, 0xFFFF),
    ]
    stream = b"".join(publish(topic, payload, mid, qos) for topic, payload, qos, mid in sent)

    peer.send_in_pieces(stream, 1)

    run_until(sub, lambda: len(sub.pending) == len(sent), "every message pending")
    assert [message_of(item) for item in sub.take(100)] == sent
    assert sub.unacked == 4


def test_publishes_split_at_any_byte_arrive_intact_and_in_order(
    broker: ScriptedBroker, new_subscriber: NewSubscriber
) -> None:
    sub = new_subscriber(16)
    peer = broker.handshake(sub)
    sent = [("a/1", b"x" * 130, 1, 1), ("a/2", b"y", 1, 2), ("a/3", b"z" * 3, 1, 3)]
    stream = b"".join(publish(topic, payload, mid, qos) for topic, payload, qos, mid in sent)

    for cut in range(1, len(stream)):
        peer.send(stream[:cut])
        sub.poll(POLL_S)
        peer.send(stream[cut:])
        run_until(sub, lambda: len(sub.pending) == len(sent), f"every message, cut at {cut}")
        taken = sub.take(100)
        assert [message_of(item) for item in taken] == sent, f"cut at {cut}"
        assert sub.ack(taken) == len(sent)
        assert [peer.read_packet() for _ in sent] == [puback(1), puback(2), puback(3)]


def test_publishes_in_one_write_with_a_connack_and_suback_arrive_in_order(
    broker: ScriptedBroker, new_subscriber: NewSubscriber
) -> None:
    sub = new_subscriber(16)
    peer = broker.accept_connect(sub)
    queued = [publish(f"a/{mid}", b"queued", mid) for mid in (5, 6, 7)]

    # A resumed session: the broker sends what it queued right after the CONNACK.
    peer.send(connack(session_present=True) + b"".join(queued[:2]))
    assert peer.read_packet() == subscribe_packet()
    peer.send(queued[2] + SUBACK_GRANTED)

    run_until(sub, lambda: sub.connected and len(sub.pending) == 3, "three queued messages")
    assert [item.mid for item in sub.take(100)] == [5, 6, 7]


def test_a_publish_before_the_connack_closes_the_connection(
    broker: ScriptedBroker, new_subscriber: NewSubscriber
) -> None:
    sub = new_subscriber(16)
    peer = broker.accept_connect(sub)

    peer.send(publish("a/1", b"early", 1))

    assert peer.read_packet() == disconnect_with(mqtt5.PROTOCOL_ERROR)
    peer.wait_closed()
    assert not sub.pending


MALFORMED = mqtt5.MALFORMED_PACKET
PROTOCOL_ERROR = mqtt5.PROTOCOL_ERROR
# The header of a PUBLISH one byte longer than the subscriber's Maximum Packet Size.
OVERSIZED_PUBLISH = b"\x30" + mqtt5.varint(session_module.MAXIMUM_PACKET_SIZE_BYTES - 3)


@pytest.mark.parametrize(
    ("violation", "reason"),
    [
        pytest.param(publish("a/1", b"p", 1, qos=2), PROTOCOL_ERROR, id="qos-2-publish"),
        pytest.param(packet(0x36, b"\x00\x03a/1\x00\x01\x00p"), MALFORMED, id="qos-3-publish"),
        pytest.param(
            packet(0x32, b"\x00\x00\x00\x01\x03\x23\x00\x01p"), PROTOCOL_ERROR, id="topic-alias"
        ),
        pytest.param(packet(0x32, b"\x00\x03a/1\x00\x00\x00p"), PROTOCOL_ERROR, id="packet-id-0"),
        pytest.param(packet(0x30, b"\x00\x03a/\xff\x00p"), MALFORMED, id="topic-not-utf8"),
        pytest.param(b"\x30\xff\xff\xff\xff\x01", MALFORMED, id="five-byte-remaining-length"),
        pytest.param(OVERSIZED_PUBLISH, mqtt5.PACKET_TOO_LARGE, id="over-maximum-packet-size"),
        pytest.param(connack(), PROTOCOL_ERROR, id="second-connack"),
        pytest.param(
            b"\x90\x04\x00\x02\x00\x01", PROTOCOL_ERROR, id="suback-for-an-unused-packet-id"
        ),
        pytest.param(b"\x40\x02\x00\x01", PROTOCOL_ERROR, id="puback-to-a-subscriber"),
        pytest.param(b"\xf0\x00", PROTOCOL_ERROR, id="auth-packet"),
    ],
)
def test_a_protocol_violation_closes_with_disconnect_and_its_reason_then_reconnects(
    broker: ScriptedBroker, new_subscriber: NewSubscriber, violation: bytes, reason: int
) -> None:
    sub = new_subscriber(16)
    peer = broker.handshake(sub)

    peer.send(publish("a/ok", b"fine", 1) + violation)

    # 4.13.1: a client that finds a malformed packet or a protocol error SHOULD say which in
    # a DISCONNECT before it closes the connection.
    assert peer.read_packet() == disconnect_with(reason)
    peer.wait_closed()
    assert not sub.connected
    assert [item.mid for item in sub.take(100)] == [1]
    broker.handshake(sub)
    assert sub.stats.reconnects == 1


@pytest.mark.parametrize(
    ("bad_connack", "reason"),
    [
        pytest.param(
            packet(0x20, b"\x00\x00\x01\x24"), MALFORMED, id="maximum-qos-without-its-byte"
        ),
        pytest.param(
            packet(0x20, b"\x00\x00\x05\x27\x00\x00\x00\x00"),
            PROTOCOL_ERROR,
            id="maximum-packet-size-0",
        ),
    ],
)
def test_a_bad_connack_closes_the_connection_with_its_reason(
    broker: ScriptedBroker, new_subscriber: NewSubscriber, bad_connack: bytes, reason: int
) -> None:
    sub = new_subscriber(16)
    peer = broker.accept_connect(sub)

    peer.send(bad_connack)

    assert peer.read_packet() == disconnect_with(reason)
    peer.wait_closed()
    assert not sub.connected


# The window and acknowledgements


def test_acks_go_out_in_arrival_order_and_only_for_qos_1(
    broker: ScriptedBroker, new_subscriber: NewSubscriber
) -> None:
    sub = new_subscriber(16)
    peer = broker.handshake(sub)
    peer.send(
        publish("a/1", b"1", 7)
        + publish("a/2", b"2", 3)
        + publish("a/3", b"3", 0, qos=0)
        + publish("a/4", b"4", 0x1234)
    )
    run_until(sub, lambda: len(sub.pending) == 4, "four messages pending")
    assert sub.unacked == 3
    peer.expect_silence(0.1)  # nothing is acknowledged on receipt

    assert sub.ack(sub.take(100)) == 3

    assert sub.unacked == 0
    assert [peer.read_packet() for _ in range(3)] == [puback(7), puback(3), puback(0x1234)]
    peer.expect_silence(0.1)


def test_the_window_holds_at_most_receive_maximum_messages(
    broker: ScriptedBroker, new_subscriber: NewSubscriber
) -> None:
    sub = new_subscriber(5)
    peer = broker.handshake(sub)

    peer.send(b"".join(publish(f"a/{mid}", b"m", mid) for mid in range(1, 9)))

    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        sub.poll(POLL_S)
        assert len(sub.pending) <= 5
        assert sub.unacked <= 5
    assert len(sub.pending) == sub.unacked == 5
    first = sub.take(100)
    assert [item.mid for item in first] == [1, 2, 3, 4, 5]

    run_for(sub, 0.3)  # taken but not acknowledged: still the whole window
    assert not sub.pending

    assert sub.ack(first) == 5
    run_until(sub, lambda: len(sub.pending) == 3, "the other three messages")
    assert [item.mid for item in sub.take(100)] == [6, 7, 8]
    assert sub.unacked == 3
    assert [peer.read_packet() for _ in range(5)] == [puback(mid) for mid in range(1, 6)]


def test_messages_taken_but_not_acknowledged_still_count_against_the_window(
    broker: ScriptedBroker, new_subscriber: NewSubscriber
) -> None:
    sub = new_subscriber(5)
    peer = broker.handshake(sub)
    peer.send(b"".join(publish(f"a/{mid}", b"m", mid) for mid in (1, 2, 3)))
    run_until(sub, lambda: len(sub.pending) == 3, "three messages")
    in_the_batch = sub.take(100)

    peer.send(b"".join(publish(f"a/{mid}", b"m", mid) for mid in range(4, 12)))

    run_for(sub, 0.3)
    assert sub.unacked == 5
    assert [item.mid for item in sub.take(100)] == [4, 5]
    assert sub.ack(in_the_batch) == 3
    run_until(sub, lambda: len(sub.pending) == 3, "three more once the batch is acknowledged")
    assert [item.mid for item in sub.take(100)] == [6, 7, 8]
    assert sub.unacked == 5


# Losing the connection


@pytest.mark.parametrize(
    "ending",
    [
        pytest.param(disconnect(0x8E, "session taken over"), id="disconnect-packet"),
        pytest.param(b"", id="connection-closed"),
    ],
)
def test_after_the_broker_ends_the_connection_old_messages_are_not_acknowledged(
    broker: ScriptedBroker, new_subscriber: NewSubscriber, ending: bytes
) -> None:
    sub = new_subscriber(16)
    peer = broker.handshake(sub)
    peer.send(publish("a/1", b"1", 1) + publish("a/2", b"2", 2) + ending)
    if not ending:
        peer.conn.close()

    again = broker.handshake(sub)

    assert sub.stats.reconnects == 1
    old = sub.take(100)
    assert [item.mid for item in old] == [1, 2]
    assert sub.ack(old) == 0
    again.expect_silence(0.2)
    assert sub.unacked == 0

    # The broker redelivers them on the new connection; these are acknowledged.
    again.send(publish("a/1", b"1", 1))
    run_until(sub, lambda: len(sub.pending) == 1, "the redelivered message")
    assert sub.ack(sub.take(100)) == 1
    assert again.read_packet() == puback(1)


def test_a_broker_disconnect_closes_the_connection_from_the_client_side(
    broker: ScriptedBroker, new_subscriber: NewSubscriber
) -> None:
    sub = new_subscriber(16)
    peer = broker.handshake(sub)

    peer.send(disconnect(0x8E, "session taken over"))

    peer.wait_closed()
    assert not sub.connected


# Keepalive


def test_an_idle_connection_is_pinged_within_the_server_keep_alive(
    broker: ScriptedBroker, new_subscriber: NewSubscriber
) -> None:
    sub = new_subscriber(16)
    peer = broker.handshake(sub, keepalive_s=1)
    idle_since = time.monotonic()

    assert peer.read_packet(timeout_s=2.0) == PINGREQ
    assert time.monotonic() - idle_since >= 0.8

    peer.send(PINGRESP)
    assert peer.read_packet(timeout_s=2.0) == PINGREQ  # the same connection, pinged again
    assert sub.connected


def test_an_unanswered_ping_closes_the_connection_and_it_reconnects(
    broker: ScriptedBroker, new_subscriber: NewSubscriber
) -> None:
    sub = new_subscriber(16)
    peer = broker.handshake(sub, keepalive_s=1)
    assert peer.read_packet(timeout_s=2.0) == PINGREQ
    pinged_at = time.monotonic()

    peer.wait_closed(timeout_s=2.0)

    assert time.monotonic() - pinged_at >= 0.8
    assert not sub.connected
    broker.handshake(sub)
    assert sub.stats.reconnects == 1


def test_a_later_connection_without_server_keep_alive_uses_the_connects_own(
    broker: ScriptedBroker,
    new_subscriber: NewSubscriber,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(session_module, "KEEPALIVE_S", 1)
    sub = new_subscriber(16)
    first = broker.handshake(sub, keepalive_s=30)
    first.send(disconnect(0x8B, "server shutting down"))
    first.wait_closed()

    again = broker.handshake(sub)  # a CONNECT with keep alive 1, a CONNACK without a value

    assert again.read_packet(timeout_s=2.0) == PINGREQ


# Closing


def two_messages_taken(broker: ScriptedBroker, sub: Subscriber) -> tuple[Peer, list[Inbound]]:
    """Connect ``sub``, deliver it messages 1 and 2 at QoS 1 and take them, unacknowledged."""
    peer = broker.handshake(sub)
    peer.send(publish("a/1", b"1", 1) + publish("a/2", b"2", 2))
    run_until(sub, lambda: len(sub.pending) == 2, "two messages pending")
    return peer, sub.take(100)


def test_close_sends_queued_acks_then_disconnect(
    broker: ScriptedBroker, new_subscriber: NewSubscriber
) -> None:
    sub = new_subscriber(16)
    peer, taken = two_messages_taken(broker, sub)
    sub.ack(taken)

    peer.close_subscriber()

    assert [peer.read_packet() for _ in range(3)] == [puback(1), puback(2), DISCONNECT]
    peer.wait_closed()
    assert not sub.connected
    assert sub.ack(taken) == 0


def test_close_before_the_connack_sends_no_disconnect(
    broker: ScriptedBroker, new_subscriber: NewSubscriber
) -> None:
    sub = new_subscriber(16)
    peer = broker.accept_connect(sub)

    peer.close_subscriber()

    peer.wait_closed()


# Reconnecting


def test_session_lost_on_reconnect_is_counted(
    broker: ScriptedBroker, new_subscriber: NewSubscriber, caplog: pytest.LogCaptureFixture
) -> None:
    sub = new_subscriber(16)
    first = broker.handshake(sub, session_present=False)  # a fresh worker: expected
    assert sub.stats.sessions_lost == 0
    first.send(disconnect(0x8B, "server shutting down"))
    first.wait_closed()

    resumed = broker.handshake(sub, session_present=True)
    assert sub.stats.sessions_lost == 0
    resumed.send(disconnect(0x8B, "server shutting down"))
    resumed.wait_closed()
    caplog.clear()

    broker.handshake(sub, session_present=False)  # the broker lost the session and its queue

    assert sub.stats.sessions_lost == 1
    assert sub.stats.reconnects == 2
    assert sub.connected
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "the broker had no session for c (Session Present 0 on a reconnection):"
        " the messages it held for this worker are lost"
    ]


class Draws:
    """Scripted uniform draws for the reconnect jitter; counts how many were taken."""

    def __init__(self, *values: float) -> None:
        self.values = list(values)
        self.taken = 0

    def __call__(self) -> float:
        self.taken += 1
        return self.values.pop(0)


def test_reconnect_delays_are_jittered(
    broker: ScriptedBroker, new_subscriber: NewSubscriber, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(session_module, "RECONNECT_MIN_DELAY_S", 1.0)
    monkeypatch.setattr(session_module, "RECONNECT_JITTER_FRACTION", 1.0)  # full jitter
    draws = Draws(0.0, 0.75)
    sub = new_subscriber(16, draw=draws)
    peer = broker.handshake(sub)

    # A connection that had been up for a while is lost: even the first reconnect waits.
    peer.conn.close()
    lost_at = time.monotonic()
    peer = broker.accept_connect(sub, timeout_s=3.0)
    assert time.monotonic() - lost_at >= 1.0  # the draw 0.0 takes nothing off 1 s

    peer.send(connack(0x86))  # then refused: the backoff doubles to 2 s, the draw takes 3/4
    refused_at = time.monotonic()
    broker.accept_connect(sub, timeout_s=3.0)
    assert 0.5 <= time.monotonic() - refused_at < 2.0

    assert draws.taken == 2


@pytest.mark.parametrize(
    ("fraction", "draw", "delay_s"),
    [(0.5, 0.0, 2.0), (0.5, 0.5, 1.5), (0.5, 0.999, 1.001), (1.0, 0.25, 1.5), (0.0, 0.9, 2.0)],
)
def test_jitter_takes_at_most_its_fraction_off_a_delay(
    monkeypatch: pytest.MonkeyPatch, fraction: float, draw: float, delay_s: float
) -> None:
    monkeypatch.setattr(session_module, "RECONNECT_JITTER_FRACTION", fraction)
    assert session_module.jittered(2.0, draw) == pytest.approx(delay_s)


# Publishing (QoS 0)

ACK_TOPIC = "galvani/v1/d/dev-1/ack"


def publish_packet(topic: str, payload: bytes) -> Packet:
    """A QoS 0 PUBLISH as the subscriber sends it: no packet id, no properties."""
    return Packet(0x30, utf8(topic) + b"\x00" + payload)


def test_publish_goes_out_with_the_acks(
    broker: ScriptedBroker, new_subscriber: NewSubscriber
) -> None:
    sub = new_subscriber(16)
    peer, batch = two_messages_taken(broker, sub)

    sub.publish(ACK_TOPIC, b'{"seq":[[1,2]]}')
    time.sleep(0.05)
    with pytest.raises(BlockingIOError):
        peer.conn.recv(65536)  # queued, not written on its own

    assert sub.ack(batch) == 2

    # Written by ack() itself: nothing polled the subscriber in between.
    assert [peer.read_packet(timeout_s=0.0) for _ in range(3)] == [
        publish_packet(ACK_TOPIC, b'{"seq":[[1,2]]}'),
        puback(1),
        puback(2),
    ]
    assert sub.stats.publishes_dropped == sub.stats.publishes_too_large == 0


def test_publish_without_a_connection_is_dropped_and_counted(
    broker: ScriptedBroker, new_subscriber: NewSubscriber
) -> None:
    sub = new_subscriber(16)
    sub.publish(ACK_TOPIC, b"before connecting")
    assert sub.stats.publishes_dropped == 1

    peer = broker.handshake(sub)
    sub.publish(ACK_TOPIC, b"connected")
    assert peer.read_packet() == publish_packet(ACK_TOPIC, b"connected")  # sent by a poll
    peer.conn.close()
    run_until(sub, lambda: not sub.connected, "the lost connection noticed")
    sub.publish(ACK_TOPIC, b"lost")

    assert sub.stats.publishes_dropped == 2
    again = broker.handshake(sub)
    again.expect_silence(0.2)  # neither dropped message is sent later


def test_a_publish_over_the_brokers_maximum_packet_size_is_not_sent(
    broker: ScriptedBroker, new_subscriber: NewSubscriber
) -> None:
    sub = new_subscriber(16)
    peer = broker.handshake(sub, maximum_packet_size=64)
    # Fixed header 2 bytes, topic 2 + 22, property length 1: 27 bytes before the payload.
    fits, too_large = b"x" * 37, b"x" * 38

    sub.publish(ACK_TOPIC, too_large)
    sub.publish(ACK_TOPIC, fits)

    assert peer.read_packet() == publish_packet(ACK_TOPIC, fits)
    peer.expect_silence(0.1)
    assert sub.stats.publishes_too_large == 1
    assert sub.connected


# TLS: the socket's own behaviour, on a connected pair of loopback sockets whose ends have
# completed a real handshake (the scripted broker above speaks plain TCP). Against a real TLS
# Mosquitto: test_subscriber_tls.py.

TLS_RECORD_BYTES = 16 * 1024  # the largest plaintext of one TLS record (RFC 8446 5.1)


class TlsPair(NamedTuple):
    client: ssl.SSLSocket  # non-blocking, as the subscriber's
    server: ssl.SSLSocket  # blocking


@pytest.fixture
def tls_pair(tmp_path: Path) -> Iterator[TlsPair]:
    authority = pki.Authority.create("subscriber-unit-ca")
    certificate, key = authority.issue_server()
    for name, data in (
        ("ca.pem", pki.pem(authority.certificate)),
        ("server.pem", pki.pem(certificate)),
        ("server.key", pki.private_pem(key)),
    ):
        pki.write_file(tmp_path / name, data, mode=0o600)
    client_end, server_end = socket.socketpair()
    server_tls = server_context(tmp_path / "server.pem", tmp_path / "server.key")
    accepted: list[ssl.SSLSocket] = []
    thread = threading.Thread(
        target=lambda: accepted.append(server_tls.wrap_socket(server_end, server_side=True))
    )
    thread.start()
    client = client_context(tmp_path / "ca.pem").wrap_socket(
        client_end, server_hostname="localhost"
    )
    thread.join()
    client.setblocking(False)
    pair = TlsPair(client, accepted[0])
    yield pair
    pair.client.close()
    pair.server.close()


def wait_readable(sock: ssl.SSLSocket) -> None:
    select.select([sock], [], [], WAIT_S)


def test_one_tls_read_gathers_several_records_up_to_the_read_size(tls_pair: TlsPair) -> None:
    assert subscriber_module._receive(tls_pair.client) is None  # nothing yet: not an error
    sent = bytes(range(256)) * 400  # 100 KiB: seven records
    tls_pair.server.sendall(sent)
    received = b""
    while len(received) < len(sent):
        wait_readable(tls_pair.client)
        data = subscriber_module._receive(tls_pair.client)
        if data is not None:
            assert len(data) <= session_module.READ_SIZE
            received += data
    assert received == sent
    assert len(received) > TLS_RECORD_BYTES


def test_a_tls_read_stops_at_the_read_size_leaving_the_rest_pending(
    tls_pair: TlsPair, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(subscriber_module, "READ_SIZE", 20_000)
    sent = b"x" * 40_000
    tls_pair.server.sendall(sent)
    wait_readable(tls_pair.client)
    first = subscriber_module._receive(tls_pair.client)
    assert first is not None
    assert len(first) == 20_000, "more than one record, but no more than the read size"
    # What is decrypted but unread sits in the SSL object, where select() does not look.
    assert subscriber_module._buffered(tls_pair.client)
    rest = b""
    while len(first) + len(rest) < len(sent):
        if not subscriber_module._buffered(tls_pair.client):
            wait_readable(tls_pair.client)
        rest += subscriber_module._receive(tls_pair.client) or b""
    assert first + rest == sent


def test_a_tls_end_of_stream_is_a_lost_connection(tls_pair: TlsPair) -> None:
    tls_pair.server.close()
    wait_readable(tls_pair.client)
    with pytest.raises(session_module.ConnectionLost, match="closed the connection"):
        subscriber_module._receive(tls_pair.client)


def test_a_tls_write_the_socket_cannot_take_waits_and_resumes_intact(
    tls_pair: TlsPair, new_subscriber: NewSubscriber
) -> None:
    sub = new_subscriber()
    sub._sock = tls_pair.client
    first = bytes(range(256)) * 16_384  # 4 MiB: more than the socket pair buffers
    sub._queue(first)
    sub._flush()
    # OpenSSL said "want write" (an OSError, not BlockingIOError): the bytes stay queued and
    # the connection open.
    assert sub._sock is tls_pair.client
    assert len(sub._out) == len(first)
    more = b"appended while the first write was pending"
    sub._queue(more)  # _out only grows until a send succeeds, as OpenSSL's retry requires

    received = bytearray()
    reader = threading.Thread(
        target=lambda: received.extend(read_exactly(tls_pair.server, len(first) + len(more)))
    )
    reader.start()
    deadline = time.monotonic() + WAIT_S
    while sub._out and time.monotonic() < deadline:
        select.select([], [tls_pair.client], [], POLL_S)
        sub._flush()
    reader.join(WAIT_S)
    assert not sub._out
    assert bytes(received) == first + more
    sub._sock = None  # the fixture closes the pair


def read_exactly(sock: ssl.SSLSocket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        data = sock.recv(size - len(chunks))
        if not data:
            break
        chunks += data
    return bytes(chunks)


def test_a_verification_failure_says_why() -> None:
    error = ssl.SSLCertVerificationError(1, "certificate verify failed")
    error.verify_message = "unable to get local issuer certificate"
    assert session_module.tls_failure(error) == (
        "the broker's certificate did not verify: unable to get local issuer certificate"
    )
