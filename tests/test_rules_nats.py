"""Rules (and ingest beside it) on NATS: both groups consume every device message from the
JetStream stream, and rules' signed tables go back over MQTT 3.1.1, retained, through NATS's
MQTT gateway, to the device.

One nats-server (tests/nats_single.py) with TLS and static users.
"""

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from deploy.stack.pki import DevelopmentPKI
from deploy.stack.ports import free_port
from deploy.stack.postgres import new_password
from services.common.config_push import connect_publisher
from services.common.protocol import signing_input
from services.common.signing import load_or_create_key, public_key_b64
from services.rules.settings import RulesSettings
from tests.ingest import Device, IngestWorkers, provision, scalar, topic, wait_until
from tests.mqtt import MQTT_311, MqttClient
from tests.nats_single import SingleNats, single_nats
from tests.rules import RulesWorkers, overcurrent_telemetry

TIMEOUT_S = 20.0


def as_device(server: SingleNats, device: Device) -> MqttClient:
    """An MQTT 3.1.1 client of the gateway as ``device``, not connected yet."""
    return MqttClient(
        "127.0.0.1",
        server.mqtt_port,
        device.device_id,
        device.password,
        client_id=device.device_id,
        protocol=MQTT_311,
    )


@pytest.fixture
def nats_stack(
    database_url: str, pki: DevelopmentPKI, tmp_path: Path
) -> Iterator[tuple[SingleNats, list[Device], dict[str, str]]]:
    devices = provision(database_url, 1, prefix="natsrules")
    passwords = {"galvani-ingest": new_password(), "galvani-rules": new_password()}
    users = {**passwords, **{d.device_id: d.password for d in devices}}
    tls = (pki.server_cert, pki.server_key, pki.ca_file)
    with single_nats(tmp_path / "nats", users, tls=tls) as server:
        yield server, devices, passwords


def test_an_overcurrent_through_nats_is_stored_raises_an_alert_and_the_safe_table_arrives(
    database_url: str,
    ingest_database_url: str,
    rules_database_url: str,
    nats_stack: tuple[SingleNats, list[Device], dict[str, str]],
    pki: DevelopmentPKI,
    tmp_path: Path,
    key_dir: Path,
) -> None:
    server, [device], passwords = nats_stack
    rules = RulesWorkers.on_nats(
        rules_database_url,
        server.url(),
        passwords["galvani-rules"],
        tmp_path,
        pki.ca_file,
        mqtt_port=server.mqtt_port,
        GALVANI_RULES_SIGNING_KEY_DIR=str(key_dir),
    )
    ingest = IngestWorkers.on_nats(
        ingest_database_url, server.url(), passwords["galvani-ingest"], tmp_path, pki.ca_file
    )
    try:
        rules.start()
        ingest.start()
        client = as_device(server, device).connect()
        try:
            assert client.subscribe(topic(device.device_id, "config"), qos=1) == 1
            now = int(time.time() * 1000)
            client.publish(topic(device.device_id, "telemetry"), overcurrent_telemetry(1, now))
            pushed = client.wait_for(topic(device.device_id, "config"), TIMEOUT_S)
        finally:
            client.close()
        assert pushed is not None, rules.log_text()[-2000:]
        table = json.loads(pushed.payload)
        public = Ed25519PublicKey.from_public_bytes(
            base64.b64decode(public_key_b64(load_or_create_key(key_dir)))
        )
        public.verify(base64.b64decode(table["sig"]), signing_input(table))
        assert table["reason"] == "overcurrent"
        assert scalar(database_url, "SELECT rule FROM alerts") == "overcurrent"
        wait_until(
            lambda: scalar(database_url, "SELECT count(*) FROM samples") == 3,
            TIMEOUT_S,
            "ingest to store the same message",
        )
        assert scalar(database_url, "SELECT published_at IS NOT NULL FROM config_pushes")
        # A device that reconnects later finds the table retained.
        late = as_device(server, device)
        late.connect()
        try:
            late.subscribe(topic(device.device_id, "config"), qos=1)
            again = late.wait_for(topic(device.device_id, "config"), TIMEOUT_S)
        finally:
            late.close()
        assert again is not None
        assert again.retain
        assert again.payload == pushed.payload
    finally:
        rules.close()
        ingest.close()
    assert "Traceback" not in rules.log_text()


def test_the_publisher_speaks_311_to_nats_and_moves_on_from_a_dead_node(
    nats_stack: tuple[SingleNats, list[Device], dict[str, str]], pki: DevelopmentPKI
) -> None:
    server, [device], passwords = nats_stack
    settings = RulesSettings(
        database_url="postgresql://galvani_rules:unused-here@127.0.0.1/none",
        mqtt_password=passwords["galvani-rules"],
        mqtt_ca_file=pki.ca_file,
        broker="nats",
        nats_urls=server.url(),
        mqtt_nodes=f"127.0.0.1:{free_port()},127.0.0.1:{server.mqtt_port}",
    )
    publisher = connect_publisher(settings, "galvani-rules-test-publisher")
    try:
        wait_until(publisher.is_connected, TIMEOUT_S, "the publisher to reach the live node")
        info = publisher.publish(topic(device.device_id, "config"), b"{}", qos=1, retain=True)
        info.wait_for_publish(TIMEOUT_S)
        assert info.is_published()
    finally:
        publisher.disconnect()
        publisher.loop_stop()
    reader = as_device(server, device)
    reader.connect()
    try:
        reader.subscribe(topic(device.device_id, "config"), qos=1)
        retained = reader.wait_for(topic(device.device_id, "config"))
    finally:
        reader.close()
    assert retained is not None
    assert retained.retain
    assert retained.payload == b"{}"
