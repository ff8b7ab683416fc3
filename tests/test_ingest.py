"""Ingest end to end: devices publish through the real broker, workers store in TimescaleDB."""

import json
import random
import time
from datetime import UTC, datetime

import psycopg
import pytest

from deploy.stack.mosquitto import MosquittoBroker
from services.common.db import storage_of
from services.common.subscriber import Inbound
from services.ingest.decode import decode_inbound
from services.ingest.writer import write_batch
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
from tests.mqtt import MqttClient

ACCEPTED = (0, 16)
NOT_AUTHORIZED = 0x87


def connect(broker: MosquittoBroker, device: Device) -> MqttClient:
    return connect_device(broker.config.device_port, device)


@pytest.fixture
def devices(database_url, sync_devices) -> list[Device]:
    made = provision(database_url, 3)
    sync_devices()
    return made


def count(url: str, query: str, *params: object) -> int:
    return int(str(scalar(url, query, list(params))))


def test_telemetry_is_stored_once_per_sample_and_acknowledged(
    database_url, broker, devices, ingest_workers: IngestWorkers
):
    ingest_workers.start()
    device = connect(broker, devices[0])
    try:
        rcs = device.publish_many(
            [
                (topic(devices[0].device_id, "telemetry"), telemetry(seq, T0_MS + seq * 1000))
                for seq in range(1, 51)
            ]
        )
    finally:
        device.close()
    assert all(rc in ACCEPTED for rc in rcs)
    wait_until(lambda: count(database_url, "SELECT count(*) FROM samples") == 500, what="500 rows")
    assert count(database_url, "SELECT count(*) FROM telemetry_messages") == 50
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT first_seq, last_seq, seq_count, seq_gaps, last_seen FROM devices WHERE id = %s",
            [devices[0].device_id],
        ).fetchone()
    assert row is not None
    assert row[:4] == (1, 50, 50, 0)
    assert int(row[4].timestamp() * 1000) == T0_MS + 50 * 1000 + 900
    wait_until(
        lambda: ingest_workers.metric("1", "galvani_ingest_inflight_messages") == 0,
        what="every message acknowledged",
    )


def test_duplicated_messages_are_stored_once(
    database_url, broker, devices, ingest_workers: IngestWorkers
):
    ingest_workers.start()
    rng = random.Random(7)
    messages = []
    for seq in range(1, 201):
        payload = telemetry(seq, T0_MS + seq * 1000)
        messages.append((topic(devices[0].device_id, "telemetry"), payload))
        if rng.random() < 0.1:
            messages.append((topic(devices[0].device_id, "telemetry"), payload))
    messages.append(
        (topic(devices[0].device_id, "events"), event(201, T0_MS, "reboot", reason="power_on"))
    )
    messages.append(
        (topic(devices[0].device_id, "events"), event(201, T0_MS, "reboot", reason="power_on"))
    )
    duplicates = len(messages) - 201
    assert duplicates >= 10
    device = connect(broker, devices[0])
    try:
        assert all(rc in ACCEPTED for rc in device.publish_many(messages))
    finally:
        device.close()
    wait_until(
        lambda: (
            ingest_workers.metric(
                "1", "galvani_ingest_messages_total", 'channel="telemetry",outcome="duplicate"'
            )
            + ingest_workers.metric(
                "1", "galvani_ingest_messages_total", 'channel="events",outcome="duplicate"'
            )
            == duplicates
        ),
        what="every duplicate counted",
    )
    assert count(database_url, "SELECT count(*) FROM samples") == 2000
    assert count(database_url, "SELECT count(*) FROM events") == 1
    assert (
        count(database_url, "SELECT seq_count FROM devices WHERE id = %s", devices[0].device_id)
        == 201
    )


def test_two_workers_share_the_load(database_url, broker, devices, ingest_workers: IngestWorkers):
    ingest_workers.start("1")
    ingest_workers.start("2")
    clients = [connect(broker, d) for d in devices]
    try:
        for client, d in zip(clients, devices, strict=True):
            client.publish_many(
                [
                    (topic(d.device_id, "telemetry"), telemetry(seq, T0_MS + seq * 1000))
                    for seq in range(1, 101)
                ]
            )
    finally:
        for client in clients:
            client.close()
    wait_until(lambda: count(database_url, "SELECT count(*) FROM samples") == 3000, what="rows")
    shares = [
        ingest_workers.metric(
            w, "galvani_ingest_messages_total", 'channel="telemetry",outcome="stored"'
        )
        for w in ("1", "2")
    ]
    assert sum(shares) == 300
    assert min(shares) > 0
    assert count(database_url, "SELECT sum(seq_gaps) FROM devices") == 0


def test_seq_gaps_are_counted_and_closed_when_late_messages_arrive(
    database_url, broker, devices, ingest_workers: IngestWorkers
):
    ingest_workers.start()
    d = devices[0].device_id
    device = connect(broker, devices[0])

    def gaps() -> tuple[int, int, int]:
        with psycopg.connect(database_url) as conn:
            row = conn.execute(
                "SELECT seq_gaps, seq_count, last_seq FROM devices WHERE id = %s", [d]
            ).fetchone()
        assert row is not None
        return row

    try:
        for seq in (1, 2, 6):
            device.publish(topic(d, "telemetry"), telemetry(seq, T0_MS + seq * 1000))
        wait_until(lambda: gaps() == (3, 3, 6), what="three missing seqs")
        device.publish(topic(d, "events"), event(4, T0_MS + 4000, "charging", on=True))
        device.publish(topic(d, "state"), state(3, T0_MS + 3000))
        device.publish(topic(d, "telemetry"), telemetry(5, T0_MS + 5000))
        wait_until(lambda: gaps() == (0, 6, 6), what="the gaps closed")
    finally:
        device.close()


def test_latest_state_is_the_newest_device_time_not_the_last_received(
    database_url, broker, devices, ingest_workers: IngestWorkers
):
    ingest_workers.start()
    d = devices[0].device_id
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "INSERT INTO config_pushes (device_id, version, payload, sha256, reason, source,"
            " issued_at) VALUES (%s, 7, '{}', 'abc', 'test', 'api', now())",
            [d],
        )
    device = connect(broker, devices[0])
    try:
        applied = {"version": 7, "sha256": "abc", "status": "applied", "reason": None}
        device.publish(topic(d, "state"), state(10, T0_MS + 10_000, fw="2.0.0", config=applied))
        dropped = {"messages": 3, "telemetry": 3, "events": 0, "state": 0}
        dropped |= {"first_seq": 2, "last_seq": 4}
        device.publish(topic(d, "state"), state(5, T0_MS + 5_000, fw="1.0.0", dropped=dropped))
        device.publish(
            topic(d, "presence"), json.dumps({"v": 1, "online": True, "ts": T0_MS}).encode()
        )
    finally:
        device.close()
    wait_until(
        lambda: count(database_url, "SELECT count(*) FROM state_reports") == 2, what="states"
    )
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT fw, config_reported_version, config_reported_status, online"
            " FROM devices WHERE id = %s",
            [d],
        ).fetchone()
        answer = conn.execute(
            "SELECT answer_status FROM config_pushes WHERE device_id = %s", [d]
        ).fetchone()
        reported = conn.execute(
            "SELECT seq, dropped FROM state_reports WHERE device_id = %s ORDER BY seq", [d]
        ).fetchall()
    assert row == ("2.0.0", 7, "applied", True)
    assert answer == ("applied",)
    assert reported == [(5, dropped), (10, None)]  # what the outbox dropped, as reported


def test_last_will_marks_the_device_offline(
    database_url, broker, devices, ingest_workers: IngestWorkers
):
    ingest_workers.start()
    d = devices[0]
    will = (topic(d.device_id, "presence"), json.dumps({"v": 1, "online": False}).encode())
    device = connect_device(broker.config.device_port, d, will=will)
    device.publish(
        topic(d.device_id, "presence"),
        json.dumps({"v": 1, "online": True, "ts": T0_MS}).encode(),
        retain=True,
    )

    def online() -> object:
        return scalar(database_url, "SELECT online FROM devices WHERE id = %s", [d.device_id])

    wait_until(lambda: online() is True, what="online")
    device.drop()
    wait_until(lambda: online() is False, timeout_s=60, what="the will to mark it offline")
    assert count(database_url, "SELECT count(*) FROM presence_log WHERE ts IS NULL") == 1
    # Retained presence (this device's will, other tests' devices) is not replayed to a
    # worker that subscribes again.
    ingest_workers.stop()
    ingest_workers.start()
    time.sleep(1)
    assert count(database_url, "SELECT count(*) FROM presence_log") == 2


def test_device_time_outside_the_window_is_kept_and_flagged(
    database_url, broker, devices, ingest_workers: IngestWorkers
):
    ingest_workers.start()
    d = devices[0].device_id
    device = connect(broker, devices[0])
    # The clock now, not the module's T0: the window is judged against the time of receipt,
    # and a long suite reaches this test many minutes after import.
    now_ms = int(time.time() * 1000)
    try:
        device.publish(topic(d, "telemetry"), telemetry(1, now_ms - 31 * 86_400_000, count=1))
        device.publish(topic(d, "telemetry"), telemetry(2, now_ms + 10 * 60_000, count=1))
        device.publish(topic(d, "telemetry"), telemetry(3, now_ms - 29 * 86_400_000, count=1))
        device.publish(topic(d, "telemetry"), telemetry(4, 0, count=1))
    finally:
        device.close()
    wait_until(
        lambda: count(database_url, "SELECT count(*) FROM telemetry_messages") == 4,
        what="the messages",
    )
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT seq, ts_suspect, received_at IS NOT NULL FROM samples ORDER BY seq"
        ).fetchall()
        # Suspect-clock samples are kept by receipt time, out of the time-partitioned table.
        suspect = conn.execute(
            "SELECT seq, (extract(epoch FROM ts) * 1000)::int8, received_at IS NOT NULL"
            " FROM suspect_samples ORDER BY seq"
        ).fetchall()
        flagged = conn.execute(
            "SELECT seq FROM telemetry_messages WHERE ts_suspect ORDER BY seq"
        ).fetchall()
        seen = conn.execute("SELECT last_seen FROM devices WHERE id = %s", [d]).fetchone()
    assert rows == [(3, False, True)]
    assert suspect == [
        (1, now_ms - 31 * 86_400_000, True),
        (2, now_ms + 10 * 60_000, True),
        (4, 0, True),
    ]
    assert flagged == [(1,), (2,), (4,)]
    # A suspect clock never becomes "last seen".
    assert seen is not None
    assert int(seen[0].timestamp() * 1000) == now_ms - 29 * 86_400_000


def test_late_samples_mark_their_hours_for_the_rollup_recompute(
    database_url, broker, devices, ingest_workers: IngestWorkers
):
    ingest_workers.start()
    d = devices[0].device_id
    device = connect(broker, devices[0])
    now_ms = int(time.time() * 1000)
    hour_ms = 3_600_000
    boundary_ms = (now_ms // hour_ms - 3) * hour_ms  # an hour boundary 3 to 4 hours ago
    try:
        # 10 samples 100 ms apart across the boundary, then a live message.
        device.publish(topic(d, "telemetry"), telemetry(1, boundary_ms - 500))
        device.publish(topic(d, "telemetry"), telemetry(2, now_ms - 60_000))
    finally:
        device.close()
    wait_until(lambda: count(database_url, "SELECT count(*) FROM samples") == 20, what="rows")
    with psycopg.connect(database_url) as conn:
        storage = conn.execute("SELECT value FROM galvani_meta WHERE key = 'storage'").fetchone()
        hours = conn.execute(
            "SELECT device_id, (extract(epoch FROM hour) * 1000)::int8 FROM rollup_dirty"
            " ORDER BY hour"
        ).fetchall()
    assert storage is not None
    assert storage[0] != "timescaledb"  # where continuous aggregates refresh themselves
    assert hours == [(d, boundary_ms - hour_ms), (d, boundary_ms)]


def test_sessions_are_built_from_events_and_telemetry_in_any_order(
    database_url, broker, devices, ingest_workers: IngestWorkers
):
    ingest_workers.start()
    d = devices[0].device_id
    start = event(1, T0_MS, "session_start", session="s-9", mode="LIFT", level=4, user="u-1")
    # 20 s of output, 5 s of it dry (impedance outside the gel band), then an end.
    samples = [
        telemetry(1 + i, T0_MS + 1000 * i, session="s-9", z_ohm=8200 if i < 15 else 150_000)
        for i in range(1, 21)
    ]
    end = event(30, T0_MS + 21_000, "session_end", session="s-9", duration_s=21, reason="completed")
    later_end = event(
        31, T0_MS + 22_000, "session_end", session="s-9", duration_s=22, reason="user_stopped"
    )
    device = connect(broker, devices[0])
    try:
        device.publish(topic(d, "events"), end)
        device.publish_many([(topic(d, "telemetry"), p) for p in samples])
        device.publish(topic(d, "events"), later_end)
        device.publish(topic(d, "events"), start)
        device.publish(topic(d, "events"), end)  # a redelivered end changes nothing
    finally:
        device.close()
    wait_until(
        lambda: (
            count(database_url, "SELECT count(*) FROM sessions WHERE start_seq IS NOT NULL") == 1
            and count(database_url, "SELECT samples FROM sessions") == 200
        ),
        what="the session",
    )
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT mode, level, user_id, duration_s, end_reason, output_s, samples,"
            " gel_ok_samples, start_batt_pct, brand_id FROM sessions"
        ).fetchone()
    assert row == ("LIFT", 4, "u-1", 22.0, "user_stopped", 20.0, 200, 140, 78, "acme")


def test_malformed_payloads_become_dead_letters_and_valid_ones_are_stored(
    database_url, broker, devices, ingest_workers: IngestWorkers
):
    ingest_workers.start()
    d = devices[0].device_id
    bad: list[tuple[str, bytes]] = []
    kinds = [
        b"{not json",
        json.dumps({"v": 1, "seq": "one", "samples": []}).encode(),
        json.dumps({"v": 1, "seq": 1, "samples": [{"ts": 1, "i_ua": "high"}]}).encode(),
        b"{" + b'"a":' * 0 + b'"x": ' + b"[" * 40 + b"]" * 40 + b"}",
        b'{"v": 1, "pad": "' + b"x" * (70 * 1024) + b'"}',
        b"[1, 2, 3]",
        b"\xff\xfe not utf-8",
        json.dumps({"v": 2, "seq": 1, "ts": 1, "type": "reboot", "reason": "panic"}).encode(),
    ]
    for i in range(1000):
        channel = ("telemetry", "events", "state", "presence")[i % 4]
        bad.append((topic(d, channel), kinds[i % len(kinds)]))
    good = [(topic(d, "telemetry"), telemetry(seq, T0_MS + seq * 1000)) for seq in range(1, 201)]
    mixed = [m for pair in zip(bad[:200], good, strict=True) for m in pair] + bad[200:]
    device = connect(broker, devices[0])
    try:
        rcs = device.publish_many(mixed)
        # A device cannot publish outside its four channels: the broker refuses it, so it is
        # never acknowledged and the device knows.
        assert device.publish(topic(d, "diagnostics"), b"{}") == NOT_AUTHORIZED
    finally:
        device.close()
    assert all(rc in ACCEPTED for rc in rcs)
    wait_until(
        lambda: count(database_url, "SELECT count(*) FROM dead_letters") == 1000,
        what="1000 dead letters",
    )
    wait_until(lambda: count(database_url, "SELECT count(*) FROM samples") == 2000, what="rows")
    with psycopg.connect(database_url) as conn:
        reasons = dict(
            conn.execute("SELECT reason, count(*) FROM dead_letters GROUP BY reason").fetchall()
        )
        biggest = conn.execute(
            "SELECT payload_size, length(payload) FROM dead_letters WHERE reason = 'too_large'"
            " LIMIT 1"
        ).fetchone()
    assert set(reasons) == {
        "bad_json",
        "invalid",
        "too_deep",
        "too_large",
        "not_object",
        "not_utf8",
    }
    assert biggest is not None
    assert biggest[0] > 70 * 1024
    assert biggest[1] == biggest[0]  # kept whole: the device was told it is stored
    assert (
        ingest_workers.metric("1", "galvani_ingest_dead_letters_total", 'reason="too_large"')
        == reasons["too_large"]
    )


REFUSED = "refused-by-the-test"


def refuse_session(url: str, table: str, errcode: str) -> None:
    """Make the database refuse every row of ``table`` in the session ``REFUSED``."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "CREATE FUNCTION refuse_session() RETURNS trigger LANGUAGE plpgsql AS $$"
            f" BEGIN IF NEW.session = '{REFUSED}' THEN"
            f" RAISE EXCEPTION 'refused by the test' USING ERRCODE = '{errcode}'; END IF;"
            " RETURN NEW; END $$"
        )
        conn.execute(
            f"CREATE TRIGGER refuse_session BEFORE INSERT ON {table}"
            " FOR EACH ROW EXECUTE FUNCTION refuse_session()"
        )


def test_a_message_the_database_refuses_becomes_a_dead_letter_without_stalling(
    database_url, broker, devices, ingest_workers: IngestWorkers
):
    # Every value the protocol allows fits the schema (protocol.md, "Bounds the schema sets"),
    # so the database refuses this valid message as a constraint would.
    refuse_session(database_url, "sessions", "check_violation")
    ingest_workers.start()
    d = devices[0].device_id
    start = event(2, T0_MS, "session_start", session=REFUSED, mode="LIFT", level=3)
    device = connect(broker, devices[0])
    try:
        device.publish_many(
            [
                (topic(d, "telemetry"), telemetry(1, T0_MS)),
                (topic(d, "events"), start),
            ]
            + [(topic(d, "telemetry"), telemetry(seq, T0_MS + seq * 1000)) for seq in range(3, 50)]
        )
    finally:
        device.close()
    wait_until(lambda: count(database_url, "SELECT count(*) FROM samples") == 480, what="rows")
    assert scalar(database_url, "SELECT reason FROM dead_letters") == "unstorable"
    # Under its device, so the device's brand finds it among its dead letters.
    assert scalar(database_url, "SELECT device_id FROM dead_letters") == d


def test_a_value_past_a_database_limit_becomes_a_dead_letter_instead_of_a_retry_loop(
    database_url, broker, devices, ingest_workers: IngestWorkers
):
    # PostgreSQL raises program_limit_exceeded (an OperationalError, like a lost connection)
    # for a value past one of its limits, such as an index entry over ~2,700 bytes; the
    # protocol's bounds keep valid messages inside them, so the test has the database raise it.
    # The message must be split out, not retried forever.
    refuse_session(database_url, "samples", "program_limit_exceeded")
    ingest_workers.start()
    d = devices[0].device_id
    poison = telemetry(1, T0_MS, session=REFUSED)
    device = connect(broker, devices[0])
    try:
        device.publish_many(
            [(topic(d, "telemetry"), poison)]
            + [(topic(d, "telemetry"), telemetry(seq, T0_MS + seq * 1000)) for seq in range(2, 6)]
        )
    finally:
        device.close()
    wait_until(lambda: count(database_url, "SELECT count(*) FROM samples") == 40, what="rows")
    wait_until(
        lambda: count(database_url, "SELECT count(*) FROM dead_letters") == 1, what="dead letter"
    )
    assert scalar(database_url, "SELECT reason FROM dead_letters") == "unstorable"
    assert ingest_workers.procs["1"].poll() is None


def test_a_batch_being_written_does_not_hold_up_rows_that_reference_its_devices(database_url):
    [device] = provision(database_url, 1)
    now = datetime.now(UTC)
    message = Inbound(topic(device.device_id, "telemetry"), telemetry(1, T0_MS), 1, 1, now, 1)
    with (
        psycopg.connect(database_url) as ingest,
        psycopg.connect(database_url) as rules,
        ingest.transaction(),
    ):
        write_batch(ingest, [decode_inbound(message)], storage_of(ingest))
        # What the rules engine does for an alert, while the batch is not yet committed.
        rules.execute("SET lock_timeout = '2s'")
        rules.execute(
            "INSERT INTO config_pushes (device_id, version, payload, sha256, reason, source,"
            " issued_at) VALUES (%s, 1, '{}', 'x', 'test', 'rule', now())",
            [device.device_id],
        )
        rules.commit()
    assert count(database_url, "SELECT count(*) FROM samples") == 10
    assert count(database_url, "SELECT count(*) FROM config_pushes") == 1
