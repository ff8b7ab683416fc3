"""The subscriber's MQTT 5 codec (services.common.mqtt5): pure functions over bytes, no sockets.

What the client sends is decoded here the way a broker would read it, with paho-mqtt's own
decoders where it has them (variable byte integers, property blocks, subscription options);
what the broker sends is built with paho's encoders or by hand, byte by byte.
"""

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties as PahoProperties
from paho.mqtt.properties import VariableByteIntegers
from paho.mqtt.subscribeoptions import SubscribeOptions

from services.common import mqtt5
from services.common.mqtt5 import ProtocolViolation


class Reader:
    """A cursor over the body of a packet the client encoded, read field by field."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        value = self.data[self.pos]
        self.pos += 1
        return value

    def u16(self) -> int:
        value = int.from_bytes(self.data[self.pos : self.pos + 2], "big")
        self.pos += 2
        return value

    def string(self) -> bytes:
        length = self.u16()
        value = self.data[self.pos : self.pos + length]
        assert len(value) == length, "string runs past the packet"
        self.pos += length
        return value

    def properties(self, packet_type: int) -> PahoProperties:
        properties, used = PahoProperties(packet_type).unpack(self.data[self.pos :])
        self.pos += used
        return properties

    def at_end(self) -> bool:
        return self.pos == len(self.data)


def split_packet(packet: bytes) -> tuple[int, bytes]:
    """The first byte and the body of one whole packet, its remaining length checked."""
    length, used = VariableByteIntegers.decode(packet[1:])
    body = packet[1 + used :]
    assert len(body) == length, "remaining length disagrees with the packet"
    return packet[0], body


def utf8(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return len(data).to_bytes(2, "big") + data


def publish_body(
    topic: str | bytes, payload: bytes, *, packet_id: int | None = None, properties: bytes = b"\0"
) -> bytes:
    """A PUBLISH body (3.3.2): topic, the packet id at QoS > 0, properties, payload."""
    packet_id_bytes = b"" if packet_id is None else packet_id.to_bytes(2, "big")
    return utf8(topic) + packet_id_bytes + properties + payload


def publish_properties(**values: object) -> bytes:
    properties = PahoProperties(PacketTypes.PUBLISH)
    for name, value in values.items():
        setattr(properties, name, value)
    return properties.pack()


QOS_0_FLAGS = 0x00
QOS_1_FLAGS = 0x02


# Variable byte integers (1.5.5)


@pytest.mark.parametrize(
    ("value", "size"),
    [
        (0, 1),
        (127, 1),
        (128, 2),
        (16_383, 2),
        (16_384, 3),
        (2_097_151, 3),
        (2_097_152, 4),
        (268_435_455, 4),
    ],
)
def test_varint_round_trips_at_each_length_boundary(value: int, size: int) -> None:
    encoded = mqtt5.varint(value)
    assert len(encoded) == size
    assert encoded == VariableByteIntegers.encode(value)
    assert mqtt5.read_varint(encoded, 0, len(encoded)) == (value, size)
    framed = b"\xff" + encoded + b"\x7f"
    assert mqtt5.read_varint(framed, 1, len(framed)) == (value, 1 + size)


@pytest.mark.parametrize("value", [-1, 268_435_456])
def test_varint_refuses_a_value_outside_four_bytes(value: int) -> None:
    with pytest.raises(ValueError, match="does not fit"):
        mqtt5.varint(value)


def test_read_varint_refuses_a_fifth_byte() -> None:
    with pytest.raises(ProtocolViolation, match="longer than 4 bytes"):
        mqtt5.read_varint(b"\xff\xff\xff\xff\x01", 0, 5)
    with pytest.raises(ProtocolViolation):
        mqtt5.read_varint(b"\x80\x80\x80\x80\x00", 0, 5)


@pytest.mark.parametrize(
    ("data", "end"),
    [(b"", 0), (b"\x80", 1), (b"\xff\xff\xff", 3), (b"\x80\x01", 1), (b"\xc1\x82\x03", 2)],
)
def test_read_varint_of_a_truncated_integer_is_none(data: bytes, end: int) -> None:
    assert mqtt5.read_varint(data, 0, end) is None


# What the client sends


@pytest.mark.parametrize(
    "client_id",
    [
        pytest.param("ingest-1", id="short"),
        pytest.param("w" * 200, id="two-byte-remaining-length"),
    ],
)
def test_connect_asks_for_a_persistent_session_with_credentials(client_id: str) -> None:
    packet = mqtt5.connect(
        client_id,
        "ingest",
        "pä$$word",
        keepalive_s=60,
        session_expiry_s=86_400,
        receive_maximum=300,
        maximum_packet_size=512 * 1024,
    )

    first, body = split_packet(packet)
    assert first == 0x10
    fields = Reader(body)
    assert fields.string() == b"MQTT"
    assert fields.byte() == 5
    # user name (0x80) and password (0x40) present; clean start (0x02), will and reserved off
    assert fields.byte() == 0xC0
    assert fields.u16() == 60
    properties = fields.properties(PacketTypes.CONNECT)
    assert properties.json() == {
        "SessionExpiryInterval": 86_400,
        "ReceiveMaximum": 300,
        "MaximumPacketSize": 512 * 1024,
    }
    assert fields.string() == client_id.encode()
    assert fields.string() == b"ingest"
    assert fields.string() == "pä$$word".encode()
    assert fields.at_end()


def test_subscribe_sends_every_filter_with_qos_1_and_no_retained_messages() -> None:
    filters = ["$share/ingest/galvani/v1/d/+/telemetry", "$share/ingest/galvani/v1/d/+/events"]
    packet = mqtt5.subscribe(7, filters, mqtt5.QOS_1 | mqtt5.RETAIN_DO_NOT_SEND)

    first, body = split_packet(packet)
    assert first == 0x82  # SUBSCRIBE's reserved flags are 0b0010 (3.8.1)
    fields = Reader(body)
    assert fields.u16() == 7
    assert fields.properties(PacketTypes.SUBSCRIBE).isEmpty()
    for topic in filters:
        assert fields.string() == topic.encode()
        option_byte = fields.byte()
        assert option_byte == 0x21
        options = SubscribeOptions()
        options.unpack(bytes((option_byte,)))
        assert options.QoS == 1
        assert options.retainHandling == SubscribeOptions.RETAIN_DO_NOT_SEND
        assert not options.noLocal
        assert not options.retainAsPublished
    assert fields.at_end()


def test_puback_is_four_bytes_with_the_packet_id_big_endian() -> None:
    assert mqtt5.puback(0x1234) == b"\x40\x02\x12\x34"
    assert mqtt5.puback(1) == b"\x40\x02\x00\x01"
    assert mqtt5.puback(0xFFFF) == b"\x40\x02\xff\xff"


def test_pingreq_is_a_bare_fixed_header() -> None:
    assert split_packet(mqtt5.PINGREQ) == (0xC0, b"")


def test_disconnect_carries_its_reason_code() -> None:
    # Normal disconnection may leave out the reason code and property length (3.14.2.1).
    assert mqtt5.disconnect(mqtt5.NORMAL_DISCONNECTION) == b"\xe0\x00"
    # Otherwise one byte of reason; a property length left out reads as 0 (3.14.2.2.1).
    assert mqtt5.disconnect(mqtt5.MALFORMED_PACKET) == b"\xe0\x01\x81"
    assert mqtt5.disconnect(mqtt5.PROTOCOL_ERROR) == b"\xe0\x01\x82"
    assert mqtt5.disconnect(mqtt5.IMPLEMENTATION_SPECIFIC_ERROR) == b"\xe0\x01\x83"
    assert mqtt5.disconnect(mqtt5.PACKET_TOO_LARGE) == b"\xe0\x01\x95"
    # Read back the way a broker would: its reason, no properties, so no Session Expiry
    # Interval overriding the CONNECT's (3.14.2.2.2).
    assert mqtt5.read_disconnect(split_packet(mqtt5.disconnect(0x82))[1]) == (
        0x82,
        mqtt5.Properties(),
    )


def test_a_qos_0_publish_is_encoded_without_packet_id_or_properties() -> None:
    packet = mqtt5.publish("galvani/v1/d/dev-1/ack", b'{"seq":[[1,3]]}')

    assert packet == (
        b"\x30"  # PUBLISH, DUP 0, QoS 0, RETAIN 0 (3.3.1)
        + b"\x28"  # remaining length 40
        + b"\x00\x16galvani/v1/d/dev-1/ack"  # topic name, 22 bytes
        + b"\x00"  # property length 0, and no packet id before it at QoS 0 (3.3.2.2)
        + b'{"seq":[[1,3]]}'
    )
    first, body = split_packet(packet)
    assert mqtt5.read_publish(body, 0, len(body), first & 0x0F) == (
        "galvani/v1/d/dev-1/ack",
        0,
        0,
        b'{"seq":[[1,3]]}',
    )


def test_a_qos_0_publish_of_200_bytes_has_a_two_byte_remaining_length() -> None:
    packet = mqtt5.publish("a/ack", b"x" * 200)
    assert packet[:3] == b"\x30\xd0\x01"  # 208 = 0x50 | 0x80, then 1 (1.5.5)
    assert packet[3:] == b"\x00\x05a/ack\x00" + b"x" * 200


# PUBLISH from the broker


def test_a_qos_0_publish_has_no_packet_id() -> None:
    body = publish_body("galvani/v1/d/dev-1/telemetry", b'{"v":1}')
    assert mqtt5.read_publish(body, 0, len(body), QOS_0_FLAGS) == (
        "galvani/v1/d/dev-1/telemetry",
        0,
        0,
        b'{"v":1}',
    )


def test_a_qos_1_publish_carries_its_packet_id() -> None:
    body = publish_body("a/b", b"payload", packet_id=0xBEEF)
    assert mqtt5.read_publish(body, 0, len(body), QOS_1_FLAGS) == ("a/b", 0xBEEF, 1, b"payload")


def test_publish_properties_are_skipped_and_the_payload_is_intact() -> None:
    properties = publish_properties(
        PayloadFormatIndicator=1,
        MessageExpiryInterval=30,
        ContentType="application/json",
        UserProperty=[("trace", "abc"), ("hop", "2")],
        SubscriptionIdentifier=300,
    )
    body = publish_body("a/b", b"\x00\x01payload", packet_id=9, properties=properties)
    assert mqtt5.read_publish(body, 0, len(body), QOS_1_FLAGS) == ("a/b", 9, 1, b"\x00\x01payload")


def test_a_publish_may_have_an_empty_payload() -> None:
    body = publish_body("a/b", b"", packet_id=1)
    assert mqtt5.read_publish(body, 0, len(body), QOS_1_FLAGS) == ("a/b", 1, 1, b"")


def test_a_publish_topic_is_decoded_as_utf8() -> None:
    topic = "galvani/v1/d/gerät-ø/événements"
    body = publish_body(topic, b"x")
    assert mqtt5.read_publish(body, 0, len(body), QOS_0_FLAGS)[0] == topic


def test_a_publish_is_read_between_pos_and_end_of_a_larger_buffer() -> None:
    body = publish_body("a/b", b"payload", packet_id=2)
    buffer = bytearray(b"\x30\x99junk" + body + b"\x30\x05next")
    start = 6
    assert mqtt5.read_publish(buffer, start, start + len(body), QOS_1_FLAGS) == (
        "a/b",
        2,
        1,
        b"payload",
    )


def test_the_dup_and_retain_flags_do_not_change_what_is_read() -> None:
    body = publish_body("a/b", b"p", packet_id=3)
    dup_retain_qos_1 = 0x08 | QOS_1_FLAGS | 0x01
    assert mqtt5.read_publish(body, 0, len(body), dup_retain_qos_1) == ("a/b", 3, 1, b"p")


MALFORMED = mqtt5.MALFORMED_PACKET
PROTOCOL_ERROR = mqtt5.PROTOCOL_ERROR


@pytest.mark.parametrize(
    ("body", "flags", "message", "reason"),
    [
        pytest.param(
            publish_body("a/b", b"p", packet_id=1), 0x04, "QoS 2", PROTOCOL_ERROR, id="qos-2"
        ),
        pytest.param(publish_body("a/b", b"p", packet_id=1), 0x06, "QoS 3", MALFORMED, id="qos-3"),
        pytest.param(
            publish_body("a/b", b"p", packet_id=0),
            QOS_1_FLAGS,
            "packet id 0",
            PROTOCOL_ERROR,
            id="id-0",
        ),
        pytest.param(
            publish_body("", b"p", packet_id=1, properties=publish_properties(TopicAlias=1)),
            QOS_1_FLAGS,
            "without a topic name",
            PROTOCOL_ERROR,
            id="topic-alias",
        ),
        pytest.param(
            publish_body(b"a/\xff\xfe", b"p"), QOS_0_FLAGS, "not UTF-8", MALFORMED, id="bad-utf8"
        ),
        pytest.param(
            publish_body("a/b", b"", packet_id=1, properties=b"\x05\x01\x01"),
            QOS_1_FLAGS,
            "properties run past",
            MALFORMED,
            id="properties-past-end",
        ),
        pytest.param(
            publish_body("a/b", b"", properties=b"\x80\x80"),
            QOS_0_FLAGS,
            "properties run past",
            MALFORMED,
            id="property-length-cut",
        ),
    ],
)
def test_a_publish_mqtt_5_does_not_allow_is_refused_with_its_reason(
    body: bytes, flags: int, message: str, reason: int
) -> None:
    with pytest.raises(ProtocolViolation, match=message) as refused:
        mqtt5.read_publish(body, 0, len(body), flags)
    assert refused.value.reason == reason


@pytest.mark.parametrize("flags", [QOS_0_FLAGS, QOS_1_FLAGS])
def test_a_publish_cut_before_its_payload_is_refused_at_every_length(flags: int) -> None:
    packet_id = 5 if flags else None
    properties = publish_properties(UserProperty=("k", "v"))
    body = publish_body("a/b/c", b"payload", packet_id=packet_id, properties=properties)
    payload_at = len(body) - len(b"payload")
    # Bytes after ``end`` belong to the next packet in the read buffer; they must not be used.
    buffer = body + b"\xff" * 64
    for end in range(payload_at):
        with pytest.raises(ProtocolViolation):
            mqtt5.read_publish(buffer, 0, end, flags)


# CONNACK, SUBACK, DISCONNECT from the broker


def test_connack_reads_session_present_and_the_reason_code() -> None:
    assert mqtt5.read_connack(b"\x01\x00\x00") == mqtt5.ConnAck(True, 0, mqtt5.Properties())
    assert mqtt5.read_connack(b"\x00\x86\x00") == mqtt5.ConnAck(False, 0x86, mqtt5.Properties())
    assert mqtt5.read_connack(b"\x00\x00").session_present is False


def test_connack_reads_the_server_keep_alive_and_reason_string() -> None:
    properties = PahoProperties(PacketTypes.CONNACK)
    properties.ServerKeepAlive = 45
    properties.ReasonString = "welcome back"
    properties.UserProperty = ("region", "eu-1")
    ack = mqtt5.read_connack(b"\x01\x00" + properties.pack())
    assert ack.session_present
    assert ack.reason == 0
    assert ack.properties.values == {
        mqtt5.SERVER_KEEP_ALIVE: 45,
        mqtt5.REASON_STRING: "welcome back",
    }
    assert ack.properties.reason_string() == "welcome back"
    assert ack.properties.user == [("region", "eu-1")]


def test_a_connack_shorter_than_two_bytes_is_refused() -> None:
    with pytest.raises(ProtocolViolation, match="CONNACK"):
        mqtt5.read_connack(b"\x00")


def test_suback_reads_one_reason_code_per_filter_in_order() -> None:
    ack = mqtt5.read_suback(b"\x00\x01\x00" + bytes((0x01, 0x00, 0x80, 0x87, 0x9E)))
    assert ack.packet_id == 1
    assert ack.reasons == [0x01, 0x00, 0x80, 0x87, 0x9E]
    assert ack.properties == mqtt5.Properties()


def test_suback_reads_its_reason_string() -> None:
    properties = PahoProperties(PacketTypes.SUBACK)
    properties.ReasonString = "not authorized for $share"
    ack = mqtt5.read_suback(b"\x12\x34" + properties.pack() + b"\x87")
    assert ack.packet_id == 0x1234
    assert ack.reasons == [0x87]
    assert ack.properties.reason_string() == "not authorized for $share"


def test_a_suback_shorter_than_three_bytes_is_refused() -> None:
    with pytest.raises(ProtocolViolation, match="SUBACK"):
        mqtt5.read_suback(b"\x00\x01")


def test_disconnect_without_a_body_means_normal_disconnection() -> None:
    assert mqtt5.read_disconnect(b"") == (0, mqtt5.Properties())
    assert mqtt5.read_disconnect(b"\x8e") == (0x8E, mqtt5.Properties())


def test_disconnect_reads_its_reason_and_reason_string() -> None:
    properties = PahoProperties(PacketTypes.DISCONNECT)
    properties.ReasonString = "another client took over"
    reason, read = mqtt5.read_disconnect(b"\x8e" + properties.pack())
    assert reason == 0x8E
    assert read.reason_string() == "another client took over"
    assert mqtt5.reason_name(reason) == "session taken over (0x8e)"


def test_a_reason_code_the_standard_does_not_name_keeps_its_number() -> None:
    assert mqtt5.reason_name(0x42) == "reason (0x42)"


def test_suback_reason_codes_below_0x80_name_the_qos_granted() -> None:
    assert mqtt5.suback_reason_name(0x00) == "granted QoS 0 (0x00)"
    assert mqtt5.suback_reason_name(0x01) == "granted QoS 1 (0x01)"
    assert mqtt5.suback_reason_name(0x87) == "not authorized (0x87)"
    assert mqtt5.suback_reason_name(0x9E) == "shared subscriptions not supported (0x9e)"


# Property blocks (2.2.2)


def test_properties_of_every_wire_type_read_as_paho_wrote_them() -> None:
    connack = PahoProperties(PacketTypes.CONNACK)
    connack.SessionExpiryInterval = 0xFFFFFFFF  # four bytes
    connack.AssignedClientIdentifier = "auto-1"  # UTF-8 string
    connack.ServerKeepAlive = 0x1234  # two bytes
    connack.MaximumQoS = 1  # one byte
    connack.UserProperty = [("a", "1"), ("b", "ü")]  # string pairs
    publish = PahoProperties(PacketTypes.PUBLISH)
    publish.CorrelationData = b"\x00\xff"  # binary
    publish.SubscriptionIdentifier = 200_000  # variable byte integer, three bytes

    block = connack.pack()
    properties, end = mqtt5.read_properties(b"\xaa" + block + b"\xbb", 1)
    assert end == 1 + len(block)
    assert properties.values == {
        0x11: 0xFFFFFFFF,
        0x12: "auto-1",
        0x13: 0x1234,
        0x24: 1,
    }
    assert properties.user == [("a", "1"), ("b", "ü")]

    block = publish.pack()
    properties, end = mqtt5.read_properties(block, 0)
    assert end == len(block)
    assert properties.values == {0x09: b"\x00\xff", 0x0B: 200_000}


def test_an_empty_property_block_is_one_zero_byte() -> None:
    assert mqtt5.read_properties(b"\x00rest", 0) == (mqtt5.Properties(), 1)


@pytest.mark.parametrize("identifier", [0x00, 0x04, 0x2B, 0x7F])
def test_an_unknown_property_is_refused(identifier: int) -> None:
    with pytest.raises(ProtocolViolation, match=f"unknown property 0x{identifier:02x}"):
        mqtt5.read_properties(bytes((2, identifier, 0)), 0)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"\x08\x1f\x00\x0ahello", id="string-past-the-packet"),
        # the string's bytes exist, but after the block's end
        pytest.param(b"\x03\x1f\x00\x05hello", id="string-past-the-block"),
        pytest.param(b"\x06\x26\x00\x01k\x00\x01v", id="pair-past-the-block"),
        pytest.param(b"\x02\x1f\x00", id="string-length-cut"),
        pytest.param(b"\x02\x13\x00" + b"\xee" * 4, id="two-bytes-cut-by-the-block"),
        pytest.param(b"\x03\x11\x00\x00" + b"\xee" * 4, id="four-bytes-cut-by-the-block"),
        pytest.param(b"\x02\x0b\x80" + b"\xee" * 4, id="varint-cut-by-the-block"),
        pytest.param(b"\x01\x24" + b"\xee" * 4, id="byte-cut-by-the-block"),
        pytest.param(b"\x02\x13\x00", id="two-bytes-cut-by-the-packet"),
        pytest.param(b"\x03\x11\x00\x00", id="four-bytes-cut-by-the-packet"),
        pytest.param(b"\x01\x24", id="byte-cut-by-the-packet"),
    ],
)
def test_a_property_running_past_its_block_or_packet_is_refused(body: bytes) -> None:
    with pytest.raises(ProtocolViolation, match="runs past") as refused:
        mqtt5.read_properties(body, 0)
    assert refused.value.reason == mqtt5.MALFORMED_PACKET  # 2.2.2.2


def test_a_property_block_longer_than_its_packet_is_refused() -> None:
    with pytest.raises(ProtocolViolation, match="properties run past the packet"):
        mqtt5.read_properties(b"\x09\x13\x00\x01", 0)
    with pytest.raises(ProtocolViolation, match="property length runs past"):
        mqtt5.read_properties(b"\x80", 0)
