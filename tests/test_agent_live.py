"""The device agent (``galvani-agent``, a real process) through a real Mosquitto into ingest
and TimescaleDB: a broker outage mid-session, mode tables pushed over ``config``, messages
published before ingest subscribes, the outbox kept until the backend's stored-ack, and the
agent killed -9 mid-stream."""

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from deploy.stack.mosquitto import BrokerConfig, MosquittoBroker
from deploy.stack.ports import free_port
from deploy.stack.processes import service_user
from services.common.broker_auth import BrokerFiles, ServiceAccount, sync_device_credentials
from services.common.signing import public_key_b64, sign_table
from tests.ingest import REPO_ROOT, Device, IngestWorkers, provision, scalar, topic, wait_until
from tests.mqtt import MqttClient

SAMPLE_HZ = 10


class AgentProcess:
    """``galvani-agent run --simulate`` as a subprocess with its own store and key."""

    def __init__(self, tmp_path: Path, device: Device, port: int, key: Ed25519PrivateKey) -> None:
        self.tmp_path = tmp_path
        self.device = device
        self.port = port
        self.public_key = tmp_path / "config-public-key"
        self.public_key.write_text(public_key_b64(key))
        self.log = tmp_path / f"{device.device_id}.log"
        self.store = tmp_path / "agent.sqlite3"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, *args: str) -> None:
        env = {**os.environ, "GALVANI_AGENT_PASSWORD": self.device.password}
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "device_agent.cli",
                    "run",
                    "--simulate",
                    f"--device-id={self.device.device_id}",
                    f"--port={self.port}",
                    f"--public-key={self.public_key}",
                    f"--store={self.store}",
                    "--backoff-max=2",
                    "--seed=1",
                    *args,
                ],
                env=env,
                cwd=REPO_ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)

    def kill(self) -> None:
        """SIGKILL: no drain, no DISCONNECT; the last will says offline."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def delivered(self) -> set[int]:
        """Seqs whose PUBACK 0x00 the agent has received (logged with ``--verbose``)."""
        pattern = rf"{re.escape(self.device.device_id)}: seq (\d+) delivered$"
        return {int(seq) for seq in re.findall(pattern, self.log_text(), re.MULTILINE)}

    def outbox(self, channel: str | None = None) -> list[int]:
        """Seqs in the agent's outbox now (read beside the running agent; WAL allows it)."""
        rows = self._query(
            "SELECT seq FROM outbox WHERE device_id = ? AND channel = coalesce(?, channel)"
            " ORDER BY seq",
            [self.device.device_id, channel],
        )
        return [seq for (seq,) in rows]

    def last_seq(self) -> int:
        """The last seq the agent handed out; 0 before its store exists."""
        rows = self._query(
            "SELECT last_seq FROM devices WHERE device_id = ?", [self.device.device_id]
        )
        return int(rows[0][0]) if rows else 0

    def _query(self, query: str, params: list[object]) -> list[tuple[Any, ...]]:
        try:
            # mode=rw: never create the file the agent has not created yet.
            conn = sqlite3.connect(f"file:{self.store}?mode=rw", uri=True)
        except sqlite3.OperationalError:
            return []
        try:
            return conn.execute(query, params).fetchall()
        except sqlite3.OperationalError:  # the agent is still creating its schema
            return []
        finally:
            conn.close()


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def own_broker(
    stack_root: Path, service_passwords: dict[ServiceAccount, str]
) -> Iterator[MosquittoBroker]:
    """A broker this test may stop and restart (same ports, same persistence)."""
    server = MosquittoBroker(
        BrokerConfig(
            directory=Path(tempfile.mkdtemp(prefix="own-broker-", dir=stack_root)),
            device_port=free_port(),
            service_port=free_port(),
            run_as=service_user(),
        ),
        service_passwords,
    )
    server.start([])
    yield server
    server.stop()


def _device_on_own_broker(
    prefix: str,
    database_url: str,
    own_broker: MosquittoBroker,
    service_passwords: dict[ServiceAccount, str],
    tmp_path: Path,
    key: Ed25519PrivateKey,
) -> tuple[Device, IngestWorkers, AgentProcess]:
    """One device admitted to ``own_broker``, ingest workers for it (not started yet), and
    its agent (not started yet)."""
    [device] = provision(database_url, 1, prefix=prefix)
    with psycopg.connect(database_url) as conn:
        sync_device_credentials(conn, BrokerFiles(own_broker.config.directory))
    workers = IngestWorkers(
        database_url=database_url,
        mqtt_port=own_broker.config.service_port,
        password=service_passwords[ServiceAccount.INGEST],
        log_dir=tmp_path,
    )
    return device, workers, AgentProcess(tmp_path, device, own_broker.config.device_port, key)


def _rows(url: str, query: str, params: list[object]) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(query, params).fetchall()


def test_broker_down_for_60_s_mid_session_loses_and_repeats_nothing(
    database_url: str,
    own_broker: MosquittoBroker,
    service_passwords: dict[ServiceAccount, str],
    tmp_path: Path,
    key: Ed25519PrivateKey,
) -> None:
    device, workers, agent = _device_on_own_broker(
        "live", database_url, own_broker, service_passwords, tmp_path, key
    )
    try:
        workers.start("1")
        agent.start("--session=LIFT:5:100")
        device_id = device.device_id

        def stored_samples() -> int:
            return int(
                str(
                    scalar(
                        database_url,
                        "SELECT count(*) FROM samples WHERE device_id = %s",
                        [device_id],
                    )
                )
            )

        wait_until(lambda: stored_samples() >= 10 * SAMPLE_HZ, 30, "10 s of the session stored")
        own_broker.stop()
        time.sleep(60)
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
        wait_until(
            lambda: bool(
                scalar(
                    database_url,
                    "SELECT count(*) FROM events WHERE device_id = %s AND type = 'session_end'",
                    [device_id],
                )
            ),
            120,
            "the session's end stored",
        )
        agent.stop()
        [(start_ts, end_ts, duration_s, reason)] = _rows(
            database_url,
            "SELECT started_at, ended_at, duration_s, end_reason FROM sessions"
            " WHERE device_id = %s",
            [device_id],
        )
        assert (duration_s, reason) == (100, "completed")
        in_session = _rows(
            database_url,
            "SELECT count(*), count(DISTINCT ts), count(*) FILTER (WHERE out), min(ts), max(ts)"
            " FROM samples WHERE device_id = %s AND mode IS NOT NULL",
            [device_id],
        )[0]
        count, distinct, with_output, first, last = in_session
        # 100 s at 10 Hz with output on, then the sample that shows it off.
        assert (count, distinct, with_output) == (1001, 1001, 1000)
        assert (last - first).total_seconds() == pytest.approx(100.0)
        assert start_ts <= first
        assert last <= end_ts
        seqs = [
            row[0]
            for row in _rows(
                database_url,
                "SELECT seq FROM telemetry_messages WHERE device_id = %s"
                " UNION ALL SELECT seq FROM events WHERE device_id = %s"
                " UNION ALL SELECT seq FROM state_reports WHERE device_id = %s ORDER BY 1",
                [device_id, device_id, device_id],
            )
        ]
        assert seqs == list(range(1, len(seqs) + 1)), "a gap or a repeat in seq"
        assert _rows(
            database_url, "SELECT seq_gaps, last_seq FROM devices WHERE id = %s", [device_id]
        ) == [(0, len(seqs))]
        assert "disconnected" in agent.log_text()
    finally:
        agent.stop()
        workers.close()


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
    broker: MosquittoBroker,
    sync_devices: Any,
    ingest_workers: IngestWorkers,
    service_passwords: dict[ServiceAccount, str],
    tmp_path: Path,
    key: Ed25519PrivateKey,
) -> None:
    [device] = provision(database_url, 1, prefix="cfg")
    sync_devices()
    ingest_workers.start("1")
    agent = AgentProcess(tmp_path, device, broker.config.device_port, key)
    cloud = MqttClient(
        "127.0.0.1",
        broker.config.service_port,
        ServiceAccount.RULES.value,
        service_passwords[ServiceAccount.RULES],
    ).connect()
    config_topic = topic(device.device_id, "config")

    def push(table: dict[str, Any]) -> None:
        assert cloud.publish(config_topic, json.dumps(table).encode(), retain=True) in (0, 16)

    def answer(version: int) -> tuple[Any, ...] | None:
        rows = _rows(
            database_url,
            "SELECT config_status, config_reason, received_at FROM state_reports"
            " WHERE device_id = %s AND config_version = %s ORDER BY seq DESC LIMIT 1",
            [device.device_id, version],
        )
        return rows[0] if rows else None

    try:
        agent.start("--session=LIFT:5:20")
        wait_until(
            lambda: bool(
                scalar(
                    database_url,
                    "SELECT count(*) FROM events WHERE device_id = %s AND type = 'session_start'",
                    [device.device_id],
                )
            ),
            30,
            "the session to start",
        )
        cases = [
            (
                11,
                {**sign_table(_table(11), key), "reason": "tampered after signing"},
                "bad_signature",
            ),
            (12, sign_table(_table(12, expires_at=int(time.time() * 1000) - 1000), key), "expired"),
            (
                13,
                sign_table(
                    _table(13, modes={"LIFT": {**_table(1)["modes"]["LIFT"], "i_max_ua": 900}}), key
                ),
                "outside_envelope",
            ),
        ]
        for version, table, reason in cases:
            push(table)
            wait_until(lambda v=version: answer(v) is not None, 20, f"an answer to table {version}")
            assert answer(version)[:2] == ("rejected", reason)
        push(sign_table(_table(20), key))  # valid, but a session is running
        wait_until(
            lambda: bool(
                scalar(
                    database_url,
                    "SELECT count(*) FROM events WHERE device_id = %s AND type = 'session_end'",
                    [device.device_id],
                )
            ),
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
        push(sign_table(_table(19), key))  # older than the applied one
        wait_until(lambda: answer(19) is not None, 20, "the answer to table 19")
        assert answer(19)[:2] == ("rejected", "stale_version")
    finally:
        agent.stop()
        cloud.close()


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


def test_messages_published_before_ingest_subscribes_are_all_stored_once_it_does(
    database_url: str,
    own_broker: MosquittoBroker,
    service_passwords: dict[ServiceAccount, str],
    tmp_path: Path,
    key: Ed25519PrivateKey,
) -> None:
    # Issue 18, item 2: a broker restarted before ingest has subscribed again answers every
    # publish with PUBACK 0x10, No matching subscribers, and drops the message.
    device, workers, agent = _device_on_own_broker(
        "early", database_url, own_broker, service_passwords, tmp_path, key
    )
    device_id = device.device_id
    try:
        agent.start("--session=LIFT:5:12", "--verbose")
        wait_until(lambda: len(agent.outbox("telemetry")) >= 10, 40, "ten telemetry messages")
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
        wait_until(
            lambda: len(_stored_seqs(database_url, device_id)) >= last, 30, "the last messages"
        )
        assert _stored_seqs(database_url, device_id) == list(range(1, last + 1))
        assert _rows(
            database_url, "SELECT seq_gaps, last_seq FROM devices WHERE id = %s", [device_id]
        ) == [(0, last)]
        telemetry = scalar(
            database_url,
            "SELECT count(*) FROM telemetry_messages WHERE device_id = %s",
            [device_id],
        )
        assert isinstance(telemetry, int)
        assert telemetry >= 10
    finally:
        agent.stop()
        workers.close()


def test_a_message_the_broker_took_stays_in_the_outbox_until_the_backend_acks_it_as_stored(
    database_url: str,
    broker: MosquittoBroker,
    sync_devices: Any,
    service_passwords: dict[ServiceAccount, str],
    tmp_path: Path,
    key: Ed25519PrivateKey,
) -> None:
    [device] = provision(database_url, 1, prefix="acked")
    sync_devices()
    agent = AgentProcess(tmp_path, device, broker.config.device_port, key)
    # Stands in for ingest with ingest's account: subscribed, so the broker answers the agent's
    # publishes with PUBACK 0x00, but it stores nothing and acknowledges only when told to.
    cloud = MqttClient(
        "127.0.0.1",
        broker.config.service_port,
        ServiceAccount.INGEST.value,
        service_passwords[ServiceAccount.INGEST],
    ).connect()
    ack_topic = topic(device.device_id, "ack")

    def received() -> list[int]:
        return sorted(json.loads(m.payload)["seq"] for m in cloud.received)

    def ack(*ranges: tuple[int, int]) -> None:
        payload = json.dumps({"v": 1, "seqs": [list(r) for r in ranges]}).encode()
        assert cloud.publish(ack_topic, payload) == 0, "the agent is not subscribed to ack"

    try:
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
    finally:
        agent.stop()
        cloud.close()


def test_an_agent_killed_mid_stream_resumes_its_outbox_with_no_gap_and_no_repeat(
    database_url: str,
    broker: MosquittoBroker,
    sync_devices: Any,
    ingest_workers: IngestWorkers,
    tmp_path: Path,
    key: Ed25519PrivateKey,
) -> None:
    [device] = provision(database_url, 1, prefix="kill")
    sync_devices()
    ingest_workers.start("1")
    agent = AgentProcess(tmp_path, device, broker.config.device_port, key)
    device_id = device.device_id

    def stored_samples() -> int:
        count = scalar(
            database_url, "SELECT count(*) FROM samples WHERE device_id = %s", [device_id]
        )
        assert isinstance(count, int)
        return count

    try:
        agent.start("--session=LIFT:5:60")
        wait_until(lambda: stored_samples() >= 5 * SAMPLE_HZ, 30, "5 s of the session stored")
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
    finally:
        agent.stop()

    assert _stored_seqs(database_url, device_id) == list(range(1, last + 1))
    assert _rows(
        database_url, "SELECT seq_gaps, last_seq FROM devices WHERE id = %s", [device_id]
    ) == [(0, last)]
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
