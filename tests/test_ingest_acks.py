"""Stored acks: which seqs a committed batch tells each device about (pure, no servers)."""

import json
from datetime import UTC, datetime

from services.ingest.acks import ack_payload, ack_topic, seq_ranges, stored_acks
from services.ingest.decode import Inbound, decode_inbound

RECEIVED = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
RECEIVED_MS = int(RECEIVED.timestamp() * 1000)


def inbound(device_id: str, channel: str, payload: object) -> Inbound:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    topic = f"galvani/v1/d/{device_id}/{channel}"
    return Inbound(topic, raw, mid=1, qos=1, received_at=RECEIVED, generation=1)


def telemetry(seq: int) -> dict[str, object]:
    return {"v": 1, "seq": seq, "session": None, "samples": [{"ts": RECEIVED_MS + seq}]}


def acks_of(messages: list[Inbound]) -> dict[str, object]:
    decoded = [decode_inbound(message) for message in messages]
    return {topic: json.loads(payload) for topic, payload in stored_acks(messages, decoded)}


def test_seq_ranges_are_sorted_merged_and_inclusive():
    assert seq_ranges([7, 3, 1, 2, 2, 9, 8]) == [(1, 3), (7, 9)]
    assert seq_ranges([5]) == [(5, 5)]
    assert seq_ranges([]) == []


def test_ack_payload_is_the_protocol_shape():
    assert ack_payload([4, 2, 3, 10]) == b'{"v":1,"seqs":[[2,4],[10,10]]}'


def test_every_channel_with_a_seq_is_acknowledged_per_device():
    messages = [
        inbound("dev-a", "telemetry", telemetry(1)),
        inbound("dev-b", "telemetry", telemetry(40)),
        inbound(
            "dev-a", "events", {"v": 1, "seq": 2, "ts": RECEIVED_MS, "type": "charging", "on": True}
        ),
        inbound("dev-a", "state", {"v": 1, "seq": 3, "ts": RECEIVED_MS, "fw": "1.4.2", "hw": "B"}),
        inbound("dev-a", "telemetry", telemetry(5)),
    ]
    assert acks_of(messages) == {
        ack_topic("dev-a"): {"v": 1, "seqs": [[1, 3], [5, 5]]},
        ack_topic("dev-b"): {"v": 1, "seqs": [[40, 40]]},
    }
    assert ack_topic("dev-a") == "galvani/v1/d/dev-a/ack"


def test_presence_is_never_acknowledged():
    messages = [inbound("dev-a", "presence", {"v": 1, "online": True, "ts": RECEIVED_MS})]
    assert acks_of(messages) == {}


def test_a_dead_letter_with_a_readable_seq_is_acknowledged_so_it_is_not_resent_forever():
    bad_sample = {"v": 1, "seq": 12, "samples": [{"ts": RECEIVED_MS, "level": 99}]}
    too_big = {"v": 1, "seq": 13, "samples": [], "pad": "x" * 70_000}
    messages = [
        inbound("dev-a", "telemetry", bad_sample),
        inbound("dev-a", "telemetry", too_big),
        inbound("dev-a", "telemetry", b"{not json"),
        inbound("dev-a", "telemetry", {"v": 1, "seq": True, "samples": []}),
        inbound("dev-a", "telemetry", [1, 2]),
    ]
    assert acks_of(messages) == {ack_topic("dev-a"): {"v": 1, "seqs": [[12, 13]]}}


def test_a_dead_letter_on_a_topic_outside_the_device_tree_is_not_acknowledged():
    message = Inbound(
        "other/topic", b'{"seq": 1}', mid=1, qos=1, received_at=RECEIVED, generation=1
    )
    assert stored_acks([message], [decode_inbound(message)]) == []
