"""The auth callout on a real 3-node NATS cluster with the responder process
(services/broker_access) and this test's database: who gets in, and what they may do."""

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient

from deploy.stack.nats_cluster import NatsCluster
from deploy.stack.pki import DevelopmentPKI
from services.api.main import create_app
from services.api.settings import ApiSettings
from services.broker_access import jwt
from services.broker_access.access import Authorizer, ServicePasswords
from services.broker_access.callout import CALLOUT_SUBJECT
from services.broker_access.issuer import load_issuer
from services.broker_access.nkeys import KeyPair, Prefix
from services.broker_access.responder import DeviceLookup, Responder
from services.common.broker.nats_access import DatabaseBans, NatsDeviceAccess
from services.common.broker.nats_client import NatsClient, NatsMessage
from services.common.broker.subjects import topic_to_subject
from services.common.broker_auth import ServiceAccount
from services.common.migrations.grants import ServiceRole
from services.common.tls import client_context
from services.ingest.throttle import LIFT_CHECK_INTERVAL_S, Budget, Throttle
from tests.ingest import Device, provision
from tests.mqtt import CONNACK_ACCEPTED, MQTT_311, MqttClient, Refused, connack_of
from tests.nats import CalloutSetup, ResponderProcess, callout_setup, running_cluster
from tests.roles import as_service
from tests.stream_watch import StreamWatcher

REFUSED = {4, 5}  # bad user name or password, not authorized (3.1.1 CONNACK)
# How long a message that should not arrive is waited for (a permitted one takes
# milliseconds on loopback).
SILENCE_S = 1.0


@pytest.fixture
def callout(nats_callout: tuple[NatsCluster, CalloutSetup]) -> tuple[NatsCluster, CalloutSetup]:
    """The suite's callout cluster and its responder set-up (conftest)."""
    return nats_callout


@pytest.fixture
def cluster(nats_broker: NatsCluster) -> NatsCluster:
    """The callout cluster, its logins decided from this test's database (conftest)."""
    return nats_broker


def mqtt(cluster: NatsCluster, node: int, device: Device, client_id: str = "") -> MqttClient:
    """A device client of ``node`` (MQTT 3.1.1, not connected yet)."""
    port = cluster.nodes[node].mqtt_port
    return MqttClient(
        "127.0.0.1",
        port,
        device.device_id,
        device.password,
        client_id=client_id or device.device_id,
        protocol=MQTT_311,
    )


def service(
    cluster: NatsCluster, node: int, passwords: dict[ServiceAccount, str], client_id: str
) -> MqttClient:
    """A service client (the API's account) of ``node`` with any client id (MQTT 3.1.1, not
    connected yet)."""
    account = ServiceAccount.API
    port = cluster.nodes[node].mqtt_port
    return MqttClient(
        "127.0.0.1",
        port,
        account.value,
        passwords[account],
        client_id=client_id,
        protocol=MQTT_311,
    )


def test_a_device_provisioned_after_the_cluster_started_connects(
    cluster: NatsCluster, database_url: str
) -> None:
    [device] = provision(database_url, 1, prefix="late")
    client = mqtt(cluster, 2, device).connect()
    try:
        client.publish(f"galvani/v1/d/{device.device_id}/telemetry", b"{}")
    finally:
        client.close()


def test_devices_are_refused_without_their_own_credentials(
    cluster: NatsCluster, nats_responder: ResponderProcess, database_url: str
) -> None:
    one, other, gone, banned = provision(database_url, 4, prefix="who")
    with psycopg.connect(database_url) as conn:
        conn.execute("UPDATE devices SET decommissioned_at = now() WHERE id = %s", [gone.device_id])
        conn.execute(
            "INSERT INTO device_bans (device_id, until) VALUES (%s, now() + interval '1 hour')",
            [banned.device_id],
        )
    port = cluster.nodes[0].mqtt_port
    assert connack_of(port, one.device_id, one.device_id, one.password) == CONNACK_ACCEPTED
    attempts = {
        "wrong password": (one.device_id, one.device_id, other.password),
        "another device's client id": (other.device_id, one.device_id, one.password),
        "another device's name": (one.device_id, other.device_id, one.password),
        "a backend client id": ("galvani-ingest-1", one.device_id, one.password),
        "decommissioned": (gone.device_id, gone.device_id, gone.password),
        "banned": (banned.device_id, banned.device_id, banned.password),
        "unknown": ("who-none", "who-none", one.password),
    }
    codes = {what: connack_of(port, *attempt) for what, attempt in attempts.items()}
    assert all(code in REFUSED for code in codes.values()), codes
    refused = nats_responder.metric(
        "galvani_broker_access_decisions_total", kind="device", outcome="refused"
    )
    assert refused == len(attempts)


def test_a_device_publishing_on_another_devices_topic_is_acked_and_dropped(
    cluster: NatsCluster,
    database_url: str,
    service_passwords: dict[ServiceAccount, str],
    pki: DevelopmentPKI,
) -> None:
    sender, victim = provision(database_url, 2, prefix="pub")
    client = mqtt(cluster, 0, sender).connect()
    try:
        with StreamWatcher(cluster, service_passwords[ServiceAccount.INGEST], pki.ca_file) as seen:
            forged = f"galvani/v1/d/{victim.device_id}/telemetry"
            own = f"galvani/v1/d/{sender.device_id}/telemetry"
            client.publish(forged, b"forged")  # NATS's gateway acknowledges what it drops
            client.publish(own, b"marker")
            assert seen.wait_for(topic_to_subject(own)) is not None
            assert seen.wait_for(topic_to_subject(forged), timeout_s=SILENCE_S) is None
    finally:
        client.close()


def test_a_device_subscribes_to_its_own_config_and_not_to_anothers(
    cluster: NatsCluster, database_url: str, service_passwords: dict[ServiceAccount, str]
) -> None:
    device, other = provision(database_url, 2, prefix="sub")
    own = f"galvani/v1/d/{device.device_id}/config"
    publisher = service(cluster, 0, service_passwords, "galvani-api-cfg").connect()
    publisher.publish(own, b"table", retain=True)
    publisher.close()
    client = mqtt(cluster, 1, device).connect()
    try:
        assert client.subscribe(f"galvani/v1/d/{other.device_id}/config") == 0x80
        assert client.subscribe(own) == 1  # QoS 1: a JetStream consumer made as the device
        received = client.wait_for(own)
        assert received is not None
        assert (received.payload, received.retain) == (b"table", True)
    finally:
        client.close()


def test_a_service_account_uses_nats_and_mqtt_with_any_client_id(
    cluster: NatsCluster,
    database_url: str,
    service_passwords: dict[ServiceAccount, str],
    pki: DevelopmentPKI,
) -> None:
    """Ingest's ack as core NATS and the API's table over MQTT (a client id of its own) reach
    the device; a wrong password keeps a service out."""
    [device] = provision(database_url, 1, prefix="svc")
    receiver = mqtt(cluster, 1, device).connect()
    nats = NatsClient(
        cluster.nats_urls().split(","),
        user=ServiceAccount.INGEST.value,
        password=service_passwords[ServiceAccount.INGEST],
        tls=client_context(pki.ca_file),
        name="galvani-ingest-test",
    )
    nats.connect(5.0)
    try:
        ack = f"galvani/v1/d/{device.device_id}/ack"
        config = f"galvani/v1/d/{device.device_id}/config"
        assert receiver.subscribe(ack) == 1
        assert receiver.subscribe(config) == 1
        nats.publish(topic_to_subject(ack), b"ack")
        nats.flush()
        publisher = service(cluster, 2, service_passwords, "any-client-id").connect()
        publisher.publish(config, b"table")
        publisher.close()
        got_ack, got_table = receiver.wait_for(ack), receiver.wait_for(config)
        assert got_ack is not None
        assert got_ack.payload == b"ack"
        assert got_table is not None
        assert got_table.payload == b"table"
    finally:
        nats.close()
        receiver.close()
    wrong = NatsClient(
        cluster.nats_urls().split(","),
        user=ServiceAccount.INGEST.value,
        password="not-it",
        tls=client_context(pki.ca_file),
        name="galvani-ingest-test",
    )
    with pytest.raises(Exception, match="uthoriz"):
        wrong.connect(5.0)


def test_connect_latency_through_the_callout(cluster: NatsCluster, database_url: str) -> None:
    """Sequential device CONNECTs through the callout: the figure the reconnect storm after a
    node kill pays per device (printed; the bound only catches a broken responder)."""
    devices = provision(database_url, 20, prefix="lat")
    took: list[float] = []
    for round_ in range(5):
        for device in devices:
            started = time.perf_counter()
            client = mqtt(cluster, round_ % 3, device).connect()
            took.append(time.perf_counter() - started)
            client.close()
    took.sort()
    p99 = took[int(len(took) * 0.99) - 1]
    print(
        f"callout_connect n={len(took)} median_ms={statistics.median(took) * 1000:.1f}"
        f" p99_ms={p99 * 1000:.1f} connects_per_s={len(took) / sum(took):.0f}"
    )
    assert p99 < 2.0


class _Outbox:
    """Collects what the responder would send (the server refuses client publishes on the
    callout subject, so requests cannot be injected over NATS)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    def subscribe(self, subject: str, *, queue: str = "") -> int:
        return 1

    def publish(self, subject: str, payload: bytes, **_: object) -> None:
        self.sent.append((subject, payload))


def test_responder_answers_per_second(
    callout: tuple[NatsCluster, CalloutSetup], database_url: str
) -> None:
    """The responder's own cost per login, from the database as the responder's role:
    requests signed by a stand-in server key, decided and signed one after another (printed:
    answers/s and the p99 of one answer)."""
    _, setup = callout
    devices = provision(database_url, 50, prefix="rps")
    server = KeyPair.create(Prefix.SERVER)
    issuer = load_issuer(setup.issuer_seed_file)

    def request(device: Device) -> NatsMessage:
        claims = {
            "sub": issuer.public_key,
            "aud": "nats-authorization-request",
            "nats": {
                "type": "authorization_request",
                "server_id": {"name": "bench", "host": "127.0.0.1", "id": server.public_key},
                "user_nkey": KeyPair.create(Prefix.USER).public_key,
                "client_info": {"type": "mqtt", "mqtt_id": device.device_id},
                "connect_opts": {"user": device.device_id, "pass": device.password},
            },
        }
        payload = jwt.encode(claims, server, now=time.time()).encode()
        return NatsMessage(CALLOUT_SUBJECT, "_INBOX.x", {}, None, payload)

    requests = [request(devices[i % len(devices)]) for i in range(2000)]
    lookup = DeviceLookup(as_service(database_url, ServiceRole.BROKER_ACCESS))
    outbox = _Outbox()
    responder = Responder(
        outbox,  # type: ignore[arg-type]
        Authorizer(lookup, ServicePasswords(setup.broker_dir)),
        issuer,
    )
    took = []
    try:
        started = time.perf_counter()
        for message in requests[:300]:  # one at a time: what a lone login waits
            began = time.perf_counter()
            responder.handle([message])
            took.append(time.perf_counter() - began)
        one_by_one = 300 / (time.perf_counter() - started)
        started = time.perf_counter()
        for batch in range(0, len(requests), 100):  # as a reconnect storm arrives: in reads
            responder.handle(requests[batch : batch + 100])
        batched = len(requests) / (time.perf_counter() - started)
    finally:
        lookup.close()
    requests = requests[:300] + requests
    assert len(outbox.sent) == len(requests)
    answers = [jwt.decode(payload.decode()) for _, payload in outbox.sent]
    assert all("jwt" in answer["nats"] for answer in answers)
    took.sort()
    print(
        f"callout_responder answers_per_s={one_by_one:.0f} (one at a time)"
        f" {batched:.0f} (batches of 100)"
        f" answer_median_ms={statistics.median(took) * 1000:.2f}"
        f" answer_p99_ms={took[int(len(took) * 0.99) - 1] * 1000:.2f}"
    )


def test_a_ban_ends_the_session_and_refuses_reconnects_until_lifted(
    cluster: NatsCluster,
    database_url: str,
    service_passwords: dict[ServiceAccount, str],
    pki: DevelopmentPKI,
) -> None:
    flooder, bystander = provision(database_url, 2, prefix="ban")
    access = NatsDeviceAccess(
        [("127.0.0.1", node.mqtt_port) for node in cluster.nodes],
        ServiceAccount.INGEST.value,
        service_passwords[ServiceAccount.INGEST],
        client_context(pki.ca_file),
    )
    client = mqtt(cluster, 1, flooder).connect()
    other = mqtt(cluster, 2, bystander).connect()
    try:
        with psycopg.connect(database_url) as conn:
            assert access.ban(conn, {flooder.device_id: time.time() + 3600})
        assert client.wait_disconnected()
        port = cluster.nodes[0].mqtt_port
        assert connack_of(port, flooder.device_id, flooder.device_id, flooder.password) == 5
        assert other.connected
        with psycopg.connect(database_url) as conn:
            assert set(access.bans(conn)) == {flooder.device_id}
            assert access.lift_expired_bans(conn) == []
            assert access.lift_expired_bans(conn, now=time.time() + 7200) == [flooder.device_id]
        code = connack_of(port, flooder.device_id, flooder.device_id, flooder.password)
        assert code == CONNACK_ACCEPTED
    finally:
        client.close()
        other.close()


def test_logins_go_on_when_one_of_two_responders_stops(
    callout: tuple[NatsCluster, CalloutSetup],
    cluster: NatsCluster,
    nats_responder: ResponderProcess,
    database_url: str,
    tmp_path: Path,
) -> None:
    """Two responders in the queue group (the fixture's and a second one): with the first
    stopped, every login is answered by the other."""
    nats, setup = callout
    second = ResponderProcess(nats, setup, database_url, tmp_path / "second.log", "2")
    devices = provision(database_url, 6, prefix="ha")
    try:
        for device in devices[:3]:
            mqtt(cluster, 0, device).connect().close()
        nats_responder.stop()
        for i, device in enumerate(devices[3:]):
            mqtt(cluster, i % 3, device).connect().close()
        assert "granted ha-0005" in (tmp_path / "second.log").read_text()
    finally:
        second.stop()


def test_a_devices_retained_presence_and_will_reach_the_backend(
    cluster: NatsCluster,
    database_url: str,
    service_passwords: dict[ServiceAccount, str],
    pki: DevelopmentPKI,
) -> None:
    """What the device agent does on presence (retained QoS 1 "online", a retained QoS 1 will
    "offline") works with a device's grant: the gateway publishes the will as the device, and
    both reach the stream the workers read."""
    [device] = provision(database_url, 1, prefix="will")
    presence = f"galvani/v1/d/{device.device_id}/presence"
    port = cluster.nodes[0].mqtt_port
    with StreamWatcher(cluster, service_passwords[ServiceAccount.INGEST], pki.ca_file) as seen:
        client = MqttClient(
            "127.0.0.1",
            port,
            device.device_id,
            device.password,
            client_id=device.device_id,
            protocol=MQTT_311,
            will=(presence, b"offline"),
        ).connect()
        client.publish(presence, b"online", retain=True)
        online = seen.wait_for(topic_to_subject(presence))
        assert online is not None
        assert online.payload == b"online"
        seen.received.clear()
        client.drop()
        will = seen.wait_for(topic_to_subject(presence), timeout_s=10)
        assert will is not None
        assert will.payload == b"offline"


def test_ingests_throttle_bans_a_flooding_device_from_the_cluster_until_the_ban_ends(
    cluster: NatsCluster,
    database_url: str,
    ingest_database_url: str,
    service_passwords: dict[ServiceAccount, str],
    pki: DevelopmentPKI,
    tmp_path: Path,
) -> None:
    """services/ingest/throttle.py with the database ban store (as ingest's role): the flooder
    is cut off by takeover after the ban commits, refused while banned, let back in after."""
    flooder, bystander = provision(database_url, 2, prefix="flood")
    access = NatsDeviceAccess(
        [("127.0.0.1", node.mqtt_port) for node in cluster.nodes],
        ServiceAccount.INGEST.value,
        service_passwords[ServiceAccount.INGEST],
        client_context(pki.ca_file),
    )
    client = mqtt(cluster, 1, flooder).connect()
    other = mqtt(cluster, 2, bystander).connect()
    port = cluster.nodes[0].mqtt_port
    ban_s = 3.0
    with psycopg.connect(ingest_database_url, autocommit=True) as conn:

        def in_transaction(work: Callable[[psycopg.Connection[Any]], None]) -> None:
            with conn.transaction():
                work(conn)

        throttle = Throttle(
            Budget(3, 10.0),
            ban_s,
            tmp_path,
            in_transaction,
            end_session=access.end_session,
            store=DatabaseBans(),
        )
        try:
            banned_at = time.monotonic()
            throttle.observe([flooder.device_id] * 5 + [bystander.device_id])
            assert client.wait_disconnected()
            assert connack_of(port, flooder.device_id, flooder.device_id, flooder.password) == 5
            assert other.connected
            time.sleep(max(0.0, banned_at + ban_s + LIFT_CHECK_INTERVAL_S - time.monotonic()))
            throttle.tick()
            assert DatabaseBans().current(in_transaction) == {}
        finally:
            throttle.close()
            client.close()
            other.close()
    assert connack_of(port, flooder.device_id, flooder.device_id, flooder.password) == 0
    with psycopg.connect(database_url) as conn:
        [(recorded,)] = conn.execute(
            "SELECT count(*) FROM device_throttles WHERE device_id = %s", [flooder.device_id]
        ).fetchall()
    assert recorded == 1


def test_decommissioning_a_device_through_the_api_ends_its_session_on_the_cluster(
    cluster: NatsCluster,
    database_url: str,
    api_database_url: str,
    keys: dict[str, str],
    service_passwords: dict[ServiceAccount, str],
    pki: DevelopmentPKI,
    tmp_path: Path,
) -> None:
    [device] = provision(database_url, 1, prefix="gone")
    client = mqtt(cluster, 2, device).connect()
    settings = ApiSettings(
        database_url=api_database_url,
        broker="nats",
        nats_urls=cluster.nats_urls(),
        mqtt_nodes=cluster.mqtt_nodes(),
        mqtt_password=service_passwords[ServiceAccount.API],
        mqtt_ca_file=pki.ca_file,
        data_dir=tmp_path / "api",
    )
    try:
        with TestClient(create_app(settings)) as api:
            answer = api.delete(
                f"/v1/devices/{device.device_id}",
                headers={"Authorization": f"Bearer {keys['admin']}"},
            )
        assert answer.status_code == 204, answer.text
        assert client.wait_disconnected()
    finally:
        client.close()
    port = cluster.nodes[0].mqtt_port
    assert connack_of(port, device.device_id, device.device_id, device.password) == 5


@pytest.mark.slow
def test_logins_resume_when_the_responders_node_is_killed(
    database_url: str,
    service_passwords: dict[ServiceAccount, str],
    pki: DevelopmentPKI,
    tmp_path: Path,
) -> None:
    """A cluster of its own: kill -9 the node the only responder is connected to (the first of
    GALVANI_NATS_URLS); it reconnects to another and devices log in again through the
    survivors (printed: seconds from the kill to the first accepted CONNECT)."""
    setup, config = callout_setup(tmp_path / "callout", pki, service_passwords)
    devices = provision(database_url, 2, prefix="nodekill")
    with running_cluster(tmp_path / "nats", pki, callout=config) as nats:
        responder = ResponderProcess(nats, setup, database_url, tmp_path / "responder.log")
        try:
            mqtt(nats, 1, devices[0]).connect().close()
            nats.kill(0)
            killed = time.monotonic()
            while True:
                try:
                    mqtt(nats, 2, devices[1]).connect().close()
                    break
                except Refused:
                    assert time.monotonic() - killed < 60, "no login through the survivors"
                    time.sleep(0.2)
            took = time.monotonic() - killed
            print(f"callout_login_after_node_kill_s={took:.1f}")
            assert "lost the NATS connection" in (tmp_path / "responder.log").read_text()
        finally:
            responder.stop()
