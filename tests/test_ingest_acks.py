"""Stored acks: which seqs a committed batch tells each device about, and that ingest sends
them to the device once the batch has committed."""

import itertools
import json
from pathlib import Path

import psycopg

from services.common.protocol import device_topic
from services.ingest.acks import ack_payload, ack_topic, seq_ranges, stored_acks
from services.ingest.decode import Inbound, decode_inbound
from tests.ingest import (
    T0_MS,
    IngestWorkers,
    connect_device,
    event,
    provision,
    scalar,
    telemetry,
    topic,
    wait_until,
)
from tests.test_ingest_decode import RECEIVED_MS, inbound


def sent(device_id: str, channel: str, payload: object) -> Inbound:
    """What ingest receives when ``device_id`` publishes ``payload`` on ``channel``."""
    return inbound(device_topic(device_id, channel), payload)


def one_sample(seq: int) -> dict[str, object]:
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
        sent("dev-a", "telemetry", one_sample(1)),
        sent("dev-b", "telemetry", one_sample(40)),
        sent(
            "dev-a", "events", {"v": 1, "seq": 2, "ts": RECEIVED_MS, "type": "charging", "on": True}
        ),
        sent("dev-a", "state", {"v": 1, "seq": 3, "ts": RECEIVED_MS, "fw": "1.4.2", "hw": "B"}),
        sent("dev-a", "telemetry", one_sample(5)),
    ]
    assert acks_of(messages) == {
        ack_topic("dev-a"): {"v": 1, "seqs": [[1, 3], [5, 5]]},
        ack_topic("dev-b"): {"v": 1, "seqs": [[40, 40]]},
    }
    assert ack_topic("dev-a") == "galvani/v1/d/dev-a/ack"


def test_presence_is_never_acknowledged():
    messages = [sent("dev-a", "presence", {"v": 1, "online": True, "ts": RECEIVED_MS})]
    assert acks_of(messages) == {}


def test_a_dead_letter_with_a_readable_seq_is_acknowledged_so_it_is_not_resent_forever():
    bad_sample = {"v": 1, "seq": 12, "samples": [{"ts": RECEIVED_MS, "level": 99}]}
    too_big = {"v": 1, "seq": 13, "samples": [], "pad": "x" * 70_000}
    messages = [
        sent("dev-a", "telemetry", bad_sample),
        sent("dev-a", "telemetry", too_big),
        sent("dev-a", "telemetry", b"{not json"),
        sent("dev-a", "telemetry", {"v": 1, "seq": True, "samples": []}),
        sent("dev-a", "telemetry", [1, 2]),
        sent("dev-a", "telemetry", {"v": 1, "seq": 2**63, "samples": []}),
        sent("dev-a", "presence", {"v": 1, "seq": 14, "online": "yes"}),
        sent("dev-a", "config", {"v": 1, "seq": 15}),
    ]
    assert acks_of(messages) == {ack_topic("dev-a"): {"v": 1, "seqs": [[12, 13]]}}


def test_a_dead_letter_on_a_topic_outside_the_device_tree_is_not_acknowledged():
    message = inbound("other/topic", b'{"seq": 1}')
    assert stored_acks([message], [decode_inbound(message)]) == []


def test_ingest_acknowledges_each_committed_seq_to_its_device_and_only_after_commit(
    database_url, broker, sync_devices, ingest_workers: IngestWorkers
):
    """A device hears which of its seqs are stored, once they are in the database."""
    [device, other] = provision(database_url, 2, prefix="ack")
    sync_devices()
    ingest_workers.start()
    client = connect_device(broker.config.device_port, device)
    watcher = connect_device(broker.config.device_port, other)
    try:
        assert client.subscribe(ack_topic(device.device_id)) in (0, 1)
        assert watcher.subscribe(ack_topic(other.device_id)) in (0, 1)
        payloads = [
            (topic(device.device_id, "telemetry"), telemetry(seq, T0_MS + seq * 1000, count=2))
            for seq in (1, 2, 3)
        ] + [(topic(device.device_id, "events"), event(4, T0_MS, "charging", on=True))]
        # Hold the device's row as a concurrent transaction would: ingest's batch waits for
        # the lock (it takes FOR NO KEY UPDATE), so nothing can be committed, nor acked, yet.
        with psycopg.connect(database_url) as blocker:
            blocker.execute("SELECT 1 FROM devices WHERE id = %s FOR UPDATE", [device.device_id])
            assert client.publish_many(payloads) == [0, 0, 0, 0]
            assert client.wait_for(ack_topic(device.device_id), timeout_s=1.5) is None
        acked: set[int] = set()

        def all_acked() -> bool:
            for message in client.received:
                body = json.loads(message.payload)
                assert body["v"] == 1
                for first, last in body["seqs"]:
                    acked.update(range(first, last + 1))
            return acked >= {1, 2, 3, 4}

        wait_until(all_acked, 15, "acks for seqs 1-4")
        assert acked == {1, 2, 3, 4}
        stored = scalar(
            database_url,
            "SELECT (SELECT count(*) FROM telemetry_messages WHERE device_id = %(d)s)"
            " + (SELECT count(*) FROM events WHERE device_id = %(d)s)",
            {"d": device.device_id},
        )
        assert stored == 4
        assert watcher.wait_for(ack_topic(other.device_id), timeout_s=0.5) is None
    finally:
        client.close()
        watcher.close()


VECTORS = Path(__file__).resolve().parents[1] / "protocol" / "vectors" / "ack.json"


def test_what_ingest_sends_covers_each_valid_vector_in_canonical_ranges():
    """The device side is held to protocol/vectors/ack.json; ingest's encoder is held to the
    same file: for the seqs each valid vector names, it sends v1 with sorted, merged ranges."""
    document = json.loads(VECTORS.read_text("utf-8"))
    assert document["channel"] == "ack"
    for case in document["valid"]:
        seqs = {seq for first, last in case["payload"]["seqs"] for seq in range(first, last + 1)}
        if not seqs:
            continue  # ingest never sends an empty ack; devices must accept one
        sent = json.loads(ack_payload(seqs))
        assert sent["v"] == 1, case["name"]
        ranges = [tuple(r) for r in sent["seqs"]]
        assert ranges == sorted(ranges), case["name"]
        assert all(a <= b for a, b in ranges), case["name"]
        assert all(b + 1 < c for (_, b), (c, _) in itertools.pairwise(ranges)), case["name"]
        assert {s for a, b in ranges for s in range(a, b + 1)} == seqs, case["name"]
