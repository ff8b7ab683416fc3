"""The MQTT 3.1.1 codec for a session takeover (services.common.mqtt311), against the bytes
the OASIS MQTT Version 3.1.1 standard prescribes, written out here by hand."""

import pytest

from services.common import mqtt311
from services.common.mqtt5 import ProtocolViolation


def test_connect_is_protocol_level_4_with_credentials_and_a_clean_session() -> None:
    packet = mqtt311.connect("dev-1", "api", "pw", keepalive_s=5, clean_session=True)

    assert packet == bytes(
        [
            0x10, 26,  # CONNECT, remaining length (3.1.1)
            0x00, 0x04, *b"MQTT",  # protocol name (3.1.2.1)
            0x04,  # protocol level 4: 3.1.1 (3.1.2.2)
            0xC2,  # user name, password, clean session; no will (3.1.2.3)
            0x00, 0x05,  # keep alive, seconds (3.1.2.10)
            0x00, 0x05, *b"dev-1",  # client identifier (3.1.3.1)
            0x00, 0x03, *b"api",  # user name (3.1.3.4)
            0x00, 0x02, *b"pw",  # password (3.1.3.5)
        ]
    )  # fmt: skip


def test_without_a_clean_session_only_the_credentials_flags_are_set() -> None:
    packet = mqtt311.connect("d", "u", "p", keepalive_s=60, clean_session=False)
    assert packet[9] == 0xC0
    assert packet[10:12] == b"\x00\x3c"


def test_a_connect_over_127_bytes_has_a_two_byte_remaining_length() -> None:
    packet = mqtt311.connect("d" * 120, "u", "p", keepalive_s=1, clean_session=True)
    body = 10 + 122 + 3 + 3
    assert packet[1:3] == bytes([body % 128 | 0x80, body // 128])  # 2.2.3
    assert len(packet) == 3 + body


@pytest.mark.parametrize(
    ("body", "present", "code"),
    [(b"\x00\x00", False, 0), (b"\x01\x00", True, 0), (b"\x00\x05", False, 5)],
)
def test_connack_reads_session_present_and_the_return_code(
    body: bytes, present: bool, code: int
) -> None:
    assert mqtt311.read_connack(body) == mqtt311.ConnAck(present, code)


@pytest.mark.parametrize(
    "body",
    [
        b"\x00",  # too short
        b"\x00\x00\x00",  # an MQTT 5 CONNACK's property length: not 3.1.1
        b"\x02\x00",  # a reserved acknowledge flag (3.2.2.1)
        b"\x01\x04",  # a refusal with Session Present (3.2.2.2)
    ],
)
def test_a_connack_3_1_1_does_not_allow_is_refused(body: bytes) -> None:
    with pytest.raises(ProtocolViolation):
        mqtt311.read_connack(body)


def test_return_codes_are_named_as_the_standard_names_them() -> None:
    assert mqtt311.return_code_name(4) == "bad user name or password (0x04)"
    assert mqtt311.return_code_name(5) == "not authorized (0x05)"
    assert mqtt311.return_code_name(9) == "reserved return code (0x09)"


def test_disconnect_is_a_bare_fixed_header() -> None:
    assert mqtt311.DISCONNECT == b"\xe0\x00"  # 3.14
