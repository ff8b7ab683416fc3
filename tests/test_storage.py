"""Schema and storage behaviour on the real PostgreSQL: TimescaleDB and plain partitions."""

from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from alembic.script import ScriptDirectory
from psycopg import errors

from services.common.db import Storage, storage_of
from services.common.migrate import alembic_config, upgrade
from services.maintenance.jobs import run_pass

T0 = datetime(2026, 11, 20, 10, 0, 0, tzinfo=UTC)


def insert_samples(
    conn: psycopg.Connection,
    device_id: str,
    start: datetime,
    count: int,
    step=timedelta(milliseconds=100),
) -> None:
    with (
        conn.cursor() as cur,
        cur.copy(
            "COPY samples (device_id, ts, seq, out, i_ua, z_ohm, received_at) FROM STDIN"
        ) as copy,
    ):
        for i in range(count):
            copy.write_row(
                (device_id, start + i * step, 1 + i // 10, True, 100.0 + i % 50, 8000.0, start)
            )


def seed_device(conn: psycopg.Connection, device_id: str = "dev-001") -> None:
    conn.execute("INSERT INTO brands (id, name) VALUES ('acme', 'Acme') ON CONFLICT DO NOTHING")
    conn.execute("INSERT INTO devices (id, brand_id, model) VALUES (%s, 'acme', 'm1')", [device_id])


def test_migrations_apply_to_an_empty_database_and_are_idempotent(empty_database_url):
    upgrade(empty_database_url)
    upgrade(empty_database_url)
    with psycopg.connect(empty_database_url) as conn:
        head = ScriptDirectory.from_config(alembic_config(empty_database_url)).get_current_head()
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [(head,)]
        tables = {
            r[0]
            for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        }
    assert {
        "brands",
        "api_keys",
        "devices",
        "users",
        "samples",
        "events",
        "sessions",
        "alerts",
        "alert_transitions",
        "mode_tables",
        "config_pushes",
        "telemetry_messages",
        "dead_letters",
        "state_reports",
        "presence_log",
        "samples_1m",
        "samples_1h",
        "suspect_samples",
    } <= tables


def test_samples_is_a_hypertable_when_timescaledb_is_present(db):
    assert storage_of(db) is Storage.TIMESCALEDB_APACHE
    assert db.execute(
        "SELECT hypertable_name FROM timescaledb_information.hypertables"
    ).fetchall() == [("samples",)]
    seed_device(db)
    insert_samples(db, "dev-001", T0, 3 * 24 * 36000 // 100, step=timedelta(seconds=10))
    chunks = db.execute("SELECT count(*) FROM show_chunks('samples')").fetchone()[0]
    assert chunks >= 3


def test_a_suspect_sample_is_stored_once_per_message_and_place(db):
    # suspect_samples is keyed by the message and the sample's place in it, not by device time
    # (a wrong clock repeats times), and is no hypertable: its times make no chunks.
    insert = (
        "INSERT INTO suspect_samples (device_id, seq, idx, ts, received_at)"
        " VALUES ('dev-001', 7, %s, to_timestamp(1), now())"
    )
    db.execute(insert, [0])
    db.execute(insert, [1])
    with pytest.raises(errors.UniqueViolation):
        db.execute(insert, [1])
    db.rollback()
    hypertables = db.execute(
        "SELECT count(*) FROM timescaledb_information.hypertables"
        " WHERE hypertable_name = 'suspect_samples'"
    ).fetchone()
    assert hypertables == (0,)


def test_plain_postgres_path_partitions_samples(empty_database_url):
    upgrade(empty_database_url, storage="plain")
    with psycopg.connect(empty_database_url) as conn:
        assert storage_of(conn) is Storage.PLAIN
        assert conn.execute(
            "SELECT count(*) FROM pg_extension WHERE extname = 'timescaledb'"
        ).fetchone() == (0,)
        strategy = conn.execute(
            "SELECT partstrat FROM pg_partitioned_table WHERE partrelid = 'samples'::regclass"
        ).fetchone()
        assert strategy == ("r",)
        seed_device(conn)
        now = datetime.now(UTC).replace(microsecond=0)
        insert_samples(conn, "dev-001", now - timedelta(minutes=5), 600)
        in_default = conn.execute("SELECT count(*) FROM samples_default").fetchone()[0]
        assert in_default == 0, "recent samples belong in a daily partition"


def bucket_query(conn):
    return conn.execute(
        "SELECT time_bucket(INTERVAL '1 minute', ts) AS b, count(*), min(i_ua), avg(i_ua)::real,"
        " max(i_ua) FROM samples WHERE device_id = 'dev-001' GROUP BY b ORDER BY b"
    ).fetchall()


def test_plain_time_bucket_gives_the_same_buckets_as_timescaledb(db, empty_database_url):
    upgrade(empty_database_url, storage="plain")
    start = T0 + timedelta(seconds=17, milliseconds=300)
    with psycopg.connect(empty_database_url) as plain:
        for conn in (db, plain):
            seed_device(conn)
            insert_samples(conn, "dev-001", start, 1234, step=timedelta(milliseconds=370))
            conn.commit()
        hyper, partitioned = bucket_query(db), bucket_query(plain)
        for width in ("1 hour", "1 day", "15 minutes"):
            q = f"SELECT time_bucket(INTERVAL '{width}', TIMESTAMPTZ '2026-11-20 10:37:12+00')"
            assert db.execute(q).fetchone() == plain.execute(q).fetchone()
    assert len(hyper) == 8
    assert hyper == partitioned


@pytest.mark.parametrize("storage", ["auto", "plain"])
def test_redelivered_samples_and_events_are_stored_once(empty_database_url, storage):
    upgrade(empty_database_url, storage=storage)
    with psycopg.connect(empty_database_url) as conn:
        seed_device(conn)
        for _ in range(2):
            conn.execute(
                "INSERT INTO samples (device_id, ts, seq, received_at) VALUES"
                " ('dev-001', %s, 7, now()), ('dev-001', %s, 7, now()) ON CONFLICT DO NOTHING",
                [T0, T0 + timedelta(milliseconds=100)],
            )
            conn.execute(
                "INSERT INTO events (device_id, seq, ts, type, body, received_at)"
                " VALUES ('dev-001', 8, %s, 'reboot', '{}', now()) ON CONFLICT DO NOTHING",
                [T0],
            )
        assert conn.execute("SELECT count(*) FROM samples").fetchone() == (2,)
        assert conn.execute("SELECT count(*) FROM events").fetchone() == (1,)
        with pytest.raises(errors.UniqueViolation):
            conn.execute(
                "INSERT INTO samples (device_id, ts, seq, received_at)"
                " VALUES ('dev-001', %s, 9, now())",
                [T0],
            )


def open_alert(conn, rule="overcurrent"):
    conn.execute(
        "INSERT INTO alerts (brand_id, device_id, rule, rule_version, severity, first_seen,"
        " last_seen, explanation) VALUES ('acme', 'dev-001', %s, 1, 'critical', now(), now(),"
        " '{}')",
        [rule],
    )


def test_database_allows_one_unresolved_alert_per_device_and_rule(db):
    seed_device(db)
    open_alert(db)
    open_alert(db, rule="no_gel")
    with pytest.raises(errors.UniqueViolation), db.transaction():
        open_alert(db)
    db.execute("UPDATE alerts SET state = 'acknowledged' WHERE rule = 'overcurrent'")
    with pytest.raises(errors.UniqueViolation), db.transaction():
        open_alert(db)
    db.execute(
        "UPDATE alerts SET state = 'resolved', resolved_at = now() WHERE rule = 'overcurrent'"
    )
    open_alert(db)
    assert db.execute("SELECT count(*) FROM alerts WHERE rule = 'overcurrent'").fetchone() == (2,)


@pytest.mark.parametrize("storage", ["auto", "plain"])
def test_maintenance_refreshes_rollups_and_drops_expired_samples(empty_database_url, storage):
    upgrade(empty_database_url, storage=storage)
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        seed_device(conn)
        insert_samples(conn, "dev-001", now - timedelta(minutes=30), 6000)  # 10 min of 10 Hz
        late = now - timedelta(days=3)
        insert_samples(conn, "dev-001", late, 600)
        conn.execute(
            "INSERT INTO samples (device_id, ts, seq, received_at)"
            " VALUES ('dev-001', %s, 1, now())",
            [now - timedelta(days=120)],
        )
        # Ingest marks the hour a late batch touched; the pass recomputes it.
        conn.execute(
            "INSERT INTO rollup_dirty VALUES ('dev-001', time_bucket('1 hour', %s::timestamptz))",
            [late],
        )
        result = run_pass(conn, now, timedelta(hours=2))
        minute = conn.execute(
            "SELECT count(*), sum(n), sum(n_out), max(i_ua_max), min(i_ua_min) FROM samples_1m"
        ).fetchone()
        hour = conn.execute("SELECT sum(n) FROM samples_1h").fetchone()
        remaining_old = conn.execute(
            "SELECT count(*) FROM samples WHERE ts < now() - interval '90 days'"
        ).fetchone()
        dirty_left = conn.execute("SELECT count(*) FROM rollup_dirty").fetchone()
    assert minute == (11, 6600, 6600, 149.0, 100.0)
    assert hour == (6600,)
    assert remaining_old == (0,)
    assert dirty_left == (0,)
    assert result.rollup_rows > 0


def test_plain_partition_created_later_takes_its_rows_from_the_default(empty_database_url):
    upgrade(empty_database_url, storage="plain")
    far = (datetime.now(UTC) + timedelta(days=30)).replace(
        hour=12, minute=0, second=0, microsecond=0
    )
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        seed_device(conn)
        insert_samples(conn, "dev-001", far, 10)
        assert conn.execute("SELECT count(*) FROM samples_default").fetchone() == (10,)
        created = conn.execute(
            "SELECT galvani_ensure_partitions(%s::date, %s::date)", [far.date(), far.date()]
        ).fetchone()
        assert created == (1,)
        assert conn.execute("SELECT count(*) FROM samples_default").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM samples").fetchone() == (10,)
