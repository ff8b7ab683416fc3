"""The device agent (``galvani-agent``, a real process) through a real Mosquitto into ingest
and TimescaleDB: a broker outage mid-session, mode tables pushed over ``config``, messages
published before ingest subscribes, the outbox kept until the backend's stored-ack, and the
agent killed -9 mid-stream."""

import json
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from deploy.stack.mosquitto import MosquittoBroker, local_broker
from deploy.stack.pki import DevelopmentPKI
from services.common.broker_auth import BrokerFiles, ServiceAccount, sync_device_credentials
from services.common.signing import sign_table
from tests.agent import AgentProcess
from tests.ingest import Device, IngestWorkers, provision, scalar, topic, wait_until
from tests.mqtt import MqttClient

SAMPLE_HZ = 10
# Long enough for ingest's reconnect delay to reach its cap (RECONNECT_MAX_DELAY_S, 10 s, after
# about 12.6 s of doubling from 0.2 s) and for the agent to retry at its own cap (2 s here), so
# both come back from their longest waits; a longer outage only adds waits of the same length.
OUTAGE_S = 15
# The broker goes down once this much of the session is stored: mid-session.
BEFORE_OUTAGE_S = 3
# The session outlives the outage and both reconnections (at most ~12 s after the broker is
# back), so the agent reconnects mid-session and the rest of the session is sent live: the
# test checks that the session was still running when the devices were admitted again.
OUTAGE_SESSION_S = 38
NewAgent = Callable[[str, Ed25519PrivateKey], AgentProcess]
ServiceClient = Callable[[ServiceAccount], MqttClient]


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def service_client(
    request: pytest.FixtureRequest,
    broker: MosquittoBroker,
    service_passwords: dict[ServiceAccount, str],
) -> ServiceClient:
    """Connect a test client to this test's broker as one of the backend's accounts (closed
    after the test)."""

    def connect(account: ServiceAccount) -> MqttClient:
        port, password = broker.config.service_port, service_passwords[account]
        client = MqttClient("127.0.0.1", port, account.value, password).connect()
        request.addfinalizer(client.close)
        return client

    return connect


@pytest.fixture
def own_broker(
    stack_root: Path, service_passwords: dict[ServiceAccount, str], pki: DevelopmentPKI
) -> Iterator[MosquittoBroker]:
    """A broker this test may stop and restart (same ports, same persistence)."""
    directory = Path(tempfile.mkdtemp(prefix="own-broker-", dir=stack_root))
    server = local_broker(directory, service_passwords, pki)
    server.start([])
    yield server
    server.stop()


@pytest.fixture
def own_device(
    database_url: str,
    own_broker: MosquittoBroker,
    service_passwords: dict[ServiceAccount, str],
    tmp_path: Path,
    key: Ed25519PrivateKey,
) -> Iterator[tuple[Device, IngestWorkers, AgentProcess]]:
    """One device admitted to ``own_broker``, ingest workers for it and its agent (neither
    started yet; both stopped after the test)."""
    [device] = provision(database_url, 1, prefix="own")
    with psycopg.connect(database_url) as conn:
        sync_device_credentials(conn, BrokerFiles(own_broker.config.directory))
    workers = IngestWorkers.on_broker(database_url, own_broker, service_passwords, tmp_path)
    agent = AgentProcess(tmp_path, device, own_broker.config.device_port, key)
    yield device, workers, agent
    agent.stop()
    workers.close()


def _rows(url: str, query: str, params: list[object]) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(query, params).fetchall()


def _stored_seqs(url: str, device_id: str) -> list[int]:
    """Every seq of ``device_id`` in the database, ascending (a repeat would show twice)."""
    return [
        row[0]
        for row in _rows(
            url,
            "SELECT seq FROM telemetry_messages WHERE device_id = %s"
            " UNION ALL SELECT seq FROM events WHERE device_id = %s"
            " UNION ALL SELECT seq FROM state_reports WHERE device_id = %s ORDER BY 1",
            [device_id, device_id, device_id],
        )
    ]


def _assert_seqs_1_to(url: str, device_id: str, last: int | None = None) -> None:
    """Seqs 1..last (by default, as many as are stored) stored once each, and the device's
    counters agree: no gap, no repeat."""
    seqs = _stored_seqs(url, device_id)
    last = len(seqs) if last is None else last
    assert seqs == list(range(1, last + 1)), "a gap or a repeat in seq"
    assert _rows(url, "SELECT seq_gaps, last_seq FROM devices WHERE id = %s", [device_id]) == [
        (0, last)
    ]


def _stored_samples(url: str, device_id: str) -> int:
    count = scalar(url, "SELECT count(*) FROM samples WHERE device_id = %s", [device_id])
    assert isinstance(count, int)
    return count


def _has_event(url: str, device_id: str, event_type: str) -> bool:
    query = "SELECT count(*) FROM events WHERE device_id = %s AND type = %s"
    return bool(scalar(url, query, [device_id, event_type]))


def test_broker_down_mid_session_loses_and_repeats_nothing(
    database_url: str,
    own_broker: MosquittoBroker,
    own_device: tuple[Device, IngestWorkers, AgentProcess],
) -> None:
    device, workers, agent = own_device
    workers.start("1")
    agent.start(f"--session=LIFT:5:{OUTAGE_SESSION_S}")
    device_id = device.device_id
    wait_until(
        lambda: _stored_samples(database_url, device_id) >= BEFORE_OUTAGE_S * SAMPLE_HZ,
        30,
        f"{BEFORE_OUTAGE_S} s of the session stored",
    )
    own_broker.stop()
    time.sleep(OUTAGE_S)
    # As `make run` does: devices are admitted only once ingest has subscribed again,
    # since Mosquitto 2.0 does not restore shared subscriptions from persistence.
    own_broker.start([])
    wait_until(
        lambda: workers.metric("1", "galvani_ingest_connected") == 1.0,
        30,
        "ingest to subscribe again",
    )
    with psycopg.connect(database_url) as conn:
        sync_device_credentials(conn, BrokerFiles(own_broker.config.directory))
        admitted_at = conn.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
    wait_until(
        lambda: _has_event(database_url, device_id, "session_end"),
        120,
        "the session's end stored",
    )
    agent.stop()
    [(start_ts, end_ts, duration_s, reason)] = _rows(
        database_url,
        "SELECT started_at, ended_at, duration_s, end_reason FROM sessions WHERE device_id = %s",
        [device_id],
    )
    assert (duration_s, reason) == (OUTAGE_SESSION_S, "completed")
    # The agent could reconnect (its backoff is 2 s at most) with seconds of session to go.
    assert (end_ts - admitted_at).total_seconds() > 2, "the session ended before the outage did"
    in_session = _rows(
        database_url,
        "SELECT count(*), count(DISTINCT ts), count(*) FILTER (WHERE out), min(ts), max(ts)"
        " FROM samples WHERE device_id = %s AND mode IS NOT NULL",
        [device_id],
    )[0]
    count, distinct, with_output, first, last = in_session
    # The whole session at 10 Hz with output on, then the sample that shows it off.
    samples = OUTAGE_SESSION_S * SAMPLE_HZ
    assert (count, distinct, with_output) == (samples + 1, samples + 1, samples)
    assert (last - first).total_seconds() == pytest.approx(OUTAGE_SESSION_S)
    assert start_ts <= first
    assert last <= end_ts
    _assert_seqs_1_to(database_url, device_id)
    assert "disconnected" in agent.log_text()


def _table(version: int, **changes: Any) -> dict[str, Any]:
    lift = {
        "waveform": "mono_alt",
        "i_target_ua": 300,
        "i_max_ua": 400,
        "freq_hz": 10,
        "pulse_ms": 40,
        "v_max_v": 15,
        "z_ok_ohm": [1000, 20000],
        "session_default_s": 300,
        "session_cap_s": 1200,
        "cooldown_s": 1800,
        "max_sessions_24h": 2,
        "max_sessions_7d": 7,
        "min_batt_pct": 20,
        "t_elec_max_c": 41,
    }
    table: dict[str, Any] = {
        "v": 1,
        "version": version,
        "issued_at": int(time.time() * 1000),
        "expires_at": None,
        "reason": "test push",
        "locked_modes": ["INFUSE"],
        "modes": {"LIFT": lift},
    }
    table.update(changes)
    return table


def test_pushed_tables_are_rejected_or_applied_between_sessions_and_answered_on_state(
    database_url: str,
    ingest_workers: IngestWorkers,
    new_agent: NewAgent,
    service_client: ServiceClient,
    key: Ed25519PrivateKey,
) -> None:
    agent = new_agent("cfg", key)
    device = agent.device
    ingest_workers.start("1")
    cloud = service_client(ServiceAccount.RULES)
    config_topic = topic(device.device_id, "config")

    def push(table: dict[str, Any]) -> None:
        assert cloud.publish(config_topic, json.dumps(table).encode(), retain=True) in (0, 16)

    def bound(table: dict[str, Any]) -> dict[str, object]:
        return sign_table(table, key, device=device.device_id, brand="acme")

    def answer(version: int) -> tuple[Any, ...] | None:
        rows = _rows(
            database_url,
            "SELECT config_status, config_reason, received_at FROM state_reports"
            " WHERE device_id = %s AND config_version = %s ORDER BY seq DESC LIMIT 1",
            [device.device_id, version],
        )
        return rows[0] if rows else None

    # Long enough for three pushes and their answers (a round trip each) before table 20.
    agent.start("--session=LIFT:5:12")
    wait_until(
        lambda: _has_event(database_url, device.device_id, "session_start"),
        30,
        "the session to start",
    )
    cases = [
        (
            11,
            {**bound(_table(11)), "reason": "tampered after signing"},
            "bad_signature",
        ),
        (12, bound(_table(12, expires_at=int(time.time() * 1000) - 1000)), "expired"),
        (
            13,
            bound(_table(13, modes={"LIFT": {**_table(1)["modes"]["LIFT"], "i_max_ua": 900}})),
            "outside_envelope",
        ),
    ]
    for version, table, reason in cases:
        push(table)
        wait_until(lambda v=version: answer(v) is not None, 20, f"an answer to table {version}")
        assert answer(version)[:2] == ("rejected", reason)
    ended = _has_event(database_url, device.device_id, "session_end")
    assert not ended, "the session ended before table 20 was pushed: make it longer"
    push(bound(_table(20)))  # valid, but a session is running
    wait_until(
        lambda: _has_event(database_url, device.device_id, "session_end"),
        40,
        "the session to end",
    )
    wait_until(lambda: answer(20) is not None, 20, "the answer to table 20")
    status, reason, _ = answer(20)
    assert (status, reason) == ("applied", None)
    [(ended_seq,)] = _rows(
        database_url,
        "SELECT seq FROM events WHERE device_id = %s AND type = 'session_end'",
        [device.device_id],
    )
    [(applied_seq,)] = _rows(
        database_url,
        "SELECT seq FROM state_reports WHERE device_id = %s AND config_version = 20",
        [device.device_id],
    )
    assert applied_seq > ended_seq, "applied while the session ran"
    push(bound(_table(19)))  # older than the applied one
    wait_until(lambda: answer(19) is not None, 20, "the answer to table 19")
    assert answer(19)[:2] == ("rejected", "stale_version")


def test_messages_published_before_ingest_subscribes_are_all_stored_once_it_does(
    database_url: str, own_device: tuple[Device, IngestWorkers, AgentProcess]
) -> None:
    # Issue 18, item 2: a broker restarted before ingest has subscribed again answers every
    # publish with PUBACK 0x10, No matching subscribers, and drops the message.
    device, workers, agent = own_device
    device_id = device.device_id
    agent.start("--session=LIFT:5:6", "--verbose")
    wait_until(lambda: len(agent.outbox("telemetry")) >= 5, 40, "five telemetry messages")
    assert "sending again from seq" in agent.log_text(), "no PUBACK 0x10 was met"
    queued = agent.outbox()
    assert queued == list(range(1, len(queued) + 1)), "a message left the outbox unstored"
    assert _stored_seqs(database_url, device_id) == []

    workers.start("1")
    wait_until(
        lambda: set(queued) <= set(_stored_seqs(database_url, device_id)),
        30,
        "every queued message stored",
    )
    wait_until(lambda: not agent.outbox(), 30, "the outbox emptied by stored-acks")
    agent.stop()
    last = agent.last_seq()
    wait_until(lambda: len(_stored_seqs(database_url, device_id)) >= last, 30, "the last messages")
    _assert_seqs_1_to(database_url, device_id, last)
    telemetry = scalar(
        database_url,
        "SELECT count(*) FROM telemetry_messages WHERE device_id = %s",
        [device_id],
    )
    assert isinstance(telemetry, int)
    assert telemetry >= 5


def test_a_message_the_broker_took_stays_in_the_outbox_until_the_backend_acks_it_as_stored(
    new_agent: NewAgent,
    service_client: ServiceClient,
    key: Ed25519PrivateKey,
) -> None:
    agent = new_agent("acked", key)
    device = agent.device
    # Stands in for ingest with ingest's account: subscribed, so the broker answers the agent's
    # publishes with PUBACK 0x00, but it stores nothing and acknowledges only when told to.
    cloud = service_client(ServiceAccount.INGEST)
    ack_topic = topic(device.device_id, "ack")

    def received() -> list[int]:
        return sorted(json.loads(m.payload)["seq"] for m in cloud.received)

    def ack(*ranges: tuple[int, int]) -> None:
        payload = json.dumps({"v": 1, "seqs": [list(r) for r in ranges]}).encode()
        assert cloud.publish(ack_topic, payload) == 0, "the agent is not subscribed to ack"

    for channel in ("telemetry", "events", "state"):
        assert cloud.subscribe(topic(device.device_id, channel)) == 1
    agent.start("--verbose")  # logs each PUBACK it receives
    wait_until(lambda: len(received()) >= 3, 30, "the boot's reboot, state and heartbeat")
    seqs = received()
    wait_until(lambda: set(seqs) <= agent.delivered(), 30, "their PUBACKs at the agent")
    assert seqs == list(range(1, len(seqs) + 1))
    assert agent.outbox() == seqs, "a message left the outbox on its PUBACK"

    ack((1, 2))
    wait_until(lambda: agent.outbox() == seqs[2:], 10, "seqs 1 and 2 deleted")
    ack((1, seqs[-1]))
    wait_until(lambda: agent.outbox() == [], 10, "the rest deleted")
    assert received() == seqs, "a message sent twice though acknowledged in time"


def test_an_agent_killed_mid_stream_resumes_its_outbox_with_no_gap_and_no_repeat(
    database_url: str, ingest_workers: IngestWorkers, new_agent: NewAgent, key: Ed25519PrivateKey
) -> None:
    agent = new_agent("kill", key)
    ingest_workers.start("1")
    device_id = agent.device.device_id
    agent.start("--session=LIFT:5:60")
    wait_until(
        lambda: _stored_samples(database_url, device_id) >= 2 * SAMPLE_HZ,
        30,
        "2 s of the session stored",
    )
    agent.kill()
    killed_at = agent.last_seq()
    agent.start()  # the same store: its seq, outbox and the session the kill cut short
    wait_until(lambda: agent.last_seq() >= killed_at + 3, 20, "the restarted agent's boot")
    wait_until(lambda: not agent.outbox(), 30, "every message stored and acknowledged")
    agent.stop()
    last = agent.last_seq()
    wait_until(
        lambda: len(_stored_seqs(database_url, device_id)) >= last, 30, "every message stored"
    )

    _assert_seqs_1_to(database_url, device_id, last)
    [(count, distinct)] = _rows(
        database_url,
        "SELECT count(*), count(DISTINCT ts) FROM samples"
        " WHERE device_id = %s AND mode IS NOT NULL",
        [device_id],
    )
    assert count == distinct, "a batch of samples stored twice under two seqs"
    ends = _rows(
        database_url,
        "SELECT end_reason FROM sessions WHERE device_id = %s",
        [device_id],
    )
    assert ends == [("fault",)], "the session cut by the kill is ended once, at the next boot"


def test_an_agent_speaking_mqtt_311_has_every_message_stored_once_and_its_outbox_emptied(
    database_url: str,
    ingest_workers: IngestWorkers,
    new_agent: NewAgent,
    key: Ed25519PrivateKey,
    broker: MosquittoBroker,
) -> None:
    """The agent as a 3.1.1-only firmware would connect: the backend's MQTT 5 ingest stores
    what it publishes, and its stored-acks reach it through the broker as to any device."""
    agent = new_agent("v311", key)
    ingest_workers.start("1")
    device_id = agent.device.device_id
    agent.start("--mqtt-version=3.1.1", "--session=LIFT:5:3")
    wait_until(
        lambda: _stored_samples(database_url, device_id) >= 2 * SAMPLE_HZ, 30, "the session stored"
    )
    wait_until(lambda: not agent.outbox(), 30, "every message stored and acknowledged")
    agent.stop()
    last = agent.last_seq()
    wait_until(
        lambda: len(_stored_seqs(database_url, device_id)) >= last, 30, "every message stored"
    )

    _assert_seqs_1_to(database_url, device_id, last)
    # Mosquitto logs each client's protocol as its own enum: p2 is MQTT 3.1.1, p5 MQTT 5.
    log = (broker.config.directory / "mosquitto.log").read_text(errors="replace")
    assert f"as {device_id} (p2," in log
    assert f"as {device_id} (p5," not in log
