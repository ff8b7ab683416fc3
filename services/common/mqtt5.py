"""The MQTT 5 packets a backend subscriber exchanges with the broker, encoded and decoded.

Only what :mod:`services.common.subscriber` needs: CONNECT, SUBSCRIBE, PUBLISH (QoS 0),
PUBACK, PINGREQ and DISCONNECT out; CONNACK, SUBACK, PUBLISH (QoS 0 and 1), PINGRESP and
DISCONNECT in. Pure functions over bytes, no sockets. Names and numbers follow the OASIS
MQTT 5.0 standard (section numbers in the comments).
"""

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Final

# Reason codes (2.4) this client sends in a DISCONNECT (3.14.2.1).
NORMAL_DISCONNECTION: Final = 0x00
MALFORMED_PACKET: Final = 0x81
PROTOCOL_ERROR: Final = 0x82
IMPLEMENTATION_SPECIFIC_ERROR: Final = 0x83
PACKET_TOO_LARGE: Final = 0x95


class ProtocolViolation(Exception):
    """The broker sent something MQTT 5 does not allow here; the connection is unusable.

    ``reason`` is the code of the DISCONNECT the client sends before it closes (4.13.1):
    malformed packet for bytes that cannot be read as the packet they claim to be (1.5, 2.2),
    protocol error for a well-formed packet the standard does not allow at that point.
    """

    def __init__(self, message: str, reason: int = MALFORMED_PACKET) -> None:
        super().__init__(message)
        self.reason = reason


class PacketType(IntEnum):
    """Control packet types (2.1.2)."""

    CONNECT = 1
    CONNACK = 2
    PUBLISH = 3
    PUBACK = 4
    SUBSCRIBE = 8
    SUBACK = 9
    PINGREQ = 12
    PINGRESP = 13
    DISCONNECT = 14
    AUTH = 15


# Property identifiers (2.2.2.2) of the properties this client sends or reads.
SESSION_EXPIRY_INTERVAL: Final = 0x11
ASSIGNED_CLIENT_IDENTIFIER: Final = 0x12
SERVER_KEEP_ALIVE: Final = 0x13
REASON_STRING: Final = 0x1F
RECEIVE_MAXIMUM: Final = 0x21
USER_PROPERTY: Final = 0x26
MAXIMUM_PACKET_SIZE: Final = 0x27

_BYTE, _TWO, _FOUR, _VARINT, _UTF8, _BINARY, _PAIR = range(7)
# Every property's wire type, so an unexpected one is skipped rather than misread.
_PROPERTY_TYPES: Final = {
    0x01: _BYTE,
    0x02: _FOUR,
    0x03: _UTF8,
    0x08: _UTF8,
    0x09: _BINARY,
    0x0B: _VARINT,
    0x11: _FOUR,
    0x12: _UTF8,
    0x13: _TWO,
    0x15: _UTF8,
    0x16: _BINARY,
    0x17: _BYTE,
    0x18: _FOUR,
    0x19: _BYTE,
    0x1A: _UTF8,
    0x1C: _UTF8,
    0x1F: _UTF8,
    0x21: _TWO,
    0x22: _TWO,
    0x23: _TWO,
    0x24: _BYTE,
    0x25: _BYTE,
    0x26: _PAIR,
    0x27: _FOUR,
    0x28: _BYTE,
    0x29: _BYTE,
    0x2A: _BYTE,
}

_FIXED_SIZES: Final = {_BYTE: 1, _TWO: 2, _FOUR: 4}

# Subscription options (3.8.3.1): maximum QoS 1, retained messages not sent.
QOS_1: Final = 0x01
RETAIN_DO_NOT_SEND: Final = 0x20
# The SUBACK reason code for a subscription granted at QoS 1 (3.9.3).
GRANTED_QOS_1: Final = 0x01

PINGREQ: Final = b"\xc0\x00"
_PUBACK_HEADER: Final = b"\x40\x02"
MAX_REMAINING_LENGTH: Final = 268_435_455
# The largest packet the standard allows: a fixed header byte, four length bytes, the body.
# A CONNACK without Maximum Packet Size means the broker takes packets up to this (3.2.2.3.6).
MAX_PACKET_SIZE: Final = 1 + 4 + MAX_REMAINING_LENGTH

REASONS: Final = {
    0x00: "success",
    0x04: "disconnect with will message",
    0x80: "unspecified error",
    0x81: "malformed packet",
    0x82: "protocol error",
    0x83: "implementation specific error",
    0x84: "unsupported protocol version",
    0x85: "client identifier not valid",
    0x86: "bad user name or password",
    0x87: "not authorized",
    0x88: "server unavailable",
    0x89: "server busy",
    0x8A: "banned",
    0x8B: "server shutting down",
    0x8D: "keep alive timeout",
    0x8E: "session taken over",
    0x8F: "topic filter invalid",
    0x93: "receive maximum exceeded",
    0x95: "packet too large",
    0x97: "quota exceeded",
    0x9C: "use another server",
    0x9E: "shared subscriptions not supported",
    0x9F: "connection rate exceeded",
    0xA0: "maximum connect time",
    0xA2: "wildcard subscriptions not supported",
}


def reason_name(code: int) -> str:
    """A reason code as the standard names it (2.4), with its number."""
    return f"{REASONS.get(code, 'reason')} (0x{code:02x})"


def suback_reason_name(code: int) -> str:
    """A SUBACK reason code (3.9.3), where 0x00 to 0x02 name the QoS granted."""
    if code <= 0x02:
        return f"granted QoS {code} (0x{code:02x})"
    return reason_name(code)


def varint(value: int) -> bytes:
    """A Variable Byte Integer (1.5.5)."""
    if not 0 <= value <= MAX_REMAINING_LENGTH:
        raise ValueError(f"{value} does not fit a variable byte integer")
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | 0x80 if value else byte)
        if not value:
            return bytes(out)


def read_varint(buf: bytes | bytearray | memoryview, pos: int, end: int) -> tuple[int, int] | None:
    """The Variable Byte Integer at ``pos`` and the position after it; None if it runs past
    ``end``. Raises ProtocolViolation for one longer than four bytes."""
    value = 0
    shift = 0
    while pos < end:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 21:
            raise ProtocolViolation("variable byte integer longer than 4 bytes")
    return None


def string(value: str | bytes) -> bytes:
    """A UTF-8 string or binary data (1.5.4, 1.5.6): two bytes of length, then the bytes."""
    data = value.encode() if isinstance(value, str) else value
    if len(data) > 0xFFFF:
        raise ValueError("string longer than 65,535 bytes")
    return struct.pack("!H", len(data)) + data


def _packet(first_byte: int, body: bytes) -> bytes:
    return bytes((first_byte,)) + varint(len(body)) + body


def connect(
    client_id: str,
    username: str,
    password: str,
    *,
    keepalive_s: int,
    session_expiry_s: int,
    receive_maximum: int,
    maximum_packet_size: int,
) -> bytes:
    """CONNECT (3.1) with clean start off, user name and password, no will."""
    flags = 0x80 | 0x40  # user name, password; clean start (0x02) off
    properties = struct.pack(
        "!BIBHBI",
        SESSION_EXPIRY_INTERVAL,
        session_expiry_s,
        RECEIVE_MAXIMUM,
        receive_maximum,
        MAXIMUM_PACKET_SIZE,
        maximum_packet_size,
    )
    body = (
        string("MQTT")
        + bytes((5, flags))
        + struct.pack("!H", keepalive_s)
        + varint(len(properties))
        + properties
        + string(client_id)
        + string(username)
        + string(password.encode())
    )
    return _packet(PacketType.CONNECT << 4, body)


def subscribe(packet_id: int, topic_filters: Sequence[str], options: int) -> bytes:
    """SUBSCRIBE (3.8) of every filter with the same options, no properties."""
    body = struct.pack("!H", packet_id) + b"\x00"
    body += b"".join(string(topic) + bytes((options,)) for topic in topic_filters)
    return _packet(PacketType.SUBSCRIBE << 4 | 0x02, body)


def publish(topic: str, payload: bytes) -> bytes:
    """PUBLISH (3.3) at QoS 0, not retained, not a duplicate: no packet id (3.3.2.2), no
    properties (a zero property length, 3.3.2.3.1), no topic alias."""
    return _packet(PacketType.PUBLISH << 4, string(topic) + b"\x00" + payload)


def puback(packet_id: int) -> bytes:
    """PUBACK (3.4) with reason code success, which MQTT 5 lets a client leave out."""
    return _PUBACK_HEADER + packet_id.to_bytes(2, "big")


def disconnect(reason: int) -> bytes:
    """DISCONNECT (3.14) with ``reason`` and no properties.

    Without a Session Expiry Interval property the one the CONNECT asked for stands, so the
    broker keeps the session whatever the reason (3.14.2.2.2). Normal disconnection is sent
    as a bare fixed header, which the standard reads as reason 0x00 (3.14.2.1).
    """
    if reason == NORMAL_DISCONNECTION:
        return b"\xe0\x00"
    return bytes((PacketType.DISCONNECT << 4, 1, reason))


@dataclass
class Properties:
    """The properties of a packet the broker sent, as far as this client reads them."""

    values: dict[int, int | str | bytes] = field(default_factory=dict)
    user: list[tuple[str, str]] = field(default_factory=list)

    def reason_string(self) -> str | None:
        value = self.values.get(REASON_STRING)
        return value if isinstance(value, str) else None


def read_properties(body: bytes, pos: int) -> tuple[Properties, int]:
    """The property block at ``pos`` (2.2.2) and the position after it."""
    header = read_varint(body, pos, len(body))
    if header is None:
        raise ProtocolViolation("property length runs past the packet")
    length, pos = header
    end = pos + length
    if end > len(body):
        raise ProtocolViolation("properties run past the packet")
    properties = Properties()
    while pos < end:
        identifier = body[pos]
        kind = _PROPERTY_TYPES.get(identifier)
        pos += 1
        if kind is None:
            raise ProtocolViolation(f"unknown property 0x{identifier:02x}")
        value: int | str | bytes
        if kind in _FIXED_SIZES:
            size = _FIXED_SIZES[kind]
            if pos + size > end:
                raise ProtocolViolation("property runs past its block")
            value, pos = int.from_bytes(body[pos : pos + size], "big"), pos + size
        elif kind == _VARINT:
            read = read_varint(body, pos, end)
            if read is None:
                raise ProtocolViolation("property runs past its block")
            value, pos = read
        elif kind == _PAIR:
            name, pos = _read_string(body, pos, end)
            text, pos = _read_string(body, pos, end)
            properties.user.append((name.decode(errors="replace"), text.decode(errors="replace")))
            continue
        else:
            data, pos = _read_string(body, pos, end)
            value = data.decode(errors="replace") if kind == _UTF8 else data
        if pos > end:
            raise ProtocolViolation("property runs past its block")
        properties.values[identifier] = value
    return properties, end


def _read_string(body: bytes, pos: int, end: int) -> tuple[bytes, int]:
    if pos + 2 > end:
        raise ProtocolViolation("string runs past its packet")
    length = int.from_bytes(body[pos : pos + 2], "big")
    if pos + 2 + length > end:
        raise ProtocolViolation("string runs past its packet")
    return bytes(body[pos + 2 : pos + 2 + length]), pos + 2 + length


@dataclass(frozen=True)
class ConnAck:
    """CONNACK (3.2)."""

    session_present: bool
    reason: int
    properties: Properties


def read_connack(body: bytes) -> ConnAck:
    if len(body) < 2:
        raise ProtocolViolation("CONNACK shorter than 2 bytes")
    properties = read_properties(body, 2)[0] if len(body) > 2 else Properties()
    return ConnAck(bool(body[0] & 0x01), body[1], properties)


@dataclass(frozen=True)
class SubAck:
    """SUBACK (3.9): one reason code per filter, in the order subscribed."""

    packet_id: int
    reasons: list[int]
    properties: Properties


def read_suback(body: bytes) -> SubAck:
    if len(body) < 3:
        raise ProtocolViolation("SUBACK shorter than 3 bytes")
    properties, pos = read_properties(body, 2)
    return SubAck(int.from_bytes(body[:2], "big"), list(body[pos:]), properties)


def read_disconnect(body: bytes) -> tuple[int, Properties]:
    """DISCONNECT (3.14) from the broker: its reason code (0 when left out) and properties."""
    if not body:
        return 0, Properties()
    properties = read_properties(body, 1)[0] if len(body) > 1 else Properties()
    return body[0], properties


def read_publish(
    buf: bytes | bytearray, pos: int, end: int, flags: int
) -> tuple[str, int, int, bytes]:
    """PUBLISH (3.3) whose body is ``buf[pos:end]``: topic, packet id (0 at QoS 0), QoS and
    payload. Its properties are skipped: none of them changes what is stored."""
    qos = (flags >> 1) & 0x03
    if qos > 1:
        # Both QoS bits set is a malformed packet (3.3.1.2); QoS 2 is well formed but more
        # than the subscription was granted (3.8.3.1).
        reason = MALFORMED_PACKET if qos == 3 else PROTOCOL_ERROR
        raise ProtocolViolation(f"PUBLISH at QoS {qos} on a subscription granted QoS 1", reason)
    if pos + 2 > end:
        raise ProtocolViolation("PUBLISH shorter than its topic length")
    topic_end = pos + 2 + (buf[pos] << 8 | buf[pos + 1])
    topic = buf[pos + 2 : topic_end]
    pos = topic_end
    packet_id = 0
    if qos:
        if pos + 2 > end:
            raise ProtocolViolation("PUBLISH shorter than its packet id")
        packet_id = buf[pos] << 8 | buf[pos + 1]
        pos += 2
        if packet_id == 0:
            raise ProtocolViolation("PUBLISH at QoS 1 with packet id 0", PROTOCOL_ERROR)  # 2.2.1
    properties = read_varint(buf, pos, end)
    if properties is None or properties[1] + properties[0] > end:
        raise ProtocolViolation("PUBLISH properties run past the packet")
    pos = properties[1] + properties[0]
    if not topic:
        # A topic alias; this client never allows one (no Topic Alias Maximum in CONNECT), so
        # it is a protocol error either way (3.3.2.3.4).
        raise ProtocolViolation("PUBLISH without a topic name", PROTOCOL_ERROR)
    try:
        name = topic.decode()
    except UnicodeDecodeError as exc:
        raise ProtocolViolation("PUBLISH topic is not UTF-8") from exc
    return name, packet_id, qos, bytes(buf[pos:end])
