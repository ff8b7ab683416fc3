"""Maintenance's replication metrics, read from the suite's real PostgreSQL: no replica, then a
WAL receiver streaming from it (pg_receivewal, which PostgreSQL lists in pg_stat_replication as
it lists a standby)."""

import os
import re
import subprocess
import time
from pathlib import Path

import psycopg
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from deploy.stack.postgres import SUPERUSER, PostgresServer
from services.maintenance.replication import (
    Replication,
    ReplicationCollector,
    read_replication,
)

WAIT_S = 15.0


def exported(replication: Replication | None) -> str:
    """The metrics page maintenance serves after a pass that read ``replication``."""
    collector = ReplicationCollector()
    collector.update(replication)
    registry = CollectorRegistry()
    registry.register(collector)
    return generate_latest(registry).decode()


def read(url: str) -> Replication:
    with psycopg.connect(url, autocommit=True) as conn:
        return read_replication(conn)


def test_no_replica_is_a_count_of_zero_and_no_lag_series(
    database_url: str, maintenance_database_url: str
) -> None:
    for url in (database_url, maintenance_database_url):
        assert read(url) == Replication(replicas=0, lag_s={}, hidden=0)
    page = exported(read(maintenance_database_url))
    assert re.search(r"^galvani_db_replicas 0\.0$", page, re.M)
    assert "galvani_db_replication_lag_seconds{" not in page


def test_nothing_is_exported_before_a_pass_or_when_the_database_is_down() -> None:
    assert "galvani_db_" not in exported(None)


def test_a_streaming_replica_is_counted_and_its_lag_shown_to_a_monitoring_role(
    postgres: PostgresServer, database_url: str, maintenance_database_url: str, tmp_path: Path
) -> None:
    """A WAL receiver connected: the superuser sees its lag, maintenance's own role (without
    pg_monitor) sees it only as a count."""
    wal_dir = tmp_path / "wal"
    wal_dir.mkdir()
    config = postgres.config
    log_path = tmp_path / "pg_receivewal.log"
    log = log_path.open("wb")
    receiver = subprocess.Popen(
        [
            postgres.install.program("pg_receivewal"),
            "--directory",
            str(wal_dir),
            f"--dbname=host={config.host} port={config.port} user={SUPERUSER}"
            " application_name=replica-a",
            "--no-loop",
            "--no-password",
        ],
        env={**os.environ, "PGPASSWORD": config.password},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + WAIT_S
        while (seen := read(database_url)).replicas == 0:
            assert receiver.poll() is None, log_path.read_text()
            if time.monotonic() > deadline:
                pytest.fail("pg_receivewal never showed in pg_stat_replication")
            time.sleep(0.1)
        assert seen.replicas == 1
        assert list(seen.lag_s) == ["replica-a"]
        assert 0 <= seen.lag_s["replica-a"] < WAIT_S
        page = exported(seen)
        assert re.search(r'^galvani_db_replication_lag_seconds\{replica="replica-a"\} ', page, re.M)

        hidden = read(maintenance_database_url)
        assert (hidden.replicas, hidden.lag_s, hidden.hidden) == (1, {}, 1)
    finally:
        receiver.terminate()
        receiver.wait(timeout=10)
        log.close()
