"""Ingest under faults: a worker killed mid-stream, PostgreSQL stopped mid-stream."""

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest

from deploy.stack.mosquitto import MosquittoBroker
from deploy.stack.ports import free_port
from deploy.stack.postgres import PostgresConfig, PostgresServer, new_password, require_postgres
from deploy.stack.processes import service_user
from services.common.broker_auth import BrokerFiles, ServiceAccount, sync_device_credentials
from services.common.migrate import upgrade
from tests.ingest import (
    T0_MS,
    Device,
    IngestWorkers,
    connect_device,
    provision,
    scalar,
    telemetry,
    topic,
    wait_until,
)

ACCEPTED = (0, 16)


def publish_from_all(broker: MosquittoBroker, devices: list[Device], per_device: int) -> list[int]:
    """Every device publishes ``per_device`` one-sample messages at once; all PUBACK codes."""

    def run(device: Device) -> list[int]:
        client = connect_device(broker.config.device_port, device)
        try:
            return client.publish_many(
                [
                    (
                        topic(device.device_id, "telemetry"),
                        telemetry(seq, T0_MS + seq * 100, count=1),
                    )
                    for seq in range(1, per_device + 1)
                ]
            )
        finally:
            client.close()

    with ThreadPoolExecutor(len(devices)) as pool:
        return [rc for rcs in pool.map(run, devices) for rc in rcs]


def samples(url: str) -> int:
    return int(str(scalar(url, "SELECT count(*) FROM samples")))


def assert_stored_exactly_once(url: str, devices: int, per_device: int) -> None:
    with psycopg.connect(url) as conn:
        total, distinct = conn.execute(
            "SELECT count(*), count(DISTINCT (device_id, seq)) FROM samples"
        ).fetchone() or (0, 0)
        ledger = conn.execute("SELECT count(*) FROM telemetry_messages").fetchone()
        counters = conn.execute(
            "SELECT min(seq_count), max(seq_count), max(seq_gaps) FROM devices"
        ).fetchone()
    assert (total, distinct) == (devices * per_device, devices * per_device)
    assert ledger == (devices * per_device,)
    assert counters == (per_device, per_device, 0)


def test_worker_killed_with_50000_messages_in_flight_loses_and_repeats_nothing(
    database_url, broker, sync_devices, ingest_workers: IngestWorkers
):
    devices = provision(database_url, 50)
    sync_devices()
    ingest_workers.start()
    with ThreadPoolExecutor(1) as pool:
        publishing = pool.submit(publish_from_all, broker, devices, 1000)
        wait_until(lambda: samples(database_url) > 2000, what="ingest to get going")
        ingest_workers.kill()
        killed_at = samples(database_url)
        rcs = publishing.result(timeout=300)
    assert len(rcs) == 50_000
    assert all(rc in ACCEPTED for rc in rcs)
    assert killed_at < 50_000, "the worker must die with messages still in flight"
    ingest_workers.start()
    wait_until(lambda: samples(database_url) >= 50_000, timeout_s=180, what="the backlog")
    time.sleep(1)  # anything stored twice would show up now
    assert_stored_exactly_once(database_url, 50, 1000)


@pytest.fixture
def own_postgres(stack_root: Path) -> Iterator[PostgresServer]:
    """A PostgreSQL of this test's own, which it may stop and start."""
    config = PostgresConfig(
        data_dir=stack_root / f"pg-outage-{time.monotonic_ns()}" / "data",
        port=free_port(),
        password=new_password(),
        run_as=service_user(),
        durable=False,
    )
    server = PostgresServer(require_postgres(), config, stack_root / "postgres-outage.log")
    server.start()
    yield server
    server.stop()


RECEIVE_MAXIMUM = 300


def test_database_outage_holds_bounded_messages_and_drains_after(
    own_postgres: PostgresServer,
    broker: MosquittoBroker,
    service_passwords: dict[ServiceAccount, str],
    tmp_path: Path,
):
    url = own_postgres.config.url()
    upgrade(url)
    devices = provision(url, 20)
    with psycopg.connect(url) as conn:
        sync_device_credentials(conn, BrokerFiles(broker.config.directory))
    workers = IngestWorkers.on_broker(
        url,
        broker,
        service_passwords,
        tmp_path,
        GALVANI_INGEST_RECEIVE_MAXIMUM=str(RECEIVE_MAXIMUM),
        GALVANI_INGEST_BATCH_MAX_MESSAGES="200",
    )
    try:
        worker = workers.start()
        with ThreadPoolExecutor(1) as pool:
            publishing = pool.submit(publish_from_all, broker, devices, 500)
            wait_until(lambda: samples(url) > 500, what="ingest to get going")
            own_postgres.stop()
            stopped_at = time.monotonic()
            inflight = []
            while time.monotonic() - stopped_at < 10:
                inflight.append(workers.metric("1", "galvani_ingest_inflight_messages"))
                time.sleep(0.5)
            own_postgres.start()
            rcs = publishing.result(timeout=300)
        assert all(rc in ACCEPTED for rc in rcs)
        # Nothing was acknowledged while the database was away, and the worker held no more
        # than the broker's in-flight window for it.
        assert max(inflight) == RECEIVE_MAXIMUM
        wait_until(lambda: samples(url) >= 10_000, timeout_s=120, what="the backlog")
        time.sleep(1)
        assert_stored_exactly_once(url, 20, 500)
        assert worker.poll() is None, "the worker must ride out the outage, not exit"
        assert (
            workers.metric("1", "galvani_ingest_db_retries_total", 'error="DatabaseUnavailable"')
            > 0
        )
    finally:
        workers.close()
