"""Suspect-clock samples: stored by receipt time apart from the time-partitioned samples, so a
wrong clock creates no chunk or partition and no rollup work, and is kept for the retention
period after it arrived (issue 19, items 1 and 2)."""

import json
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from services.common.db import Storage, storage_of
from services.common.migrate import upgrade
from services.common.subscriber import Inbound
from services.ingest.batch import BatchOutcome
from services.ingest.decode import DeadLetter, decode_inbound
from services.ingest.writer import write_batch
from services.maintenance.jobs import run_pass
from tests.ingest import provision, state, topic

DAY_MS = 86_400_000
HOUR_MS = 3_600_000
YEAR_2100_MS = int(datetime(2100, 1, 1, tzinfo=UTC).timestamp() * 1000)


def spread(seq: int, start_ms: int, step_ms: int, count: int = 1000) -> bytes:
    """A telemetry message of ``count`` samples ``step_ms`` apart."""
    samples = [{"ts": start_ms + step_ms * i, "i_ua": 300.0, "z_ohm": 8200} for i in range(count)]
    return json.dumps({"v": 1, "seq": seq, "session": "s-1", "samples": samples}).encode()


def ingest(
    url: str, device_id: str, *payloads: bytes, received_at: datetime | None = None
) -> BatchOutcome:
    """Decode and write one batch of telemetry in one transaction, as a worker does."""
    at = received_at or datetime.now(UTC)
    messages = [
        decode_inbound(Inbound(topic(device_id, "telemetry"), p, 1, 1, at, 1)) for p in payloads
    ]
    assert not [m for m in messages if isinstance(m, DeadLetter)]
    with psycopg.connect(url) as conn, conn.transaction():
        return write_batch(conn, messages, storage_of(conn))


def chunks(conn: psycopg.Connection) -> int:
    row = conn.execute(
        "SELECT count(*) FROM timescaledb_information.chunks WHERE hypertable_name = 'samples'"
    ).fetchone()
    assert row is not None
    return int(row[0])


def counts(url: str, device_id: str) -> tuple[int, int, int]:
    """Rows in samples, suspect_samples and rollup_dirty for the device."""
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM samples WHERE device_id = %(d)s),"
            " (SELECT count(*) FROM suspect_samples WHERE device_id = %(d)s),"
            " (SELECT count(*) FROM rollup_dirty WHERE device_id = %(d)s)",
            {"d": device_id},
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


def test_a_far_future_message_creates_no_chunks(database_url):
    [device] = provision(database_url, 1)
    with psycopg.connect(database_url) as conn:
        assert storage_of(conn) is not Storage.PLAIN  # the suite runs on TimescaleDB
        before = chunks(conn)
    # 1,000 samples one day apart from 2100 on: a chunk a day, never expiring, before.
    outcome = ingest(database_url, device.device_id, spread(1, YEAR_2100_MS, DAY_MS))
    with psycopg.connect(database_url) as conn:
        after = chunks(conn)
        stored = conn.execute(
            "SELECT min(ts), max(ts), count(DISTINCT idx), bool_and(received_at > now() - "
            "interval '1 minute') FROM suspect_samples"
        ).fetchone()
    assert after - before <= 1
    assert counts(database_url, device.device_id) == (0, 1000, 0)
    assert outcome.samples_suspect == 1000
    assert stored == (
        datetime(2100, 1, 1, tzinfo=UTC),
        datetime(2100, 1, 1, tzinfo=UTC) + timedelta(days=999),
        1000,
        True,
    )


@pytest.mark.parametrize("storage", ["auto", "plain"])
def test_far_past_samples_add_no_rollup_work(empty_database_url, storage):
    upgrade(empty_database_url, storage=storage)
    [device] = provision(empty_database_url, 1)
    # A clock that restarted at the epoch: 1,000 samples an hour apart, each hour once
    # marked for the rollup recompute before.
    ingest(empty_database_url, device.device_id, spread(1, 1000, HOUR_MS))
    assert counts(empty_database_url, device.device_id) == (0, 1000, 0)


def test_a_message_with_some_suspect_samples_splits_them_by_clock(database_url):
    [device] = provision(database_url, 1)
    hour_ms = (int(datetime.now(UTC).timestamp() * 1000) // HOUR_MS - 2) * HOUR_MS
    samples = [{"ts": hour_ms + 1000}, {"ts": 1000}, {"ts": hour_ms + 1100}]
    payload = json.dumps({"v": 1, "seq": 7, "samples": samples}).encode()
    ingest(database_url, device.device_id, payload)
    with psycopg.connect(database_url) as conn:
        suspect = conn.execute("SELECT seq, idx, ts FROM suspect_samples").fetchall()
        ledger = conn.execute("SELECT samples, ts_suspect FROM telemetry_messages").fetchall()
    assert counts(database_url, device.device_id) == (2, 1, 1)  # the late hour is marked
    assert suspect == [(7, 1, datetime(1970, 1, 1, 0, 0, 1, tzinfo=UTC))]
    assert ledger == [(3, True)]


def test_suspect_samples_are_stored_once_however_the_message_is_resent(database_url):
    [device] = provision(database_url, 1)
    d = device.device_id
    payload = spread(1, YEAR_2100_MS, DAY_MS, count=50)
    # A stuck clock repeats one time: each sample is still its own row.
    stuck = spread(2, 1000, 0, count=20)
    ingest(database_url, d, payload, stuck)
    again = ingest(database_url, d, payload, stuck)
    # Other firmware may serialize a resend anew: the same content, other bytes.
    anew = ingest(database_url, d, json.dumps(json.loads(payload), indent=1).encode())
    assert counts(database_url, d) == (0, 70, 0)
    assert again.duplicates["telemetry"] == 2
    assert anew.duplicates["telemetry"] == 1
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM message_conflicts").fetchone() == (0,)


def test_a_wrong_clock_is_kept_for_the_retention_period_after_receipt(database_url):
    [device] = provision(database_url, 1)
    d = device.device_id
    now = datetime.now(UTC)
    # Received now with ts=1000: retention by device time dropped it on the next pass.
    ingest(database_url, d, spread(1, 1000, 100, count=10), received_at=now)
    ingest(database_url, d, spread(2, YEAR_2100_MS, DAY_MS, count=10), received_at=now)
    # Received longer ago than the retention period (90 days): dropped by receipt time.
    ingest(database_url, d, spread(3, 1000, 100, count=10), received_at=now - timedelta(days=91))
    with psycopg.connect(database_url, autocommit=True) as conn:
        run_pass(conn, now, timedelta(hours=2))
        kept = conn.execute(
            "SELECT seq, count(*) FROM suspect_samples GROUP BY seq ORDER BY seq"
        ).fetchall()
    assert kept == [(1, 10), (2, 10)]


def test_a_state_report_from_a_wrong_clock_does_not_stay_the_newest(database_url):
    [device] = provision(database_url, 1)
    d = device.device_id
    now = datetime.now(UTC)
    now_ms = int(now.timestamp() * 1000)
    answer = {"version": 3, "sha256": "abc", "status": "applied", "reason": None}
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "INSERT INTO config_pushes (device_id, version, payload, sha256, reason, source,"
            " issued_at) VALUES (%s, 3, '{}', 'abc', 'test', 'api', now())",
            [d],
        )
    # Year 2100 first: by device time it stayed the newest report for good, so the firmware
    # the device reported next, and its answers to config pushes, never showed.
    for seq, ts_ms, fw, at in [
        (1, YEAR_2100_MS, "9.9.9", now - timedelta(seconds=2)),
        (2, now_ms, "1.5.0", now),
    ]:
        payload = state(seq, ts_ms, fw=fw, config=answer)
        item = decode_inbound(Inbound(topic(d, "state"), payload, 1, 1, at, 1))
        with psycopg.connect(database_url) as conn, conn.transaction():
            write_batch(conn, [item], storage_of(conn))
    with psycopg.connect(database_url) as conn:
        fw = conn.execute("SELECT fw FROM devices WHERE id = %s", [d]).fetchone()
        answered = conn.execute("SELECT answered_at FROM config_pushes").fetchone()
    assert fw == ("1.5.0",)
    assert answered is not None
    assert abs(answered[0].timestamp() * 1000 - now_ms) < 1
