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

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from deploy.stack.pki import DevelopmentPKI
from deploy.stack.postgres import new_password
from services.common.tls import client_context
from tests.ingest import T0_MS, Device, IngestWorkers, provision, scalar, telemetry, wait_until
from tests.nats_single import SingleNats, single_nats

TIMEOUT_S = 10.0


class Device311:
    """A device on the MQTT gateway: MQTT 3.1.1 (NATS refuses 5), QoS 1 publishes, and its
    ``ack`` channel at QoS 0."""

    def __init__(self, port: int, device: Device, ca_file: Path) -> None:
        self.device_id = device.device_id
        self.acks: list[dict[str, object]] = []
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=device.device_id,
            protocol=paho.MQTTv311,
            clean_session=True,
        )
        client.username_pw_set(device.device_id, device.password)
        client.tls_set_context(client_context(ca_file))
        client.on_connect = lambda c, u, f, rc, p: self._connected.set()
        client.on_subscribe = lambda c, u, mid, rcs, p: self._subscribed.set()
        client.on_message = lambda c, u, m: self.acks.append(json.loads(m.payload))
        client.connect("127.0.0.1", port)
        client.loop_start()
        self.client = client
        assert self._connected.wait(TIMEOUT_S), "the device did not connect"
        client.subscribe(f"galvani/v1/d/{self.device_id}/ack", qos=0)
        assert self._subscribed.wait(TIMEOUT_S), "the device did not subscribe"

    def publish(self, seqs: range, *, gap_s: float = 0.0) -> None:
        """Telemetry of 10 samples for each seq, QoS 1, each PUBACKed; ``gap_s`` apart."""
        infos = []
        for seq in seqs:
            infos.append(
                self.client.publish(
                    f"galvani/v1/d/{self.device_id}/telemetry",
                    telemetry(seq, T0_MS + seq * 1000),
                    qos=1,
                )
            )
            if gap_s:
                time.sleep(gap_s)
        for info in infos:
            info.wait_for_publish(TIMEOUT_S)
            assert info.is_published()

    def acked_seqs(self) -> set[int]:
        seqs: set[int] = set()
        for ack in self.acks:
            for first, last in ack["seqs"]:  # type: ignore[attr-defined]
                seqs.update(range(first, last + 1))
        return seqs

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


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
    database_url: str, setup: tuple[SingleNats, IngestWorkers, list[Device]], pki: DevelopmentPKI
) -> None:
    server, workers, devices = setup
    workers.start()  # creates the stream and the consumer before any device publishes
    fleet = [Device311(server.mqtt_port, device, pki.ca_file) for device in devices]
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
    database_url: str, setup: tuple[SingleNats, IngestWorkers, list[Device]], pki: DevelopmentPKI
) -> None:
    server, workers, devices = setup
    workers.start("1")
    device = Device311(server.mqtt_port, devices[0], pki.ca_file)
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
