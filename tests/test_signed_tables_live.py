"""Signed mode tables bound to their device, end to end (issue 19, item 6): the backend's
signing path (``record_push``, ``publish_push``), a real Mosquitto, real ``galvani-agent``
processes and ingest into TimescaleDB.

- a table signed for device A, republished on device B's ``config`` topic, is rejected
  (``wrong_device``) and B stays SAFE-locked;
- a table that expires while it waits for a session to end is rejected (``expired``);
- a device whose store was wiped still refuses a table older than the one it applied;
- a table signed with the next key is refused until the device trusts that key.
"""

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from deploy.stack.mosquitto import MosquittoBroker
from services.common.broker_auth import ServiceAccount
from services.common.config_push import Published, Push, publish_push, record_push
from services.common.mode_tables import restricted_table
from services.common.protocol import CONFIG_CHANNEL, canonical_json, device_topic
from services.common.signing import (
    NEXT_KEY_FILE,
    load_or_create_key,
    promote_next_key,
    public_key_b64,
)
from tests.agent import AgentProcess
from tests.ingest import IngestWorkers, scalar, wait_until

NewAgent = Callable[[str, Ed25519PrivateKey], AgentProcess]
SAFE_ONLY = ["INFUSE", "LIFT", "TIGHTEN"]


def _now_ms() -> int:
    return int(time.time() * 1000)


@pytest.fixture
def key_dir(tmp_path: Path) -> Path:
    return tmp_path / "secrets"


@pytest.fixture
def key(key_dir: Path) -> Ed25519PrivateKey:
    return load_or_create_key(key_dir)


@pytest.fixture
def publisher(
    broker: MosquittoBroker, service_passwords: dict[ServiceAccount, str]
) -> Iterator[paho.Client]:
    """A paho client on the rules account, as the rules workers publish tables with."""
    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id="bind-test", protocol=MQTTProtocolVersion.MQTTv5
    )
    client.username_pw_set(ServiceAccount.RULES.value, service_passwords[ServiceAccount.RULES])
    client.tls_set_context(broker.tls_context())
    client.connect("127.0.0.1", broker.config.service_port)
    client.loop_start()
    yield client
    client.loop_stop()
    client.disconnect()


def _online(database_url: str, agent: AgentProcess) -> None:
    device_id = agent.device.device_id

    def online() -> bool:
        return bool(scalar(database_url, "SELECT online FROM devices WHERE id = %s", [device_id]))

    wait_until(online, 30, f"{device_id} online")


def _push(
    database_url: str,
    publisher: paho.Client,
    key: Ed25519PrivateKey,
    agent: AgentProcess,
    *,
    locked: list[str],
    expires_at_ms: int | None = None,
) -> Push:
    """Sign a table for ``agent``'s device through the backend's one signing path, and
    publish it retained on the device's config topic."""
    table = restricted_table(
        None,
        version=0,
        issued_at_ms=_now_ms(),
        reason="issue 19 item 6",
        lock_all=False,
        expires_at_ms=expires_at_ms,
    )
    table["locked_modes"] = locked
    with psycopg.connect(database_url) as conn:
        push = record_push(conn, key, device_id=agent.device.device_id, table=table, source="api")
    with psycopg.connect(database_url) as conn:
        assert publish_push(conn, publisher, push) is Published.PUBLISHED
    return push


def _publish_raw(publisher: paho.Client, agent: AgentProcess, payload: dict[str, Any]) -> None:
    """Publish signed bytes retained on ``agent``'s config topic, outside the backend's
    bookkeeping: what a replay (or a misused service account) would do."""
    topic = device_topic(agent.device.device_id, CONFIG_CHANNEL)
    info = publisher.publish(topic, canonical_json(payload), qos=1, retain=True)
    info.wait_for_publish(10)
    assert info.is_published()


def _answer(database_url: str, push: Push) -> tuple[Any, ...] | None:
    """The device's answer to ``push`` as ingest recorded it: (status, reason), or None."""
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT answer_status, answer_reason FROM config_pushes"
            " WHERE device_id = %s AND version = %s",
            [push.device_id, push.version],
        ).fetchone()
    return None if row is None or row[0] is None else tuple(row)


def _await_answer(database_url: str, push: Push) -> tuple[Any, ...]:
    wait_until(lambda: _answer(database_url, push) is not None, 30, f"the answer to {push.version}")
    answer = _answer(database_url, push)
    assert answer is not None
    return answer


def _agent_kv(agent: AgentProcess, key: str) -> Any:
    """A value from the agent's own store (read beside the running agent; WAL allows it)."""
    rows = agent._query(
        "SELECT value FROM kv WHERE device_id = ? AND key = ?", [agent.device.device_id, key]
    )
    return json.loads(rows[0][0]) if rows else None


def test_a_table_signed_for_device_a_republished_to_device_b_is_rejected_and_b_stays_locked(
    database_url: str,
    ingest_workers: IngestWorkers,
    new_agent: NewAgent,
    publisher: paho.Client,
    key: Ed25519PrivateKey,
) -> None:
    device_a, device_b = new_agent("bind-a", key), new_agent("bind-b", key)
    ingest_workers.start("1")
    device_a.start()
    device_b.start()
    _online(database_url, device_a)
    _online(database_url, device_b)

    lock = _push(database_url, publisher, key, device_b, locked=SAFE_ONLY)  # a rule's SAFE lock
    assert _await_answer(database_url, lock) == ("applied", None)
    _push(database_url, publisher, key, device_a, locked=[])
    a_table = _push(database_url, publisher, key, device_a, locked=[])  # newer than B's
    assert a_table.version > lock.version
    assert _await_answer(database_url, a_table) == ("applied", None)

    # A's signed bytes, republished retained on B's config topic (a replay, or a service
    # account misused): B must not run A's table.
    _publish_raw(publisher, device_b, a_table.payload)

    def b_answer() -> tuple[Any, ...] | None:
        with psycopg.connect(database_url) as conn:
            return conn.execute(
                "SELECT config_status, config_reason FROM state_reports"
                " WHERE device_id = %s AND config_version = %s ORDER BY seq DESC LIMIT 1",
                [device_b.device.device_id, a_table.version],
            ).fetchone()

    wait_until(lambda: b_answer() is not None, 30, "B's answer to A's table")
    assert b_answer() == ("rejected", "wrong_device")
    running = _agent_kv(device_b, "table")
    assert (running["version"], sorted(running["locked_modes"])) == (lock.version, SAFE_ONLY)
    assert running["device"] == device_b.device.device_id


def test_a_table_that_expires_while_a_session_runs_is_rejected_when_the_session_ends(
    database_url: str,
    ingest_workers: IngestWorkers,
    new_agent: NewAgent,
    publisher: paho.Client,
    key: Ed25519PrivateKey,
) -> None:
    agent = new_agent("expiry", key)
    ingest_workers.start("1")
    agent.start("--session=LIFT:5:10")
    device_id = agent.device.device_id

    def started() -> bool:
        return bool(
            scalar(
                database_url,
                "SELECT count(*) FROM events WHERE device_id = %s AND type = 'session_start'",
                [device_id],
            )
        )

    wait_until(started, 30, "the session to start")
    # Valid on receipt, but it expires before the 10 s session ends, while it waits.
    push = _push(
        database_url, publisher, key, agent, locked=SAFE_ONLY, expires_at_ms=_now_ms() + 4_000
    )
    assert _await_answer(database_url, push) == ("rejected", "expired")
    ended = scalar(
        database_url,
        "SELECT count(*) FROM events WHERE device_id = %s AND type = 'session_end'",
        [device_id],
    )
    assert ended == 1, "answered before the session ended"
    assert _agent_kv(agent, "table") is None  # still on the factory tables


def test_a_device_whose_store_was_wiped_still_refuses_an_older_table(
    database_url: str,
    ingest_workers: IngestWorkers,
    new_agent: NewAgent,
    publisher: paho.Client,
    key: Ed25519PrivateKey,
) -> None:
    agent = new_agent("wiped", key)
    ingest_workers.start("1")
    agent.start()
    _online(database_url, agent)
    older = _push(database_url, publisher, key, agent, locked=[])
    assert _await_answer(database_url, older) == ("applied", None)
    lock = _push(database_url, publisher, key, agent, locked=SAFE_ONLY)
    assert _await_answer(database_url, lock) == ("applied", None)

    agent.stop()
    for suffix in ("", "-wal", "-shm"):  # a factory reset: the store deleted
        Path(f"{agent.store}{suffix}").unlink(missing_ok=True)
    agent.start()
    wait_until(lambda: _agent_kv(agent, "config_answer") is not None, 30, "the retained table")
    assert _agent_kv(agent, "config_answer")["version"] == lock.version  # answered applied

    _publish_raw(publisher, agent, older.payload)  # the older signed table, replayed
    wait_until(
        lambda: _agent_kv(agent, "config_answer")["version"] == older.version,
        30,
        "the answer to the replayed older table",
    )
    answer = _agent_kv(agent, "config_answer")
    assert (answer["status"], answer["reason"]) == ("rejected", "stale_version")
    running = _agent_kv(agent, "table")
    assert (running["version"], sorted(running["locked_modes"])) == (lock.version, SAFE_ONLY)


def test_a_table_signed_with_the_next_key_applies_only_once_the_device_trusts_it(
    database_url: str,
    ingest_workers: IngestWorkers,
    new_agent: NewAgent,
    publisher: paho.Client,
    key: Ed25519PrivateKey,
    key_dir: Path,
) -> None:
    agent = new_agent("rotate", key)  # provisioned with the current key only
    ingest_workers.start("1")
    agent.start()
    _online(database_url, agent)
    upcoming = load_or_create_key(key_dir, NEXT_KEY_FILE)
    promote_next_key(key_dir)  # signing with the next key before the device trusts it
    signer = load_or_create_key(key_dir)
    assert public_key_b64(signer) == public_key_b64(upcoming)

    too_early = _push(database_url, publisher, signer, agent, locked=SAFE_ONLY)
    assert _await_answer(database_url, too_early) == ("rejected", "bad_signature")

    agent.stop()
    agent.public_key.write_text(f"{public_key_b64(key)}\n{public_key_b64(upcoming)}\n")
    agent.start()
    _online(database_url, agent)
    trusted = _push(database_url, publisher, signer, agent, locked=SAFE_ONLY)
    assert _await_answer(database_url, trusted) == ("applied", None)
    assert _agent_kv(agent, "table")["kid"] == trusted.payload["kid"]
