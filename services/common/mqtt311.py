"""The MQTT 3.1.1 packets a backend client needs where the broker speaks only 3.1.1 (NATS's
MQTT gateway): CONNECT out, CONNACK in, DISCONNECT out.

Only what :func:`services.common.broker_certificates.end_device_session` uses for a session
takeover; the MQTT 5 codec beside it is :mod:`services.common.mqtt5`, whose string encoding
(1.5.3 in 3.1.1, 1.5.4 in 5.0) and :class:`~services.common.mqtt5.ProtocolViolation` this
module shares. Pure functions over bytes, no sockets. Numbers follow the OASIS MQTT Version
3.1.1 standard (section numbers in the comments).
"""

import struct
from dataclasses import dataclass
from typing import Final

from services.common.mqtt5 import PacketType, ProtocolViolation, string, varint

PROTOCOL_LEVEL: Final = 4  # 3.1.2.2
# Connect flags (3.1.2.3): user name, password, clean session.
_USER_NAME: Final = 0x80
_PASSWORD: Final = 0x40
_CLEAN_SESSION: Final = 0x02
DISCONNECT: Final = b"\xe0\x00"  # 3.14: a fixed header, no variable header, no payload

ACCEPTED: Final = 0x00
# CONNACK return codes (3.2.2.3, table 3.1).
RETURN_CODES: Final = {
    0x00: "connection accepted",
    0x01: "unacceptable protocol version",
    0x02: "identifier rejected",
    0x03: "server unavailable",
    0x04: "bad user name or password",
    0x05: "not authorized",
}


def return_code_name(code: int) -> str:
    """A CONNACK return code as the standard names it, with its number."""
    return f"{RETURN_CODES.get(code, 'reserved return code')} (0x{code:02x})"


def connect(
    client_id: str, username: str, password: str, *, keepalive_s: int, clean_session: bool
) -> bytes:
    """CONNECT (3.1) with user name and password and no will.

    With ``clean_session`` the broker discards any earlier session of ``client_id`` and the
    one this connection starts ends with it (3.1.2.4): 3.1.1's way to what MQTT 5 says with
    clean start and a session expiry of 0."""
    flags = _USER_NAME | _PASSWORD | (_CLEAN_SESSION if clean_session else 0)
    body = (
        string("MQTT")
        + bytes((PROTOCOL_LEVEL, flags))
        + struct.pack("!H", keepalive_s)
        + string(client_id)
        + string(username)
        + string(password.encode())  # binary data with a two-byte length (3.1.3.5)
    )
    return bytes((PacketType.CONNECT << 4,)) + varint(len(body)) + body


@dataclass(frozen=True)
class ConnAck:
    """CONNACK (3.2)."""

    session_present: bool
    return_code: int


def read_connack(body: bytes) -> ConnAck:
    """The CONNACK's body (after its fixed header): exactly two bytes, the first of which
    only its lowest bit (Session Present) may set (3.2.2.1), which a refusal leaves clear
    (3.2.2.2)."""
    if len(body) != 2:
        raise ProtocolViolation(f"a 3.1.1 CONNACK has 2 bytes, not {len(body)}")
    flags, code = body
    if flags & 0xFE:
        raise ProtocolViolation(f"CONNACK acknowledge flags 0x{flags:02x}: bits 7-1 are reserved")
    if code != ACCEPTED and flags:
        raise ProtocolViolation("a refused CONNACK with Session Present set")
    return ConnAck(bool(flags), code)
