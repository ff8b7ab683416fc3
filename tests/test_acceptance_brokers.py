"""What a device, ingest and rules see is the same on both engines (issue 22, item 2): every
test here runs once on Mosquitto (MQTT 5, one device listener) and once on the 3-node NATS
cluster (MQTT 3.1.1, any node, logins decided by the auth callout from the database), with real
processes: the broker, ingest and rules workers, the test's TimescaleDB database and MQTT
clients playing the devices.

How to use the fixture (tests/brokers.py, tests/conftest.py): take ``broker_under_test``; the
test is then parametrised ``[mosquitto]`` / ``[nats]``. Provision devices in ``database_url``
with ids from :func:`unique_prefix` (the cluster and its retained messages are shared by the
whole run), call ``admit()``, start workers with ``ingest_workers(...)`` /
``rules_workers(...)`` and connect devices with ``device(...)``; all of it is stopped after the
test. Where the engines differ in how they signal a refusal (a SUBACK code, a PUBACK code),
the test says so explicitly and asserts each engine's own answer.
"""

import base64
import hashlib
import json
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from services.common.broker_auth import ServiceAccount
from services.common.protocol import signing_input
from services.common.signing import load_or_create_key
from tests.agent import AgentProcess
from tests.brokers import BrokerUnderTest, unique_prefix
from tests.ingest import provision, scalar, state, telemetry, topic, wait_until
from tests.mqtt import MqttClient, Refused
from tests.rules import overcurrent_telemetry

WAIT_S = 20.0
# How long a message that must not arrive is waited for (one that may takes milliseconds).
SILENCE_S = 1.0
# NATS redelivers what a killed worker held after ack_wait; short here so the test is too.
FAST_REDELIVERY = {"GALVANI_INGEST_NATS_ACK_WAIT_S": "2"}
# Between the burst's publishes: the burst lasts over a second, so the kill lands inside it.
BURST_GAP_S = 0.005
# PUBACK / SUBACK of a refused publish or subscribe, per engine: Mosquitto answers MQTT 5's
# "not authorized" (0x87) to a publish and grants a subscription whose messages it then never
# delivers (its ACL is checked per message); NATS's 3.1.1 gateway acknowledges a publish it
# drops (3.1.1's PUBACK has no code) and refuses the subscription (0x80).
FORGED_PUBACK = {"mosquitto": 0x87, "nats": 0x00}
FOREIGN_SUBACK = {"mosquitto": 0x01, "nats": 0x80}
CONNACK_NOT_AUTHORIZED = 5  # MQTT 3.1.1


def now_ms() -> int:
    return int(time.time() * 1000)


def count(url: str, query: str, params: list[object] | None = None) -> int:
    return int(str(scalar(url, query, params)))


def connect(client: MqttClient, timeout_s: float = WAIT_S) -> MqttClient:
    """Connect, trying again while refused: Mosquitto's reload after ``admit`` is a signal,
    done a moment later."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return client.connect()
        except Refused:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def acked(client: MqttClient, device_id: str) -> set[int]:
    """Every seq the stored-acks ``client`` received cover."""
    seqs: set[int] = set()
    for message in client.messages(topic(device_id, "ack")):
        for first, last in json.loads(message.payload)["seqs"]:
            seqs.update(range(first, last + 1))
    return seqs


def stored_seqs(url: str, device_id: str) -> list[int]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT seq FROM telemetry_messages WHERE device_id = %s ORDER BY seq", [device_id]
        ).fetchall()
    return [seq for (seq,) in rows]


def test_a_device_provisioned_after_the_start_gets_in_as_itself_and_only_as_itself(
    broker_under_test: BrokerUnderTest, database_url: str, ingest_database_url: str
) -> None:
    broker = broker_under_test
    broker.ingest_workers(ingest_database_url).start()
    # Provisioned only now, with the broker and ingest running: no restart follows.
    late, other = provision(database_url, 2, prefix=unique_prefix("late"))
    broker.admit()
    with pytest.raises(Refused):
        broker.device(late, password=other.password).connect()  # a wrong password
    # Another device's client id never takes over that device's session. The engines get
    # there differently: Mosquitto's device listener replaces the client id by the username
    # (use_username_as_clientid), so the CONNECT is accepted as the impostor itself; NATS's
    # callout refuses it (CONNACK 5).
    victim = connect(broker.device(other))
    impostor = broker.device(late, client_id=other.device_id)
    if broker.kind == "mosquitto":
        impostor.connect()
    else:
        with pytest.raises(Refused) as refusal:
            impostor.connect()
        assert refusal.value.code == CONNACK_NOT_AUTHORIZED
    assert not victim.wait_disconnected(SILENCE_S)
    impostor.close()
    victim.close()

    device = connect(broker.device(late, node=broker.nodes - 1))
    assert device.subscribe(topic(late.device_id, "ack")) in (0, 1)
    forged = device.publish(topic(other.device_id, "telemetry"), telemetry(1, now_ms()))
    assert forged == FORGED_PUBACK[broker.kind]
    assert device.publish(topic(late.device_id, "telemetry"), telemetry(1, now_ms())) == 0
    wait_until(lambda: stored_seqs(database_url, late.device_id) == [1], WAIT_S, "seq 1 stored")
    wait_until(lambda: acked(device, late.device_id) == {1}, WAIT_S, "its stored-ack")

    # Another device's config: the cloud publishes it retained; this device never reads it.
    cloud = connect(broker.service(ServiceAccount.RULES, f"galvani-rules-{late.device_id}"))
    assert cloud.publish(topic(other.device_id, "config"), b'{"table":"theirs"}', retain=True) in (
        0,
        0x10,
    )
    assert device.subscribe(topic(other.device_id, "config")) == FOREIGN_SUBACK[broker.kind]
    assert device.wait_for(topic(other.device_id, "config"), SILENCE_S) is None
    # Nor did the forged message reach the database, under either device.
    assert count(database_url, "SELECT count(*) FROM telemetry_messages") == 1
    assert count(database_url, "SELECT count(*) FROM dead_letters") == 0


def test_each_seq_is_stored_once_through_repeats_and_a_worker_killed_mid_burst(
    broker_under_test: BrokerUnderTest, database_url: str, ingest_database_url: str
) -> None:
    broker = broker_under_test
    workers = broker.ingest_workers(ingest_database_url, **FAST_REDELIVERY)
    workers.start("1")
    [dev] = provision(database_url, 1, prefix=unique_prefix("once"))
    broker.admit()
    device = connect(broker.device(dev))
    device.subscribe(topic(dev.device_id, "ack"))
    t0 = now_ms() - 600_000
    # The same (device, seq) again after its ack (the device missed it): one row, and the
    # repeat acknowledged again.
    device.publish(topic(dev.device_id, "telemetry"), telemetry(1, t0))
    wait_until(lambda: acked(device, dev.device_id) == {1}, WAIT_S, "seq 1 acknowledged")
    device.publish(topic(dev.device_id, "telemetry"), telemetry(1, t0))
    wait_until(
        lambda: len(device.messages(topic(dev.device_id, "ack"))) == 2,
        WAIT_S,
        "the repeat acknowledged again",
    )
    assert stored_seqs(database_url, dev.device_id) == [1]

    burst = 200
    seqs = range(2, burst + 2)

    def publish() -> None:
        for seq in seqs:
            device.publish(topic(dev.device_id, "telemetry"), telemetry(seq, t0 + seq * 1000))
            time.sleep(BURST_GAP_S)

    publisher = threading.Thread(target=publish)
    publisher.start()
    try:
        wait_until(lambda: len(stored_seqs(database_url, dev.device_id)) >= 30, WAIT_S, "30 stored")
        workers.kill("1")  # -9: whatever it held uncommitted was never acknowledged
        stored_at_kill = len(stored_seqs(database_url, dev.device_id))
        workers.start("1")
    finally:
        publisher.join(WAIT_S)
    assert not publisher.is_alive()
    assert stored_at_kill < burst + 1, "the burst ended before the kill: make it longer"
    every = list(range(1, burst + 2))
    wait_until(
        lambda: stored_seqs(database_url, dev.device_id) == every, 2 * WAIT_S, "every seq stored"
    )
    wait_until(lambda: acked(device, dev.device_id) == set(every), WAIT_S, "every seq acked")
    assert count(
        database_url, "SELECT count(*) FROM samples WHERE device_id = %s", [dev.device_id]
    ) == 10 * len(every)
    assert count(database_url, "SELECT seq_gaps FROM devices WHERE id = %s", [dev.device_id]) == 0


def test_a_fault_pushes_a_signed_safe_table_the_device_answers_and_finds_again_retained(
    broker_under_test: BrokerUnderTest,
    database_url: str,
    ingest_database_url: str,
    rules_database_url: str,
    key_dir: Path,
) -> None:
    broker = broker_under_test
    broker.rules_workers(rules_database_url, key_dir).start()
    broker.ingest_workers(ingest_database_url).start()
    [dev] = provision(database_url, 1, prefix=unique_prefix("safe"))
    broker.admit()
    config = topic(dev.device_id, "config")
    device = connect(broker.device(dev, node=0))
    assert device.subscribe(config) in (0, 1)
    device.publish(topic(dev.device_id, "telemetry"), overcurrent_telemetry(1, now_ms()))
    pushed = device.wait_for(config, WAIT_S)
    assert pushed is not None, "no SAFE table reached the device"
    table: dict[str, Any] = json.loads(pushed.payload)
    public = load_or_create_key(key_dir).public_key()
    assert isinstance(public, Ed25519PublicKey)
    public.verify(base64.b64decode(table["sig"]), signing_input(table))
    assert table["reason"] == "overcurrent"
    assert table["locked_modes"] == ["LIFT", "TIGHTEN", "INFUSE"]

    # The device answers on state, as the agent does once it applied the table.
    answer = {
        "version": table["version"],
        "sha256": hashlib.sha256(signing_input(table)).hexdigest(),
        "status": "applied",
        "reason": None,
    }
    device.publish(topic(dev.device_id, "state"), state(2, now_ms(), config=answer), retain=True)

    def push() -> tuple[Any, ...] | None:
        with psycopg.connect(database_url) as conn:
            return conn.execute(
                "SELECT version, published_at IS NOT NULL, answer_status FROM config_pushes"
                " WHERE device_id = %s",
                [dev.device_id],
            ).fetchone()

    wait_until(lambda: push() == (table["version"], True, "applied"), WAIT_S, "marked applied")
    rule = scalar(database_url, "SELECT rule FROM alerts WHERE device_id = %s", [dev.device_id])
    assert rule == "overcurrent"
    device.close()

    # Back later (on NATS through another node): the table is there, retained.
    again = connect(broker.device(dev, node=1))
    assert again.subscribe(config) in (0, 1)
    retained = again.wait_for(config, WAIT_S)
    assert retained is not None, "the table was not retained"
    assert (retained.payload, retained.retain) == (pushed.payload, True)


def test_presence_is_online_on_connect_and_offline_by_the_will_when_the_socket_drops(
    broker_under_test: BrokerUnderTest, database_url: str, ingest_database_url: str
) -> None:
    broker = broker_under_test
    broker.ingest_workers(ingest_database_url).start()
    [dev] = provision(database_url, 1, prefix=unique_prefix("here"))
    broker.admit()
    presence = topic(dev.device_id, "presence")
    will = (presence, json.dumps({"v": 1, "online": False}).encode())
    device = connect(broker.device(dev, node=broker.nodes - 1, will=will))
    device.publish(presence, json.dumps({"v": 1, "online": True, "ts": now_ms()}).encode())

    def online() -> object:
        return scalar(database_url, "SELECT online FROM devices WHERE id = %s", [dev.device_id])

    wait_until(lambda: online() is True, WAIT_S, "online")
    device.drop()  # no DISCONNECT: the broker sends the will
    wait_until(lambda: online() is False, WAIT_S, "the will to mark it offline")
    # The will carries no device time; it is logged once.
    assert (
        count(
            database_url,
            "SELECT count(*) FROM presence_log WHERE device_id = %s AND ts IS NULL",
            [dev.device_id],
        )
        == 1
    )


def test_malformed_payloads_become_dead_letters_and_later_messages_still_flow(
    broker_under_test: BrokerUnderTest, database_url: str, ingest_database_url: str
) -> None:
    broker = broker_under_test
    broker.ingest_workers(ingest_database_url).start()
    [dev] = provision(database_url, 1, prefix=unique_prefix("dead"))
    broker.admit()
    device = connect(broker.device(dev))
    device.subscribe(topic(dev.device_id, "ack"))
    telemetry_topic = topic(dev.device_id, "telemetry")
    t0 = now_ms() - 60_000
    not_json = b'{"v":1,"seq":2,'
    no_seq = json.dumps({"v": 1, "samples": [{"ts": t0}]}).encode()
    for payload in (telemetry(1, t0), not_json, no_seq, telemetry(3, t0 + 3000)):
        device.publish(telemetry_topic, payload)
    wait_until(lambda: stored_seqs(database_url, dev.device_id) == [1, 3], WAIT_S, "seqs 1, 3")
    wait_until(
        lambda: count(database_url, "SELECT count(*) FROM dead_letters") == 2,
        WAIT_S,
        "two dead letters",
    )
    with psycopg.connect(database_url) as conn:
        letters = conn.execute(
            "SELECT device_id, channel, reason, payload FROM dead_letters ORDER BY id"
        ).fetchall()
    assert sorted((d, c, r, bytes(p)) for d, c, r, p in letters) == sorted(
        [
            (dev.device_id, "telemetry", "bad_json", not_json),
            (dev.device_id, "telemetry", "invalid", no_seq),
        ]
    )
    wait_until(lambda: {1, 3} <= acked(device, dev.device_id), WAIT_S, "the good ones acked")
    # Later messages still flow.
    device.publish(telemetry_topic, telemetry(4, t0 + 4000))
    wait_until(lambda: stored_seqs(database_url, dev.device_id) == [1, 3, 4], WAIT_S, "seq 4")


def test_the_agent_boots_and_its_outbox_empties_on_stored_acks_with_no_gap_or_repeat(
    broker_under_test: BrokerUnderTest,
    database_url: str,
    ingest_database_url: str,
    tmp_path: Path,
) -> None:
    """The real agent (MQTT 5 to Mosquitto, 3.1.1 to a NATS node): its boot's messages are
    stored once each and leave its outbox only on ingest's stored-acks."""
    broker = broker_under_test
    broker.ingest_workers(ingest_database_url).start()
    [dev] = provision(database_url, 1, prefix=unique_prefix("agent"))
    broker.admit()
    home = tmp_path / "agent"
    home.mkdir()
    port = broker.device_ports()[-1]
    agent = AgentProcess(home, dev, port, Ed25519PrivateKey.generate())
    agent.start(*broker.agent_args())
    try:
        wait_until(lambda: agent.last_seq() >= 3, WAIT_S, "the boot's messages")
        wait_until(lambda: not agent.outbox(), WAIT_S, "the outbox emptied by stored-acks")
    finally:
        agent.stop()
    last = agent.last_seq()
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT seq FROM telemetry_messages WHERE device_id = %s"
            " UNION ALL SELECT seq FROM events WHERE device_id = %s"
            " UNION ALL SELECT seq FROM state_reports WHERE device_id = %s ORDER BY 1",
            [dev.device_id] * 3,
        ).fetchall()
    assert [seq for (seq,) in rows] == list(range(1, last + 1))
