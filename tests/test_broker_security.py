"""Per-device credentials and topic ACLs, against the real Mosquitto the suite started."""

import time

import psycopg
import pytest

from deploy.stack.mosquitto import MAX_PACKET_BYTES, MosquittoBroker
from services.common.broker_auth import DEVICE_PASSWD_FILE, ServiceAccount, hash_password
from services.common.protocol.topics import DEVICE_CHANNELS
from services.common.protocol.topics import device_topic as topic
from services.common.provisioning import ProvisioningError, provision_device, revoke_device
from tests.mqtt import MqttClient, Refused

NOT_AUTHORIZED = 0x87
ACCEPTED = {0x00, 0x10}  # success, or "no matching subscribers"


@pytest.fixture
def devices(db: psycopg.Connection, sync_devices) -> dict[str, str]:
    """Two provisioned devices of one brand: id -> password."""
    db.execute("INSERT INTO brands (id, name) VALUES ('acme', 'Acme')")
    made = {
        d.device_id: d.password
        for d in (
            provision_device(db, device_id="dev-a1", brand_id="acme", model="m1"),
            provision_device(db, device_id="dev-b2", brand_id="acme", model="m1"),
        )
    }
    db.commit()
    sync_devices()
    return made


def device_client(broker: MosquittoBroker, device_id: str, password: str, **kw) -> MqttClient:
    return MqttClient(
        "127.0.0.1",
        broker.config.device_port,
        device_id,
        password,
        client_id=kw.pop("client_id", device_id),
        **kw,
    )


def assert_received_only(client: MqttClient, on: str, payload: bytes) -> None:
    """``client`` receives ``payload`` on topic ``on``, and has received nothing elsewhere."""
    own = client.wait_for(on)
    assert own is not None
    assert own.payload == payload
    assert [m.topic for m in client.received] == [on]


def service_client(broker: MosquittoBroker, passwords, account=ServiceAccount.RULES) -> MqttClient:
    return MqttClient(
        "127.0.0.1",
        broker.config.service_port,
        str(account),
        passwords[account],
        client_id=f"{account}-test",
    )


def test_device_publishes_to_each_of_its_own_channels(broker, devices, service_passwords):
    backend = service_client(broker, service_passwords).connect()
    assert backend.subscribe("galvani/v1/d/+/#") == 1
    device = device_client(broker, "dev-a1", devices["dev-a1"]).connect()
    try:
        for channel in DEVICE_CHANNELS:
            assert device.publish(topic("dev-a1", channel), b"{}") in ACCEPTED
            assert backend.wait_for(topic("dev-a1", channel)) is not None
    finally:
        device.close()
        backend.close()


def test_device_cannot_publish_to_another_devices_topics(broker, devices, service_passwords):
    backend = service_client(broker, service_passwords).connect()
    backend.subscribe("galvani/v1/d/+/#")
    device = device_client(broker, "dev-a1", devices["dev-a1"]).connect()
    try:
        for channel in DEVICE_CHANNELS:
            assert device.publish(topic("dev-b2", channel), b"{}") == NOT_AUTHORIZED
        # Nor to its own config (that is the cloud's channel) or outside the namespace.
        assert device.publish(topic("dev-a1", "config"), b"{}") == NOT_AUTHORIZED
        assert device.publish("galvani/v1/other", b"{}") == NOT_AUTHORIZED
        assert backend.wait_for(topic("dev-b2", "telemetry"), timeout_s=0.5) is None
    finally:
        device.close()
        backend.close()


def test_wildcard_subscription_delivers_nothing_of_another_device(
    broker, devices, service_passwords
):
    spy = device_client(broker, "dev-a1", devices["dev-a1"]).connect()
    other = device_client(broker, "dev-b2", devices["dev-b2"]).connect()
    cloud = service_client(broker, service_passwords).connect()
    try:
        # acl_file grants the SUBSCRIBE itself; the ACL is applied to every delivery.
        spy.subscribe("#")
        spy.subscribe(topic("dev-b2", "config"))
        assert other.publish(topic("dev-b2", "telemetry"), b"secret") in ACCEPTED
        assert cloud.publish(topic("dev-b2", "config"), b"table-b") in ACCEPTED
        assert cloud.publish(topic("dev-a1", "config"), b"table-a") in ACCEPTED
        assert_received_only(spy, topic("dev-a1", "config"), b"table-a")
    finally:
        for client in (spy, other, cloud):
            client.close()


def test_client_id_is_bound_to_the_username(broker, devices):
    victim = device_client(broker, "dev-b2", devices["dev-b2"]).connect()
    # dev-a1 asks for dev-b2's client id: the broker uses its username instead, so the
    # victim's session is not taken over.
    impostor = device_client(broker, "dev-a1", devices["dev-a1"], client_id="dev-b2").connect()
    try:
        assert not victim.wait_disconnected(timeout_s=1.0)
        assert victim.connected
        assert impostor.publish(topic("dev-a1", "telemetry"), b"{}") in ACCEPTED
        assert impostor.publish(topic("dev-b2", "telemetry"), b"{}") == NOT_AUTHORIZED
    finally:
        victim.close()
        impostor.close()


def test_ingest_acks_reach_only_the_device_they_name(broker, devices, service_passwords):
    device = device_client(broker, "dev-a1", devices["dev-a1"]).connect()
    ingest = service_client(broker, service_passwords, ServiceAccount.INGEST).connect()
    try:
        assert device.subscribe(topic("dev-a1", "ack")) == 1
        # Granted, as every SUBSCRIBE is; the ACL then withholds dev-b2's acks from dev-a1.
        device.subscribe(topic("dev-b2", "ack"))
        assert ingest.publish(topic("dev-b2", "ack"), b"acks-b") in ACCEPTED
        assert ingest.publish(topic("dev-a1", "ack"), b"acks-a") in ACCEPTED
        assert_received_only(device, topic("dev-a1", "ack"), b"acks-a")
        # Acks are the cloud's word: a device can forge none, for itself or another device.
        assert device.publish(topic("dev-a1", "ack"), b"{}") == NOT_AUTHORIZED
        assert device.publish(topic("dev-b2", "ack"), b"{}") == NOT_AUTHORIZED
    finally:
        device.close()
        ingest.close()


def test_no_device_credential_takes_over_a_backend_session(
    broker, db, devices, sync_devices, service_passwords
):
    # A database restored from before the constraint could hold a reserved device id; the
    # broker's password file must still never admit it.
    db.execute("ALTER TABLE devices DROP CONSTRAINT IF EXISTS devices_id_not_reserved")
    db.execute(
        "INSERT INTO devices (id, brand_id, model, credential_hash)"
        " VALUES ('galvani-ingest-1', 'acme', 'm1', %s)",
        [hash_password("reserved-pw")],
    )
    db.commit()
    assert sync_devices() == 2
    passwd = (broker.config.directory / DEVICE_PASSWD_FILE).read_text()
    assert [line.split(":")[0] for line in passwd.splitlines()] == ["dev-a1", "dev-b2"]
    device_port, service_port = broker.config.device_port, broker.config.service_port
    ingest = MqttClient(
        "127.0.0.1",
        service_port,
        str(ServiceAccount.INGEST),
        service_passwords[ServiceAccount.INGEST],
        client_id="galvani-ingest-1",
        clean_start=False,
        session_expiry_s=300,
    ).connect()
    try:
        assert ingest.subscribe("$share/reserved-ids/galvani/v1/d/+/telemetry") == 1
        for port in (device_port, service_port):
            with pytest.raises(Refused):
                MqttClient(
                    "127.0.0.1",
                    port,
                    "galvani-ingest-1",
                    "reserved-pw",
                    client_id="galvani-ingest-1",
                ).connect()
        with pytest.raises(Refused):
            MqttClient(
                "127.0.0.1", service_port, "dev-a1", devices["dev-a1"], client_id="galvani-ingest-1"
            ).connect()
        # On the device listener the broker swaps the asked-for id for the username.
        device = device_client(
            broker, "dev-a1", devices["dev-a1"], client_id="galvani-ingest-1"
        ).connect()
        try:
            assert device.publish(topic("dev-a1", "telemetry"), b"after") in ACCEPTED
        finally:
            device.close()
        assert not ingest.wait_disconnected(timeout_s=0.5)
        received = ingest.wait_for(topic("dev-a1", "telemetry"))
        assert received is not None
        assert received.payload == b"after"
    finally:
        ingest.close()
        # A clean start discards the session this test kept in the suite's broker.
        MqttClient(
            "127.0.0.1",
            service_port,
            str(ServiceAccount.INGEST),
            service_passwords[ServiceAccount.INGEST],
            client_id="galvani-ingest-1",
        ).connect().close()


def test_last_will_reaches_only_the_devices_own_presence(broker, devices, service_passwords):
    cloud = service_client(broker, service_passwords, ServiceAccount.INGEST).connect()
    cloud.subscribe("galvani/v1/d/+/presence")
    forged = device_client(
        broker, "dev-a1", devices["dev-a1"], will=(topic("dev-b2", "presence"), b"forged")
    ).connect()
    forged.drop()
    honest = device_client(
        broker,
        "dev-b2",
        devices["dev-b2"],
        will=(topic("dev-b2", "presence"), b'{"v":1,"online":false}'),
    ).connect()
    honest.drop()
    try:
        will = cloud.wait_for(topic("dev-b2", "presence"))
        assert will is not None
        assert will.payload == b'{"v":1,"online":false}'
        time.sleep(0.3)
        # Other tests leave retained presence of their own devices; only these two matter.
        mine = [m for m in cloud.received if m.topic in {topic(d, "presence") for d in devices}]
        assert [m.payload for m in mine] == [b'{"v":1,"online":false}']
    finally:
        cloud.close()


def test_anonymous_and_wrong_credentials_are_refused(broker, devices, service_passwords):
    port = broker.config.device_port
    for username, password in ((None, None), ("dev-a1", "wrong"), ("dev-zz9", devices["dev-a1"])):
        with pytest.raises(Refused):
            MqttClient("127.0.0.1", port, username, password, client_id="x-anon").connect()
    # Service accounts exist only on the service listener, devices only on the device one.
    with pytest.raises(Refused):
        MqttClient(
            "127.0.0.1", port, "galvani-rules", service_passwords[ServiceAccount.RULES]
        ).connect()
    with pytest.raises(Refused):
        MqttClient("127.0.0.1", broker.config.service_port, "dev-a1", devices["dev-a1"]).connect()
    with pytest.raises(Refused):
        MqttClient("127.0.0.1", broker.config.service_port, None, None).connect()


def test_provisioned_device_connects_within_a_second_without_restart(
    broker, db, devices, sync_devices
):
    pid_before = broker.child.pid
    new = provision_device(db, device_id="dev-c3", brand_id="acme", model="m2")
    db.commit()
    started = time.monotonic()
    sync_devices()
    while True:
        try:
            client = device_client(broker, "dev-c3", new.password).connect()
            break
        except Refused:
            assert time.monotonic() - started < 1.0, "device not admitted within a second"
            time.sleep(0.05)
    client.close()
    assert broker.child.pid == pid_before


def test_revoked_device_is_disconnected_and_cannot_reconnect(broker, db, devices, sync_devices):
    connected = device_client(broker, "dev-a1", devices["dev-a1"]).connect()
    assert revoke_device(db, "dev-a1")
    db.commit()
    sync_devices()
    assert connected.wait_disconnected(timeout_s=2.0)
    with pytest.raises(Refused):
        device_client(broker, "dev-a1", devices["dev-a1"]).connect()
    # The other device is untouched.
    device_client(broker, "dev-b2", devices["dev-b2"]).connect().close()


def test_packet_over_the_broker_limit_is_refused(broker, devices):
    # Payloads a little over protocol v1's 64 KiB reach ingest and become dead letters that
    # say why; the broker refuses only packets past MAX_PACKET_BYTES, to protect its memory.
    device = device_client(broker, "dev-a1", devices["dev-a1"]).connect()
    try:
        assert device.publish(topic("dev-a1", "telemetry"), b"x" * (70 * 1024)) in ACCEPTED
        with pytest.raises(TimeoutError):
            device.publish(topic("dev-a1", "telemetry"), b"x" * (MAX_PACKET_BYTES + 1))
        assert device.wait_disconnected()
    finally:
        device.close()


@pytest.mark.parametrize(
    "bad_id", ["Dev-1", "d1", "dev/1", "dev+1", "dev#1", "dev%c", "-dev", "a" * 65]
)
def test_device_ids_outside_the_pattern_get_no_credentials(db, bad_id):
    db.execute("INSERT INTO brands (id, name) VALUES ('acme', 'Acme')")
    with pytest.raises(ProvisioningError, match="must match"):
        provision_device(db, device_id=bad_id, brand_id="acme", model="m1")
    assert db.execute("SELECT count(*) FROM devices").fetchone() == (0,)
