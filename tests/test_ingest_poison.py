"""Values the protocol allows at its edges: held by the schema or refused by decode, never a
batch the database refuses (issue 19, item 3).

Before, a valid message the schema could not hold (a state report answering version 2^31 into
an ``integer`` column; a seq of 2^63 - 1, whose gap count overflowed ``bigint``) made the whole
batch fail, and ingest wrote it again one message at a time, every other device's messages
with it; an impedance of 1e300 was stored as +Infinity. Now each is stored or is a dead letter
of its own, inside the batch.
"""

import json

import psycopg
import pytest

from deploy.stack.mosquitto import MosquittoBroker
from tests.ingest import (
    T0_MS,
    Device,
    IngestWorkers,
    connect_device,
    event,
    provision,
    scalar,
    state,
    telemetry,
    topic,
    wait_until,
)

INT64_MAX = 2**63 - 1


@pytest.fixture
def devices(database_url, sync_devices) -> list[Device]:
    made = provision(database_url, 3)
    sync_devices()
    return made


def count(url: str, query: str) -> int:
    return int(str(scalar(url, query)))


def poison(seq: int) -> tuple[str, bytes]:
    """One of four payloads the schema cannot hold, by ``seq``: channel and payload."""
    kind = seq // 10 % 4
    if kind == 0:  # parses as +Infinity
        return "telemetry", b'{"v":1,"seq":%d,"samples":[{"ts":%d,"z_ohm":1.8e308}]}' % (
            seq,
            T0_MS + seq * 1000,
        )
    if kind == 1:  # finite, but +Infinity as a real
        return "telemetry", telemetry(seq, T0_MS + seq * 1000, z_ohm=1e300)
    if kind == 2:
        answer = {"version": 2**31, "sha256": "abc", "status": "applied", "reason": None}
        return "state", state(seq, T0_MS + seq * 1000, config=answer)
    # A session id longer than a B-tree index entry holds (about 2,700 bytes).
    return "telemetry", telemetry(seq, T0_MS + seq * 1000, session="s" * 6000)


def test_values_at_the_protocols_edges_never_split_a_batch(
    database_url, broker: MosquittoBroker, devices: list[Device], ingest_workers: IngestWorkers
):
    ingest_workers.start()
    good_a, good_b, bad = devices
    port = broker.config.device_port
    # One poison message in ten from one device, among two devices' good telemetry.
    mine = [
        poison(seq) if seq % 10 == 0 else ("telemetry", telemetry(seq, T0_MS + seq * 1000))
        for seq in range(1, 101)
    ]
    # At the edges and valid: stored as sent.
    dropped = {"messages": INT64_MAX, "telemetry": INT64_MAX, "events": 0, "state": 0}
    edges = [
        ("state", state(200, T0_MS + 200_000, dropped=dropped)),
        ("events", event(201, T0_MS + 201_000, "session_end", session="s-1",
                         duration_s=INT64_MAX, reason="completed")),
        ("telemetry", telemetry(INT64_MAX, T0_MS + 202_000, z_ohm=3.4028234663852886e38)),
    ]  # fmt: skip
    clients = [connect_device(port, d) for d in devices]
    try:
        for start in range(0, 100, 10):
            for client, device in zip(clients[:2], (good_a, good_b), strict=True):
                client.publish_many(
                    [
                        (topic(device.device_id, "telemetry"), telemetry(s, T0_MS + s * 1000))
                        for s in range(start + 1, start + 11)
                    ]
                )
            clients[2].publish_many(
                [(topic(bad.device_id, c), p) for c, p in mine[start : start + 10]]
            )
        clients[2].publish_many([(topic(bad.device_id, c), p) for c, p in edges])
    finally:
        for client in clients:
            client.close()

    # 200 good messages of the good devices, 90 of the poisoning one and its last one.
    wait_until(
        lambda: count(database_url, "SELECT count(*) FROM telemetry_messages") == 291,
        what="every valid telemetry message",
    )
    wait_until(
        lambda: count(database_url, "SELECT count(*) FROM dead_letters") == 10,
        what="the ten poison messages as dead letters",
    )
    wait_until(
        lambda: count(database_url, "SELECT count(*) FROM sessions WHERE end_seq = 201") == 1,
        what="the session end",
    )
    with psycopg.connect(database_url) as conn:
        letters = conn.execute(
            "SELECT device_id, reason, detail FROM dead_letters ORDER BY id"
        ).fetchall()
        per_device = dict(
            conn.execute("SELECT device_id, count(*) FROM samples GROUP BY device_id").fetchall()
        )
        device = conn.execute(
            "SELECT first_seq, last_seq, seq_count, seq_gaps FROM devices WHERE id = %s",
            [bad.device_id],
        ).fetchone()
        infinite = conn.execute(
            "SELECT count(*) FROM samples WHERE z_ohm = 'Infinity'::real"
        ).fetchone()
        widest = conn.execute("SELECT z_ohm FROM samples WHERE seq = %s", [INT64_MAX]).fetchall()
        report = conn.execute("SELECT dropped FROM state_reports WHERE seq = 200").fetchone()
        duration = conn.execute("SELECT duration_s FROM sessions WHERE end_seq = 201").fetchone()
    assert per_device == {good_a.device_id: 1000, good_b.device_id: 1000, bad.device_id: 910}
    assert {(d, r) for d, r, _ in letters} == {(bad.device_id, "invalid")}
    details = sorted(detail.split(":", 1)[0] for _, _, detail in letters)
    assert details == ["config.version"] * 3 + ["samples.0.z_ohm"] * 5 + ["session"] * 2
    assert infinite == (0,)
    assert len(widest) == 10
    assert widest[0][0] == pytest.approx(3.4028234663852886e38)
    # The gap count spans 1 .. 2^63 - 1: in bigint, last - first + 1 overflowed.
    assert device == (1, INT64_MAX, 93, INT64_MAX - 93)
    assert report is not None
    assert report[0]["messages"] == INT64_MAX
    assert duration is not None
    assert duration[0] == pytest.approx(float(INT64_MAX))
    # Stored inside their batches: none was refused by the database and written again alone.
    assert ingest_workers.metric("1", "galvani_ingest_batch_splits_total") == 0
    assert "one by one" not in ingest_workers.log_text("1")
    assert json.loads(bytes(first_dead_letter_payload(database_url, bad.device_id)))["seq"] == 10


def first_dead_letter_payload(url: str, device_id: str) -> bytes:
    """The first dead letter's payload, as the device sent it."""
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT payload FROM dead_letters WHERE device_id = %s ORDER BY id LIMIT 1",
            [device_id],
        ).fetchone()
    assert row is not None
    return bytes(row[0])
