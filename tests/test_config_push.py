"""The signing path for mode tables: envelope, versions, the record, and a real agent's answer."""

import base64
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import psycopg
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from deploy.stack.mosquitto import MosquittoBroker
from services.common.broker_auth import ServiceAccount
from services.common.config_push import (
    Published,
    PushError,
    publish_push,
    record_push,
    table_sha256,
    unanswered_pushes,
    unpublished_pushes,
)
from services.common.mode_tables import DEFAULT_MODES, restricted_table
from services.common.protocol import canonical_json
from services.common.signing import key_id, load_or_create_key
from services.rules.sweeps import sweep
from tests.agent import AgentProcess
from tests.ingest import IngestWorkers, provision, scalar, wait_until


def _now_ms() -> int:
    return int(time.time() * 1000)


@pytest.fixture
def key(tmp_path: Path):  # type: ignore[no-untyped-def]
    return load_or_create_key(tmp_path / "secrets")


@pytest.fixture
def publisher(
    broker: MosquittoBroker, service_passwords: dict[ServiceAccount, str]
) -> Iterator[paho.Client]:
    """A paho client on the rules account, as the rules workers publish tables with."""
    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id="push-test", protocol=MQTTProtocolVersion.MQTTv5
    )
    client.username_pw_set(ServiceAccount.RULES.value, service_passwords[ServiceAccount.RULES])
    client.tls_set_context(broker.tls_context())
    client.connect("127.0.0.1", broker.config.service_port)
    client.loop_start()
    yield client
    client.loop_stop()
    client.disconnect()


def test_a_table_outside_the_envelope_is_refused_naming_the_field_and_limit(
    database_url: str, key: Any
) -> None:
    [device] = provision(database_url, 1, prefix="env")
    loose = {**DEFAULT_MODES["LIFT"], "i_max_ua": 600, "session_cap_s": 1800}
    table = restricted_table(None, version=0, issued_at_ms=_now_ms(), reason="t", lock_all=False)
    table["modes"] = {"LIFT": loose}
    with psycopg.connect(database_url) as conn, pytest.raises(PushError) as refused:
        record_push(conn, key, device_id=device.device_id, table=table, source="api")
    assert [(p.path, p.limit, p.value) for p in refused.value.problems] == [
        ("modes.LIFT.i_max_ua", 500, 600),
        ("modes.LIFT.session_cap_s", 1200, 1800),
    ]
    assert scalar(database_url, "SELECT count(*) FROM config_pushes") == 0


def test_versions_follow_the_highest_pushed_or_reported(database_url: str, key: Any) -> None:
    [device] = provision(database_url, 1, prefix="ver")
    table = restricted_table(None, version=0, issued_at_ms=_now_ms(), reason="t", lock_all=True)
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "UPDATE devices SET config_reported_version = 7 WHERE id = %s", [device.device_id]
        )
        first = record_push(conn, key, device_id=device.device_id, table=table, source="rule")
        second = record_push(conn, key, device_id=device.device_id, table=table, source="rule")
    assert (first.version, second.version) == (8, 9)
    assert first.payload["sig"] != second.payload["sig"]
    assert first.sha256 == table_sha256(first.payload)
    with psycopg.connect(database_url) as conn:
        assert [p.version for p in unpublished_pushes(conn)] == [8, 9]
        assert conn.execute(
            "SELECT config_desired_version FROM devices WHERE id = %s", [device.device_id]
        ).fetchone() == (9,)


def test_a_pushed_safe_table_is_verified_applied_and_answered_by_a_real_agent(
    database_url: str,
    ingest_workers: IngestWorkers,
    new_agent: Callable[[str, Any], AgentProcess],
    publisher: paho.Client,
    key: Any,
) -> None:
    agent = new_agent("push", key)
    device = agent.device
    ingest_workers.start("1")
    agent.start()
    wait_until(
        lambda: bool(
            scalar(database_url, "SELECT online FROM devices WHERE id = %s", [device.device_id])
        ),
        30,
        "the agent online",
    )
    table = restricted_table(
        None,
        version=0,
        issued_at_ms=_now_ms(),
        reason="rule overcurrent: safe mode",
        lock_all=False,
    )
    with psycopg.connect(database_url) as conn:
        push = record_push(conn, key, device_id=device.device_id, table=table, source="rule")
    with psycopg.connect(database_url) as conn:
        publish_push(conn, publisher, push)
        assert unpublished_pushes(conn) == []

    def answered() -> bool:
        return (
            scalar(
                database_url,
                "SELECT answer_status FROM config_pushes WHERE device_id = %s AND version = %s",
                [device.device_id, push.version],
            )
            is not None
        )

    wait_until(answered, 30, "the agent's answer to the pushed table")
    with psycopg.connect(database_url) as conn:
        answer = conn.execute(
            "SELECT p.answer_status, p.answer_reason, d.config_reported_sha256"
            " FROM config_pushes p JOIN devices d ON d.id = p.device_id"
            " WHERE p.device_id = %s AND p.version = %s",
            [device.device_id, push.version],
        ).fetchone()
    assert answer == ("applied", None, push.sha256)


def test_an_older_unpublished_table_is_superseded_not_published(
    database_url: str, publisher: paho.Client, key: Any
) -> None:
    [device] = provision(database_url, 1, prefix="stale")
    table = restricted_table(None, version=0, issued_at_ms=_now_ms(), reason="t", lock_all=False)
    with psycopg.connect(database_url) as conn:
        older = record_push(conn, key, device_id=device.device_id, table=table, source="rule")
        newer = record_push(conn, key, device_id=device.device_id, table=table, source="rule")
    with psycopg.connect(database_url) as conn:
        assert publish_push(conn, publisher, older) is Published.SUPERSEDED
    with psycopg.connect(database_url) as conn:
        assert [p.version for p in unpublished_pushes(conn)] == [newer.version]
        assert publish_push(conn, publisher, newer) is Published.PUBLISHED
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT version, published_at IS NOT NULL, superseded_at IS NOT NULL"
            " FROM config_pushes ORDER BY version"
        ).fetchall()
    assert rows == [(older.version, False, True), (newer.version, True, False)]


def test_an_unanswered_table_is_published_again_once_its_device_has_been_back_a_while(
    database_url: str, publisher: paho.Client, key: Any
) -> None:
    """A broker killed -9 forgets retained tables it had not saved yet: a device that
    reconnects and stays silent about its newest table is sent it again, once per reconnect,
    while config_unacked still measures from the first publication."""
    [device] = provision(database_url, 1, prefix="again")
    table = restricted_table(None, version=0, issued_at_ms=_now_ms(), reason="t", lock_all=True)
    with psycopg.connect(database_url) as conn:
        push = record_push(conn, key, device_id=device.device_id, table=table, source="rule")

    def presence(online: bool, ago: str) -> None:
        with psycopg.connect(database_url) as conn:
            conn.execute(
                "INSERT INTO presence_log (device_id, online, received_at)"
                " VALUES (%s, %s, now() - %s::interval)",
                [device.device_id, online, ago],
            )

    def due(grace_s: float = 30) -> list[int]:
        with psycopg.connect(database_url) as conn:
            return [p.version for p in unanswered_pushes(conn, grace_s)]

    def publications() -> tuple[object, ...]:
        with psycopg.connect(database_url) as conn:
            row = conn.execute(
                "SELECT now() - published_at > interval '29 hours', republished_at IS NOT NULL"
                " FROM config_pushes WHERE version = %s",
                [push.version],
            ).fetchone()
        assert row is not None
        return tuple(row)

    with psycopg.connect(database_url) as conn:
        assert publish_push(conn, publisher, push) is Published.PUBLISHED
        conn.execute("UPDATE config_pushes SET published_at = now() - interval '30 hours'")
    assert publications() == (True, False)
    presence(False, "31 hours")  # offline before the table was published
    presence(True, "25 hours")  # back 5 h after it, online since: 25 h online
    assert due() == [push.version]
    presence(True, "10 seconds")  # a reconnect not yet given time to answer
    assert due() == [push.version]  # judged by the earliest reconnect since publication
    with psycopg.connect(database_url) as conn:
        assert publish_push(conn, publisher, push) is Published.PUBLISHED
    assert publications() == (True, True)  # the first publication is kept
    assert due() == []  # published again after the last reconnect
    presence(True, "0 seconds")
    assert due(grace_s=0) == [push.version]  # the next reconnect: once more

    with psycopg.connect(database_url) as conn:
        outcome = sweep(conn, key)
        rows = conn.execute(
            "SELECT explanation->'observed' FROM alerts WHERE rule = 'config_unacked'"
        ).fetchall()
    assert outcome is not None
    [(observed,)] = rows
    assert observed["version"] == push.version
    assert observed["online_hours"] >= 24.9  # from the first publication, not the last

    with psycopg.connect(database_url) as conn:
        conn.execute("UPDATE config_pushes SET answer_status = 'applied', answered_at = now()")
    assert due(grace_s=0) == []


def test_a_recorded_table_names_its_device_brand_and_signing_key(
    database_url: str, key: Any
) -> None:
    [device] = provision(database_url, 1, prefix="bound", brand="bound-brand")
    table = restricted_table(None, version=0, issued_at_ms=_now_ms(), reason="t", lock_all=True)
    with psycopg.connect(database_url) as conn:
        push = record_push(conn, key, device_id=device.device_id, table=table, source="rule")
    assert (push.payload["device"], push.payload["brand"]) == (device.device_id, "bound-brand")
    assert push.payload["kid"] == key_id(key)
    unsigned = {name: value for name, value in push.payload.items() if name != "sig"}
    key.public_key().verify(base64.b64decode(push.payload["sig"]), canonical_json(unsigned))
    stored = scalar(
        database_url,
        "SELECT payload->>'device' FROM config_pushes WHERE device_id = %s",
        [device.device_id],
    )
    assert stored == device.device_id
