"""Ingest end to end on NATS: devices publish MQTT 3.1.1 QoS 1 through NATS's MQTT gateway,
JetStream keeps the messages, a real ingest worker (``GALVANI_BROKER=nats``) stores them in
TimescaleDB exactly once and sends each device its stored acks as core NATS messages, which
reach the device's MQTT subscription.

One nats-server (tests/nats_single.py) with TLS on both listeners and static users; the
cluster and its auth callout are tested elsewhere (tests/test_nats_cluster.py).
"""

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.stack.pki import DevelopmentPKI
from deploy.stack.postgres import new_password
from tests.ingest import (
    T0_MS,
    Device,
    IngestWorkers,
    provision,
    scalar,
    telemetry,
    topic,
    wait_until,
)
from tests.mqtt import MQTT_311, MqttClient
from tests.nats_single import SingleNats, single_nats

TIMEOUT_S = 10.0


class Device311:
    """A device on the MQTT gateway (tests/mqtt.py's client over MQTT 3.1.1; NATS refuses 5):
    QoS 1 telemetry, and its ``ack`` channel at QoS 0."""

    def __init__(self, port: int, device: Device) -> None:
        self.device_id = device.device_id
        self.client = MqttClient(
            "127.0.0.1",
            port,
            device.device_id,
            device.password,
            client_id=device.device_id,
            protocol=MQTT_311,
        )
        self.client.connect()
        assert self.client.subscribe(topic(self.device_id, "ack"), qos=0) == 0

    def publish(self, seqs: range, *, gap_s: float = 0.0) -> None:
        """Telemetry of 10 samples for each seq, each PUBACKed; ``gap_s`` apart."""
        for seq in seqs:
            self.client.publish(
                topic(self.device_id, "telemetry"), telemetry(seq, T0_MS + seq * 1000)
            )
            if gap_s:
                time.sleep(gap_s)

    def acked_seqs(self) -> set[int]:
        """Every seq the device's stored acks have covered so far."""
        seqs: set[int] = set()
        for message in list(self.client.received):
            if message.topic == topic(self.device_id, "ack"):
                for first, last in json.loads(message.payload)["seqs"]:
                    seqs.update(range(first, last + 1))
        return seqs

    def close(self) -> None:
        self.client.close()


@pytest.fixture
def setup(
    database_url: str, ingest_database_url: str, pki: DevelopmentPKI, tmp_path: Path
) -> Iterator[tuple[SingleNats, IngestWorkers, list[Device]]]:
    devices = provision(database_url, 2, prefix="nats")
    password = new_password()
    users = {"galvani-ingest": password, **{d.device_id: d.password for d in devices}}
    tls = (pki.server_cert, pki.server_key, pki.ca_file)
    with single_nats(tmp_path / "nats", users, tls=tls) as server:
        workers = IngestWorkers.on_nats(
            ingest_database_url, server.url(), password, tmp_path, pki.ca_file
        )
        workers.env_overrides["GALVANI_INGEST_NATS_ACK_WAIT_S"] = "2"
        try:
            yield server, workers, devices
        finally:
            workers.close()


def samples(url: str) -> int:
    return int(str(scalar(url, "SELECT count(*) FROM samples")))


def messages(url: str) -> int:
    return int(str(scalar(url, "SELECT count(*) FROM telemetry_messages")))


def test_mqtt_311_telemetry_through_nats_is_stored_once_and_acknowledged_to_the_device(
    database_url: str, setup: tuple[SingleNats, IngestWorkers, list[Device]]
) -> None:
    server, workers, devices = setup
    workers.start()  # creates the stream and the consumer before any device publishes
    fleet = [Device311(server.mqtt_port, device) for device in devices]
    try:
        for device in fleet:
            device.publish(range(1, 31))
        wait_until(lambda: samples(database_url) == 600, TIMEOUT_S, "600 samples")
        assert messages(database_url) == 60
        for device in fleet:
            wait_until(
                lambda d=device: d.acked_seqs() == set(range(1, 31)),  # type: ignore[misc]
                TIMEOUT_S,
                f"stored acks for {device.device_id}",
            )
        # A device that did not see its acks sends again: stored once all the same.
        fleet[0].publish(range(1, 11))
        wait_until(
            lambda: (
                workers.metric(
                    "1", "galvani_ingest_messages_total", 'channel="telemetry",outcome="duplicate"'
                )
                == 10
            ),
            TIMEOUT_S,
            "10 duplicates counted",
        )
        assert samples(database_url) == 600
    finally:
        for device in fleet:
            device.close()
    assert workers.stop() == 0
    assert "Traceback" not in workers.log_text()


def test_a_worker_killed_under_load_loses_and_duplicates_nothing(
    database_url: str, setup: tuple[SingleNats, IngestWorkers, list[Device]]
) -> None:
    server, workers, devices = setup
    workers.start("1")
    device = Device311(server.mqtt_port, devices[0])
    try:
        publisher = threading.Thread(
            target=device.publish, args=(range(1, 301),), kwargs={"gap_s": 0.01}
        )
        publisher.start()
        wait_until(lambda: samples(database_url) >= 500, TIMEOUT_S, "the first samples")
        workers.kill("1")
        publisher.join(TIMEOUT_S)
        assert not publisher.is_alive()
        stored_at_kill = samples(database_url)
        assert stored_at_kill < 3000
        workers.start("2")  # the group's durable consumer: what "1" held comes again
        wait_until(lambda: samples(database_url) == 3000, 3 * TIMEOUT_S, "3000 samples")
        time.sleep(3)  # past the 2 s ack_wait: nothing more arrives
        assert samples(database_url) == 3000
        assert messages(database_url) == 300
        wait_until(lambda: device.acked_seqs() == set(range(1, 301)), TIMEOUT_S, "every seq acked")
    finally:
        device.close()
