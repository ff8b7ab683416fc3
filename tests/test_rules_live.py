"""The rules worker as a real process between a real broker, database and devices."""

import base64
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from deploy.stack.mosquitto import MosquittoBroker
from services.common.protocol import signing_input
from services.common.signing import load_or_create_key, public_key_b64
from tests.ingest import (
    Device,
    IngestWorkers,
    connect_device,
    provision,
    scalar,
    topic,
    wait_until,
)
from tests.rules import RulesWorkers, Stream, overcurrent_telemetry, run
from tests.test_agent_live import AgentProcess

Provisioned = Callable[[int, str], list[Device]]


@pytest.fixture
def provisioned(database_url: str, sync_devices: Any) -> Provisioned:
    """Provision ``count`` devices named ``prefix-…`` and give the broker their credentials."""

    def provision_and_sync(count: int, prefix: str) -> list[Device]:
        devices = provision(database_url, count, prefix=prefix)
        sync_devices()
        return devices

    return provision_and_sync


def _triggers(url: str) -> int:
    """How many occurrences the rules have counted."""
    count = scalar(url, "SELECT count(*) FROM alert_triggers")
    assert isinstance(count, int)
    return count


def _fault(seq: int, ts_ms: int, code: str = "dc_offset") -> bytes:
    return json.dumps({"v": 1, "seq": seq, "ts": ts_ms, "type": "fault", "code": code}).encode()


def test_the_signing_key_is_created_owner_only_on_first_run(
    database_url: str, rules_workers: RulesWorkers, key_dir: Path
) -> None:
    rules_workers.start()
    key_file = key_dir / "config-signing-key.pem"
    assert key_file.exists()
    assert key_file.stat().st_mode & 0o777 == 0o600


def test_an_overcurrent_raises_an_alert_and_the_signed_safe_table_reaches_the_device(
    database_url: str,
    broker: MosquittoBroker,
    provisioned: Provisioned,
    rules_workers: RulesWorkers,
    key_dir: Path,
) -> None:
    [device] = provisioned(1, "live")
    rules_workers.start()
    public = Ed25519PublicKey.from_public_bytes(
        base64.b64decode(public_key_b64(load_or_create_key(key_dir)))
    )
    client = connect_device(broker.config.device_port, device)
    try:
        client.subscribe(topic(device.device_id, "config"))
        now = int(time.time() * 1000)
        fault = overcurrent_telemetry(1, now)
        assert client.publish(topic(device.device_id, "telemetry"), fault) == 0
        pushed = client.wait_for(topic(device.device_id, "config"), 20)
    finally:
        client.close()
    assert pushed is not None, rules_workers.log_text()[-2000:]
    table = json.loads(pushed.payload)
    public.verify(base64.b64decode(table["sig"]), signing_input(table))  # raises if forged
    assert table["locked_modes"] == ["LIFT", "TIGHTEN", "INFUSE"]
    assert table["reason"] == "overcurrent"
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT rule, severity, count, explanation->>'text' FROM alerts WHERE device_id = %s",
            [device.device_id],
        ).fetchone()
        published = conn.execute(
            "SELECT version, published_at IS NOT NULL FROM config_pushes WHERE device_id = %s",
            [device.device_id],
        ).fetchall()
    assert row is not None
    assert row[:3] == ("overcurrent", "critical", 1)
    assert "switched to safe mode (mode table v1)" in str(row[3])
    assert published == [(1, True)]
    assert (
        rules_workers.metric(
            "1", "galvani_rules_alerts_total", 'rule="overcurrent",severity="critical"'
        )
        == 1
    )
    assert rules_workers.metric("1", "galvani_rules_published_total", 'outcome="published"') == 1


def test_a_real_agent_with_an_overcurrent_fault_is_switched_to_safe_mode_and_answers(
    database_url: str,
    broker: MosquittoBroker,
    provisioned: Provisioned,
    ingest_workers: IngestWorkers,
    rules_workers: RulesWorkers,
    key_dir: Path,
    tmp_path: Path,
) -> None:
    [device] = provisioned(1, "agent")
    ingest_workers.start("1")
    rules_workers.start()
    agent = AgentProcess(tmp_path, device, broker.config.device_port, load_or_create_key(key_dir))
    agent.start("--session=LIFT:5:40", "--scenario=overcurrent-spike")
    try:

        def safe_mode_applied() -> bool:
            return (
                scalar(
                    database_url,
                    "SELECT answer_status FROM config_pushes WHERE device_id = %s AND version = 1",
                    [device.device_id],
                )
                == "applied"
            )

        wait_until(safe_mode_applied, 90, "the agent to apply the SAFE table")
    finally:
        agent.stop()
    with psycopg.connect(database_url) as conn:
        rules = {
            r[0]: r[1]
            for r in conn.execute(
                "SELECT rule, severity FROM alerts WHERE device_id = %s", [device.device_id]
            ).fetchall()
        }
    assert rules.get("overcurrent") == "critical"


def test_killing_the_rules_worker_mid_stream_misses_and_duplicates_no_alert(
    database_url: str,
    broker: MosquittoBroker,
    provisioned: Provisioned,
    rules_workers: RulesWorkers,
) -> None:
    devices = provisioned(20, "kill")
    rules_workers.start()
    per_device = 25
    now = int(time.time() * 1000)
    clients = [connect_device(broker.config.device_port, d) for d in devices]
    done = threading.Event()

    def publish() -> None:
        for seq in range(1, per_device + 1):
            for d, client in zip(devices, clients, strict=True):
                code = "overcurrent" if seq == 2 else "dc_offset"
                client.publish(topic(d.device_id, "events"), _fault(seq, now + seq * 1000, code))
        done.set()

    publisher = threading.Thread(target=publish)
    publisher.start()
    try:
        wait_until(
            lambda: _triggers(database_url) >= 100,
            60,
            "a fifth of the stream evaluated",
        )
        rules_workers.kill()
        time.sleep(0.5)
        rules_workers.start()
        publisher.join(120)
        assert done.is_set()
        total = len(devices) * per_device
        wait_until(
            lambda: _triggers(database_url) >= total,
            60,
            "every fault evaluated",
        )
        time.sleep(1)  # anything evaluated twice would show now
    finally:
        for client in clients:
            client.close()
    with psycopg.connect(database_url) as conn:
        counts = conn.execute(
            "SELECT device_id, rule, severity, count FROM alerts ORDER BY device_id"
        ).fetchall()
        triggers = conn.execute(
            "SELECT count(*), count(DISTINCT (device_id, key)) FROM alert_triggers"
        ).fetchone()
        tables = conn.execute(
            "SELECT device_id, count(*), count(published_at) FROM config_pushes GROUP BY device_id"
        ).fetchall()
    assert triggers == (total, total)
    assert counts == [(d.device_id, "device_fault", "critical", per_device) for d in devices]
    # One SAFE table per device, and every one published, whether its device's push was
    # recorded before or after the kill (a table recorded but not published when the worker
    # died is published by the restarted worker's first sweep).
    assert sorted(tables) == [(d.device_id, 1, 1) for d in devices]


def test_two_workers_find_runs_whose_messages_were_dealt_to_different_workers(
    database_url: str,
    broker: MosquittoBroker,
    provisioned: Provisioned,
    rules_workers: RulesWorkers,
) -> None:
    devices = provisioned(10, "pair")
    rules_workers.start("1")
    rules_workers.start("2")
    start = int(time.time() * 1000)
    for d in devices:
        client = connect_device(broker.config.device_port, d)
        try:
            for part in range(4):  # 4 messages of 2 samples at 520 µA: one 0.7 s run
                samples = [
                    {
                        "ts": start + 200 * part + 100 * i,
                        "mode": "LIFT",
                        "out": True,
                        "i_ua": 520.0,
                        "i_set_ua": 300.0,
                        "z_ohm": 30_000.0,
                    }
                    for i in range(2)
                ]
                body = {"v": 1, "seq": part + 1, "session": "s-1", "samples": samples}
                assert (
                    client.publish(topic(d.device_id, "telemetry"), json.dumps(body).encode()) == 0
                )
        finally:
            client.close()

    def evaluated() -> bool:
        return sum(
            rules_workers.metric(
                w, "galvani_rules_messages_total", 'channel="telemetry",outcome="evaluated"'
            )
            for w in ("1", "2")
        ) >= 4 * len(devices)

    wait_until(evaluated, 30, "every message evaluated")
    assert all(
        rules_workers.metric(
            w, "galvani_rules_messages_total", 'channel="telemetry",outcome="evaluated"'
        )
        > 0
        for w in ("1", "2")
    ), "the broker dealt every message to one worker"
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT a.device_id, a.count, t.ended_at - t.started_at FROM alerts a"
            " JOIN alert_triggers t ON t.alert_id = a.id"
            " WHERE a.rule = 'overcurrent' ORDER BY a.device_id"
        ).fetchall()
    assert [(r[0], r[1], r[2].total_seconds()) for r in rows] == [
        (d.device_id, 1, 0.7) for d in devices
    ]


def test_a_table_recorded_but_never_published_reaches_the_device_after_a_restart(
    database_url: str,
    broker: MosquittoBroker,
    provisioned: Provisioned,
    rules_workers: RulesWorkers,
    key_dir: Path,
) -> None:
    """The worker died between its commit and the publish: the table is in the database only."""
    [device] = provisioned(1, "lost")
    stream = Stream(device.device_id)
    stream.event("fault", int(time.time() * 1000), code="short_circuit")
    run(database_url, load_or_create_key(key_dir), stream.messages)  # records, publishes nothing
    assert scalar(database_url, "SELECT count(published_at) FROM config_pushes") == 0
    client = connect_device(broker.config.device_port, device)
    try:
        client.subscribe(topic(device.device_id, "config"))
        rules_workers.start()
        pushed = client.wait_for(topic(device.device_id, "config"), 20)
    finally:
        client.close()
    assert pushed is not None
    assert json.loads(pushed.payload)["version"] == 1
    assert scalar(database_url, "SELECT count(published_at) FROM config_pushes") == 1


def test_a_message_the_engine_cannot_store_is_skipped_and_the_stream_goes_on(
    database_url: str,
    broker: MosquittoBroker,
    provisioned: Provisioned,
    rules_workers: RulesWorkers,
) -> None:
    [device] = provisioned(1, "poison")
    # Every value the protocol allows fits the schema (protocol.md, "Bounds the schema sets"),
    # so the fault here is the database's: it refuses this one sample as a constraint would,
    # and the engine must skip the message and go on.
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$"
            " BEGIN IF NEW.i_ua = 1.5 THEN"
            " RAISE EXCEPTION 'refused by the test' USING ERRCODE = 'check_violation'; END IF;"
            " RETURN NEW; END $$"
        )
        conn.execute(
            "CREATE TRIGGER refuse_poison BEFORE INSERT ON rule_samples"
            " FOR EACH ROW EXECUTE FUNCTION refuse_poison()"
        )
    rules_workers.start()
    now = int(time.time() * 1000)
    poison = json.dumps(
        {"v": 1, "seq": 1, "session": "s-1", "samples": [{"ts": now, "out": True, "i_ua": 1.5}]}
    ).encode()
    client = connect_device(broker.config.device_port, device)
    try:
        assert client.publish(topic(device.device_id, "telemetry"), poison) == 0
        assert client.publish(topic(device.device_id, "events"), _fault(2, now + 1000)) == 0
    finally:
        client.close()
    wait_until(
        lambda: scalar(database_url, "SELECT count(*) FROM alerts") == 1,
        20,
        "the fault after the poison message to raise its alert",
    )
    assert (
        rules_workers.metric(
            "1", "galvani_rules_messages_total", 'channel="telemetry",outcome="failed"'
        )
        == 1
    )
    assert rules_workers.procs["1"].poll() is None
