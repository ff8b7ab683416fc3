"""Devices reported offline when they go silent (services/maintenance/silent_devices.py): the
wills a broker killed -9 never sent.

The database tests store messages through ingest's real writer (as the ingest role) with the
receipt times they need, and run maintenance's pass as the maintenance role; the last test
kills a Mosquitto of its own with -9 under a connected device that never comes back.
"""

import itertools
import json
import signal
import time
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from pydantic import ValidationError

from deploy.stack.mosquitto import MosquittoBroker, local_broker
from deploy.stack.pki import DevelopmentPKI
from deploy.stack.ports import free_port
from deploy.stack.processes import Child
from services.common.broker_auth import ServiceAccount, active_device_credentials
from services.common.db import storage_of
from services.common.subscriber import Inbound
from services.ingest.decode import decode_inbound
from services.ingest.writer import write_batch
from services.maintenance.jobs import PassResult, run_pass
from services.maintenance.settings import MaintenanceSettings
from tests.ingest import (
    Device,
    IngestWorkers,
    connect_device,
    provision,
    telemetry,
    topic,
    wait_until,
)
from tests.maintenance import spawn_maintenance
from tests.mqtt import MqttClient
from tests.roles import refused

SILENT_AFTER_S = 300.0
LONG_AGO = timedelta(seconds=400)  # silent for longer than SILENT_AFTER_S
_mids = itertools.count(1)


def ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


def presence(online: bool, at: datetime) -> bytes:
    return json.dumps({"v": 1, "online": online, "ts": ms(at)}).encode()


def store(ingest_url: str, device_id: str, channel: str, payload: bytes, at: datetime) -> None:
    """One message through ingest's writer, as the ingest role, received at ``at``."""
    message = Inbound(topic(device_id, channel), payload, next(_mids), 1, at, 1)
    with psycopg.connect(ingest_url) as conn, conn.transaction():
        write_batch(conn, [decode_inbound(message)], storage_of(conn))


def heard(ingest_url: str, device_id: str, at: datetime, seq: int) -> None:
    """The device says it is online, then sends a heartbeat sample, both received at ``at``."""
    store(ingest_url, device_id, "presence", presence(True, at), at)
    store(ingest_url, device_id, "telemetry", telemetry(seq, ms(at), count=1), at)


def a_pass(maintenance_url: str) -> PassResult:
    """One maintenance pass as the maintenance role."""
    with psycopg.connect(maintenance_url, autocommit=True) as conn:
        return run_pass(conn, datetime.now(UTC), timedelta(hours=2), silent_after_s=SILENT_AFTER_S)


def device_row(url: str, device_id: str) -> tuple[bool, datetime | None]:
    """(online, silent_since)."""
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT online, silent_since FROM devices WHERE id = %s", [device_id]
        ).fetchone()
    assert row is not None
    return bool(row[0]), row[1]


def logged(url: str, device_id: str) -> list[tuple[bool, datetime | None]]:
    """The device's presence log: (online, ts), oldest first."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT online, ts FROM presence_log WHERE device_id = %s ORDER BY id", [device_id]
        ).fetchall()
    return [(bool(online), ts) for online, ts in rows]


@pytest.fixture
def two_devices(database_url: str) -> tuple[str, str]:
    silent, heard_recently = provision(database_url, 2, prefix="silent")
    return silent.device_id, heard_recently.device_id


def test_a_device_silent_past_the_threshold_is_reported_offline_once(
    database_url: str,
    ingest_database_url: str,
    maintenance_database_url: str,
    two_devices: tuple[str, str],
) -> None:
    silent, recent = two_devices
    now = datetime.now(UTC)
    heard(ingest_database_url, silent, now - LONG_AGO, 1)
    heard(ingest_database_url, recent, now - timedelta(seconds=10), 1)
    assert device_row(database_url, silent) == (True, None)

    result = a_pass(maintenance_database_url)

    assert (result.silent_marked, result.silent_revived) == (1, 0)
    online, silent_since = device_row(database_url, silent)
    assert online is False
    assert silent_since is not None
    assert abs((silent_since - datetime.now(UTC)).total_seconds()) < 30
    # As a will is logged: offline, no device time.
    [(said_online, ts), will_like] = logged(database_url, silent)
    assert said_online is True
    assert ts is not None
    assert will_like == (False, None)
    assert device_row(database_url, recent) == (True, None)
    assert [o for o, _ in logged(database_url, recent)] == [True]
    # Once: the next pass finds nothing more to mark.
    again = a_pass(maintenance_database_url)
    assert (again.silent_marked, again.silent_revived) == (0, 0)
    assert len(logged(database_url, silent)) == 2


def test_nothing_is_marked_when_no_device_at_all_was_heard_within_the_threshold(
    database_url: str,
    ingest_database_url: str,
    maintenance_database_url: str,
    two_devices: tuple[str, str],
) -> None:
    """Ingest down or stalled, or the database just restored: our outage, not the fleet's."""
    now = datetime.now(UTC)
    for device_id in two_devices:
        heard(ingest_database_url, device_id, now - LONG_AGO, 1)

    result = a_pass(maintenance_database_url)

    assert (result.silent_marked, result.silent_revived) == (0, 0)
    for device_id in two_devices:
        assert device_row(database_url, device_id) == (True, None)
        assert [o for o, _ in logged(database_url, device_id)] == [True]


def test_a_message_received_after_the_mark_reports_the_device_online_again(
    database_url: str,
    ingest_database_url: str,
    maintenance_database_url: str,
    two_devices: tuple[str, str],
) -> None:
    """Ingest catching up on a backlog: the device was only ours to hear late."""
    silent, recent = two_devices
    now = datetime.now(UTC)
    heard(ingest_database_url, silent, now - LONG_AGO, 1)
    heard(ingest_database_url, recent, now, 1)
    assert a_pass(maintenance_database_url).silent_marked == 1
    _, silent_since = device_row(database_url, silent)
    assert silent_since is not None

    # A message received before the mark, stored only now, says nothing about after it.
    store(
        ingest_database_url,
        silent,
        "telemetry",
        telemetry(2, ms(now - timedelta(seconds=350)), count=1),
        silent_since - timedelta(seconds=1),
    )
    assert a_pass(maintenance_database_url).silent_revived == 0
    assert device_row(database_url, silent) == (False, silent_since)

    received = datetime.now(UTC)
    store(ingest_database_url, silent, "telemetry", telemetry(3, ms(received), count=1), received)
    result = a_pass(maintenance_database_url)

    assert (result.silent_marked, result.silent_revived) == (0, 1)
    assert device_row(database_url, silent) == (True, None)
    assert [(o, ts) for o, ts in logged(database_url, silent)][1:] == [(False, None), (True, None)]


def test_the_devices_own_presence_ends_the_silence_at_once(
    database_url: str,
    ingest_database_url: str,
    maintenance_database_url: str,
    two_devices: tuple[str, str],
) -> None:
    silent, recent = two_devices
    now = datetime.now(UTC)
    heard(ingest_database_url, silent, now - LONG_AGO, 1)
    heard(ingest_database_url, recent, now, 1)
    assert a_pass(maintenance_database_url).silent_marked == 1

    # A batch without presence leaves the mark (maintenance's revival is the one for that).
    store(ingest_database_url, silent, "telemetry", telemetry(2, ms(now), count=1), now)
    assert device_row(database_url, silent)[1] is not None
    back = datetime.now(UTC)
    store(ingest_database_url, silent, "presence", presence(True, back), back)

    assert device_row(database_url, silent) == (True, None)
    # The will of a later connection is the device's word too: offline, but not for silence.
    gone = datetime.now(UTC)
    store(
        ingest_database_url,
        silent,
        "presence",
        json.dumps({"v": 1, "online": False}).encode(),
        gone,
    )
    assert device_row(database_url, silent) == (False, None)
    assert a_pass(maintenance_database_url).silent_revived == 0


def test_a_device_row_ingest_holds_is_skipped_not_waited_for(
    database_url: str,
    ingest_database_url: str,
    maintenance_database_url: str,
    two_devices: tuple[str, str],
) -> None:
    """Ingest locks a batch's device rows in id order; maintenance takes none it would wait
    for (no deadlock, no stall of ingest), and marks the device on a later pass."""
    silent, recent = two_devices
    now = datetime.now(UTC)
    heard(ingest_database_url, silent, now - LONG_AGO, 1)
    heard(ingest_database_url, recent, now, 1)
    with psycopg.connect(ingest_database_url) as ingest:
        ingest.execute(
            "SELECT id FROM devices WHERE id = %s FOR NO KEY UPDATE", [silent]
        )  # as a batch of ingest's locks it (services/ingest/writer.py)
        with psycopg.connect(
            maintenance_database_url, autocommit=True, options="-c lock_timeout=2s"
        ) as conn:
            held = run_pass(
                conn, datetime.now(UTC), timedelta(hours=2), silent_after_s=SILENT_AFTER_S
            )
        assert held.silent_marked == 0
        ingest.rollback()
    assert a_pass(maintenance_database_url).silent_marked == 1
    assert device_row(database_url, silent)[0] is False


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE devices SET last_received_at = now()",
        "UPDATE devices SET presence_at = now()",
        "UPDATE devices SET brand_id = 'other'",
        "SELECT credential_hash FROM devices",
        "SELECT * FROM presence_log",
        "DELETE FROM presence_log",
        "UPDATE presence_log SET online = true",
        "INSERT INTO devices (id, brand_id, model) VALUES ('x', 'acme', 'm1')",
    ],
)
def test_the_maintenance_role_may_set_presence_and_nothing_else_of_a_device(
    maintenance_database_url: str, statement: str
) -> None:
    assert refused(maintenance_database_url, statement)


def test_silent_after_must_exceed_the_heartbeat_period(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GALVANI_MAINTENANCE_DATABASE_URL", "postgresql://x@127.0.0.1/x")
    assert MaintenanceSettings().silent_after_s == 300.0
    monkeypatch.setenv("GALVANI_MAINTENANCE_SILENT_AFTER_S", "61")
    assert MaintenanceSettings().silent_after_s == 61.0
    monkeypatch.setenv("GALVANI_MAINTENANCE_SILENT_AFTER_S", "60")
    with pytest.raises(ValidationError, match="heartbeat"):
        MaintenanceSettings()


# -- the broker killed -9 --------------------------------------------------------------------

# The least the settings allow (more than the 60 s heartbeat), and a short pass interval.
FAULT_SILENT_AFTER_S = 61.0
FAULT_INTERVAL_S = 2.0
HEARTBEAT_S = 5.0  # the surviving device's samples (a real idle device: one a minute)
# Time for a pass to run and this test's poll to see it.
SLACK_S = 5.0


@pytest.fixture
def kill9_devices(database_url: str) -> tuple[Device, Device]:
    """One device that reconnects after the kill, one that never does."""
    returning, lost = provision(database_url, 2, prefix="kill9")
    return returning, lost


@pytest.fixture
def own_broker(
    stack_root: Path,
    service_passwords: dict[ServiceAccount, str],
    pki: DevelopmentPKI,
    database_url: str,
    kill9_devices: tuple[Device, Device],
) -> Iterator[MosquittoBroker]:
    """A Mosquitto of this test's own (killing the session's would break other tests),
    admitting the test's devices."""
    server = local_broker(stack_root / f"silent-{uuid.uuid4().hex[:8]}", service_passwords, pki)
    with psycopg.connect(database_url) as conn:
        server.start(active_device_credentials(conn))
    yield server
    server.stop()


@pytest.fixture
def maintenance_process(
    maintenance_database_url: str, tmp_path: Path
) -> Iterator[tuple[Child, int]]:
    """``services.maintenance.main`` with the short settings, and its metrics port."""
    port = free_port()
    child = spawn_maintenance(
        maintenance_database_url,
        tmp_path / "maintenance.log",
        interval_s=str(FAULT_INTERVAL_S),
        silent_after_s=str(FAULT_SILENT_AFTER_S),
        metrics_port=port,
    )
    yield child, port
    child.stop()


def metric(port: int, series: str) -> float:
    """One sample of maintenance's /metrics, 0 when absent."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def connect_with_will(broker: MosquittoBroker, device: Device, seq: int) -> MqttClient:
    """Connect as the agent does (retained will ``online: false``), say online, send a sample."""
    will = (topic(device.device_id, "presence"), json.dumps({"v": 1, "online": False}).encode())
    client = connect_device(broker.config.device_port, device, will=will)
    now = datetime.now(UTC)
    client.publish(topic(device.device_id, "presence"), presence(True, now), retain=True)
    client.publish(topic(device.device_id, "telemetry"), telemetry(seq, ms(now), count=1))
    return client


def test_a_device_whose_broker_was_killed_9_and_never_came_back_is_reported_offline(
    database_url: str,
    ingest_database_url: str,
    service_passwords: dict[ServiceAccount, str],
    kill9_devices: tuple[Device, Device],
    own_broker: MosquittoBroker,
    maintenance_process: tuple[Child, int],
    tmp_path: Path,
) -> None:
    """No will is published for the devices of a broker killed -9; maintenance reports the
    one that never comes back offline within silent_after_s + one pass interval, while the
    one that reconnects stays online throughout."""
    returning, lost = kill9_devices
    maintenance, metrics_port = maintenance_process
    ingest = IngestWorkers.on_broker(ingest_database_url, own_broker, service_passwords, tmp_path)
    seqs = {returning.device_id: itertools.count(1), lost.device_id: itertools.count(1)}
    clients: list[MqttClient] = []
    try:
        ingest.start()
        for device in (returning, lost):
            clients.append(connect_with_will(own_broker, device, next(seqs[device.device_id])))
        wait_until(
            lambda: all(device_row(database_url, d.device_id)[0] for d in (returning, lost)),
            what="both devices online",
        )

        # kill -9: no will is published for either device.
        assert own_broker.child is not None
        own_broker.child.stop(signal.SIGKILL)
        own_broker.child = None
        killed = time.monotonic()
        for client in clients:  # the old connections are gone; ``lost`` stays off for good
            client.drop()
        clients.clear()
        with psycopg.connect(database_url) as conn:
            own_broker.start(active_device_credentials(conn))
        # ``returning`` reconnects, says online and keeps its heartbeat.
        clients.append(connect_with_will(own_broker, returning, next(seqs[returning.device_id])))
        next_heartbeat = time.monotonic() + HEARTBEAT_S
        deadline = killed + FAULT_SILENT_AFTER_S + FAULT_INTERVAL_S + SLACK_S
        while device_row(database_url, lost.device_id)[0]:
            assert maintenance.alive(), maintenance.log_tail(20)
            assert time.monotonic() < deadline, (
                f"{lost.device_id} still online {time.monotonic() - killed:.1f} s after the kill"
            )
            if time.monotonic() >= next_heartbeat:
                now = datetime.now(UTC)
                seq = next(seqs[returning.device_id])
                clients[0].publish(
                    topic(returning.device_id, "telemetry"), telemetry(seq, ms(now), count=1)
                )
                next_heartbeat += HEARTBEAT_S
            assert device_row(database_url, returning.device_id) == (True, None)
            time.sleep(0.2)
        took = time.monotonic() - killed
        print(f"silent_offline_after_s={took:.1f}", flush=True)
    finally:
        for client in clients:
            client.close()
        ingest.close()

    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT extract(epoch FROM silent_since - last_received_at)::float8 FROM devices"
            " WHERE id = %s",
            [lost.device_id],
        ).fetchone()
    assert row is not None
    silence_s = float(row[0])
    print(f"silence_when_marked_s={silence_s:.1f}", flush=True)
    # Not before the threshold, and within one pass of it.
    assert FAULT_SILENT_AFTER_S <= silence_s <= FAULT_SILENT_AFTER_S + FAULT_INTERVAL_S + SLACK_S
    assert took <= FAULT_SILENT_AFTER_S + FAULT_INTERVAL_S + SLACK_S
    assert logged(database_url, lost.device_id)[-1] == (False, None)
    assert device_row(database_url, returning.device_id) == (True, None)
    assert (False, None) not in logged(database_url, returning.device_id)
    wait_until(
        lambda: (
            metric(metrics_port, 'galvani_maintenance_devices_silent_total{change="offline"}')
            == 1.0
        ),
        10,
        "the offline count in maintenance's metrics",
    )
