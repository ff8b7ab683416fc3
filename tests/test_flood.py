"""A device flooding the broker: banned for a while, every acknowledged message of it stored
once, and every other device's ingest lag kept under 5 s (issue 19, item 4)."""

import re
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY, generate_latest

from bench.flood import FloodProcess, SteadyDevices, acked_stored, lags_s, wait_stored
from bench.mqtt_load import DeviceLogin
from deploy.stack.mosquitto import MosquittoBroker
from services.common.broker_auth import (
    DEVICE_BAN_FILE,
    DEVICE_PASSWD_FILE,
    BrokerFiles,
    ServiceAccount,
    ban_devices,
    lift_expired_bans,
)
from services.common.migrations.grants import ServiceRole
from services.ingest import metrics
from services.ingest.throttle import Budget, Counts, Throttle
from services.maintenance.jobs import run_pass
from services.rules.sweeps import BANS_LOOKBACK, sweep
from tests.api import auth
from tests.ingest import T0_MS, Device, IngestWorkers, connect_device, provision, wait_until
from tests.mqtt import MqttClient, Refused
from tests.promtool import RULES_DIR, check_rules, run_rule_tests
from tests.roles import as_service
from tests.rules import RulesWorkers, alerts

FLOOD_S = 12.0
BUDGET = 500
BAN_S = 3.0
LAG_LIMIT_S = 5.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_devices_over_their_budget_in_a_window_are_named() -> None:
    clock = FakeClock()
    counts = Counts(Budget(messages=5, window_s=10.0), clock)
    assert counts.add(["a"] * 4 + ["b"]) == ([], 0)
    assert counts.add(["a"] * 3 + ["b"]) == (["a"], 2)
    assert counts.add(["a"] * 4 + ["b"]) == (["a"], 4)
    counts.forget("a")  # banned: it starts afresh
    assert counts.add(["a"] * 5) == ([], 0)
    clock.now += 10.0  # a new window
    assert counts.add(["a"] * 5 + ["b"] * 6) == (["b"], 1)


def test_a_ban_no_broker_can_apply_is_counted_as_failed(
    db: psycopg.Connection[tuple[object, ...]], tmp_path: Path
) -> None:
    def failed() -> float:
        value = REGISTRY.get_sample_value(
            "galvani_ingest_devices_throttled_total", {"action": "ban_failed"}
        )
        return value or 0.0

    before = failed()
    throttle = Throttle(Budget(3, 10.0), 60.0, tmp_path, lambda work: work(db))
    throttle.observe(["dev-x"] * 4)
    assert failed() == before + 1
    assert "dev-x" in BrokerFiles(tmp_path).bans()  # held from the broker's next start
    throttle.observe(["dev-x"] * 4)  # not tried again before a ban would have ended
    assert failed() == before + 1


@pytest.fixture
def ban_files(broker: MosquittoBroker) -> Iterator[BrokerFiles]:
    """The test broker's files; the ban file is removed afterwards (the broker is shared)."""
    files = BrokerFiles(broker.config.directory)
    yield files
    files.path(DEVICE_BAN_FILE).unlink(missing_ok=True)


def test_banned_device_is_disconnected_kept_out_and_let_back_in(
    database_url: str,
    broker: MosquittoBroker,
    sync_devices: Callable[[], int],
    ban_files: BrokerFiles,
) -> None:
    banned, other = provision(database_url, 2, prefix="ban")
    sync_devices()
    client = connect_device(broker.config.device_port, banned)
    bystander = connect_device(broker.config.device_port, other)
    try:
        with psycopg.connect(database_url) as conn:
            ban_devices(conn, ban_files, {banned.device_id: time.time() + 60})
            assert client.wait_disconnected(5), "the broker did not disconnect the banned device"
            passwd = ban_files.path(DEVICE_PASSWD_FILE).read_text()
            assert banned.device_id not in passwd
            # A provisioning call meanwhile renders the file again: the ban holds.
            sync_devices()
            assert banned.device_id not in ban_files.path(DEVICE_PASSWD_FILE).read_text()
            assert bystander.connected
            assert lift_expired_bans(conn, ban_files) == []
            assert lift_expired_bans(conn, ban_files, time.time() + 61) == [banned.device_id]
        assert banned.device_id in ban_files.path(DEVICE_PASSWD_FILE).read_text()
        assert ban_files.bans() == {}
        back = _connect_eventually(broker.config.device_port, banned)
        back.close()
    finally:
        client.close()
        bystander.close()


def _connect_eventually(port: int, device: Device) -> MqttClient:
    # The reload after a render takes a moment; until then the old file refuses the device.
    deadline = time.monotonic() + 5
    while True:
        try:
            return connect_device(port, device)
        except Refused:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.fixture
def throttled_ingest(
    ingest_database_url: str,
    broker: MosquittoBroker,
    service_passwords: dict[ServiceAccount, str],
    tmp_path: Path,
    ban_files: BrokerFiles,
) -> Iterator[IngestWorkers]:
    """One ingest worker (as ingest's role) with a small budget and short bans, writing bans to
    the test broker."""
    workers = IngestWorkers.on_broker(
        ingest_database_url,
        broker,
        service_passwords,
        tmp_path,
        GALVANI_INGEST_BROKER_DIR=str(broker.config.directory),
        GALVANI_INGEST_THROTTLE_MESSAGES=str(BUDGET),
        GALVANI_INGEST_THROTTLE_WINDOW_S="10",
        GALVANI_INGEST_THROTTLE_BAN_S=str(BAN_S),
    )
    yield workers
    workers.close()


def test_flooding_device_is_throttled_and_other_devices_keep_up(
    database_url: str,
    broker: MosquittoBroker,
    sync_devices: Callable[[], int],
    throttled_ingest: IngestWorkers,
) -> None:
    flooder, *normal = [
        DeviceLogin(d.device_id, d.password) for d in provision(database_url, 4, prefix="flood")
    ]
    sync_devices()
    throttled_ingest.start()
    port = broker.config.device_port
    steady = SteadyDevices(port, normal, broker.config.pki.ca_file)
    steady.start()
    first_ts_ms = int(time.time() * 1000) - 3_600_000
    flood = FloodProcess(port, flooder, FLOOD_S, 1000, first_ts_ms, broker.config.pki.ca_file)
    try:
        flood.start()
        result = flood.result(FLOOD_S + 60)
    finally:
        steady.stop()
        flood.stop()
    assert not steady.errors
    normal_ids = [d.device_id for d in normal]
    assert wait_stored(database_url, normal_ids, sum(steady.sent.values()), 30)
    assert wait_stored(database_url, [flooder.device_id], result.acked, 30)

    lags = lags_s(database_url, normal_ids)
    assert len(lags) >= 3 * FLOOD_S * 0.9
    assert max(lags) < LAG_LIMIT_S, f"other devices' lag reached {max(lags):.1f} s"
    # Every message the flooder had a PUBACK for is stored, once (and its one sample).
    assert result.acked > BUDGET
    assert acked_stored(database_url, flooder.device_id, result.acked, first_ts_ms) == (
        result.acked,
        result.acked,
        result.acked,
    )
    # Banned (disconnected and refused), let back in after the ban, banned again, counted.
    assert result.closed >= 2
    assert result.refused >= 1
    assert result.connects >= 2
    metric = throttled_ingest.metric
    banned = metric("1", "galvani_ingest_devices_throttled_total", 'action="banned"')
    assert banned >= 2
    assert metric("1", "galvani_ingest_devices_throttled_total", 'action="lifted"') >= 1
    assert metric("1", "galvani_ingest_over_budget_messages_total") > 0
    assert f"device flooding: {flooder.device_id} sent over {BUDGET} messages" in (
        throttled_ingest.log_text()
    )
    assert all(
        device_id not in BrokerFiles(broker.config.directory).bans() for device_id in normal_ids
    )


def test_device_flooding_alert_fires_on_bans() -> None:
    assert "SUCCESS: 1 rules found" in check_rules("galvani-ingest-alerts.yml")
    assert "SUCCESS" in run_rule_tests("galvani-ingest-alerts.test.yml")


def test_device_flooding_alert_reads_a_metric_ingest_exports() -> None:
    metrics.THROTTLED.labels("banned")
    exported = set(
        re.findall(r"^(galvani_ingest_\w+?)(?:\{| )", generate_latest(REGISTRY).decode(), re.M)
    )
    used = set(
        re.findall(r"galvani_ingest_\w+", (RULES_DIR / "galvani-ingest-alerts.yml").read_text())
    )
    assert used == {"galvani_ingest_devices_throttled_total"}
    assert used <= exported


# The brand's side of a ban: a device_flooding alert, from the ban ingest records.


def _bans(url: str, device_id: str) -> list[tuple[int, int, float]]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT messages_over_budget, budget, window_s FROM device_throttles"
            " WHERE device_id = %s ORDER BY id",
            [device_id],
        ).fetchall()
    return [(int(str(over)), int(str(budget)), float(str(window))) for over, budget, window in rows]


def _brand_alerts(client: TestClient, key: str) -> list[dict[str, Any]]:
    response = client.get("/v1/alerts", headers=auth(key))
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return [alert for alert in items if alert["rule"] == "device_flooding"]


def test_a_flooding_devices_brand_sees_a_device_flooding_alert_and_no_other_brand_does(
    database_url: str,
    broker: MosquittoBroker,
    service_passwords: dict[ServiceAccount, str],
    sync_devices: Callable[[], int],
    throttled_ingest: IngestWorkers,
    keys: dict[str, str],
    client: TestClient,
    key_dir: Path,
    tmp_path: Path,
) -> None:
    [flooder] = provision(database_url, 1, prefix="brandflood", brand="acme")
    sync_devices()
    (tmp_path / "rules").mkdir()
    rules = RulesWorkers.on_broker(
        as_service(database_url, ServiceRole.RULES),
        broker,
        service_passwords,
        tmp_path / "rules",
        GALVANI_RULES_SIGNING_KEY_DIR=str(key_dir),
        GALVANI_RULES_SWEEP_INTERVAL_S="0.5",
    )
    throttled_ingest.start()
    rules.start()
    login = DeviceLogin(flooder.device_id, flooder.password)
    flood = FloodProcess(
        broker.config.device_port, login, 2.0, 1000, T0_MS, broker.config.pki.ca_file
    )
    try:
        flood.start()
        result = flood.result(60)
        assert result.acked > BUDGET
        # Ingest (as its own role) recorded the ban: the budget and how far past it the device was.
        wait_until(lambda: bool(_bans(database_url, flooder.device_id)), 30, "a recorded ban")
        over, budget, window_s = _bans(database_url, flooder.device_id)[0]
        assert (budget, window_s) == (BUDGET, 10.0)
        assert over >= 1
        # The rules' sweep (a real worker, as rules' role) raised it to the device's brand.
        wait_until(lambda: bool(_brand_alerts(client, keys["viewer"])), 30, "the brand's alert")
    finally:
        flood.stop()
        rules.close()
    [alert] = _brand_alerts(client, keys["viewer"])
    assert alert["device_id"] == flooder.device_id
    assert (alert["severity"], alert["state"]) == ("warning", "open")
    bans = _bans(database_url, flooder.device_id)
    assert 1 <= alert["count"] <= len(bans)  # each ban counts once; later bans raise the count
    explanation = alert["explanation"]
    assert explanation["threshold"] == {"budget_messages": BUDGET, "window_s": 10.0}
    assert explanation["observed"]["messages_over_budget"] >= 1
    assert f"messages past its budget of {BUDGET} in 10 s" in explanation["text"]
    assert f"the broker refused it for {BAN_S:g} s" in explanation["text"]
    assert explanation["action"] == "no action was taken on the device"
    # Another brand sees neither the alert nor, by its id, its detail.
    assert _brand_alerts(client, keys["other"]) == []
    response = client.get(f"/v1/alerts/{alert['id']}", headers=auth(keys["other"]))
    assert response.status_code == 404


def _ban_row(url: str, device_id: str, banned_at: datetime, over: int) -> None:
    """A ban as ingest records it, written as ingest's role (INSERT is all it may do)."""
    with psycopg.connect(as_service(url, ServiceRole.INGEST)) as conn:
        conn.execute(
            "INSERT INTO device_throttles (device_id, banned_at, until, messages_over_budget,"
            " window_s, budget) VALUES (%s, %s, %s, %s, 10, 2000)",
            [device_id, banned_at, banned_at + timedelta(seconds=30), over],
        )


def _sweep_as_rules(url: str, now: datetime) -> None:
    with psycopg.connect(as_service(url, ServiceRole.RULES)) as conn, conn.transaction():
        sweep(conn, Ed25519PrivateKey.generate(), now)


def test_repeated_bans_raise_the_open_alerts_count_and_each_ban_counts_once(
    database_url: str,
) -> None:
    [device] = provision(database_url, 1, prefix="reban")
    now = datetime.now(UTC)
    _ban_row(database_url, device.device_id, now - timedelta(minutes=5), 40)
    _sweep_as_rules(database_url, now)
    _sweep_as_rules(database_url, now)  # a sweep again counts nothing new
    [alert] = alerts(database_url, "device_flooding")
    assert (alert.count, alert.severity, alert.state) == (1, "warning", "open")
    _ban_row(database_url, device.device_id, now - timedelta(minutes=1), 900)
    _sweep_as_rules(database_url, now)
    [alert] = alerts(database_url, "device_flooding")
    assert alert.count == 2
    assert alert.explanation["observed"]["messages_over_budget"] == 900  # the latest ban's
    # A ban from before the lookback (the rules were down for a day) is not raised late.
    [old] = provision(database_url, 1, prefix="oldban")
    _ban_row(database_url, old.device_id, now - BANS_LOOKBACK - timedelta(minutes=1), 5)
    _sweep_as_rules(database_url, now)
    assert [a.device_id for a in alerts(database_url, "device_flooding")] == [device.device_id]


def test_a_ban_is_applied_even_when_it_cannot_be_recorded(
    database_url: str,
    api_database_url: str,
    broker: MosquittoBroker,
    sync_devices: Callable[[], int],
    ban_files: BrokerFiles,
) -> None:
    def throttled(action: str) -> float:
        value = REGISTRY.get_sample_value(
            "galvani_ingest_devices_throttled_total", {"action": action}
        )
        return value or 0.0

    [device] = provision(database_url, 1, prefix="norecord")
    sync_devices()
    banned, unrecorded = throttled("banned"), throttled("record_failed")
    # The API's role reads devices (for the ban) but may not write device_throttles.
    with psycopg.connect(api_database_url, autocommit=True) as conn:

        def in_transaction(work: Callable[[psycopg.Connection[Any]], None]) -> None:
            with conn.transaction():
                work(conn)

        throttle = Throttle(Budget(3, 10.0), 60.0, broker.config.directory, in_transaction)
        throttle.observe([device.device_id] * 5)
    assert device.device_id in ban_files.bans()
    assert throttled("banned") == banned + 1
    assert throttled("record_failed") == unrecorded + 1
    assert _bans(database_url, device.device_id) == []


def test_maintenance_trims_bans_past_the_retention_period(
    database_url: str, maintenance_database_url: str
) -> None:
    kept, old = provision(database_url, 2, prefix="trimban")
    now = datetime.now(UTC)
    _ban_row(database_url, kept.device_id, now - timedelta(days=89), 1)
    _ban_row(database_url, old.device_id, now - timedelta(days=91), 1)
    with psycopg.connect(maintenance_database_url) as conn:
        run_pass(conn, now, timedelta(hours=1))
    assert len(_bans(database_url, kept.device_id)) == 1
    assert _bans(database_url, old.device_id) == []
