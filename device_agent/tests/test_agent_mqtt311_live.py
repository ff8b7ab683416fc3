"""The link over MQTT 3.1.1 against real Mosquittos started here: messages PUBACKed and then
deleted only by the backend's stored-acks, a publish the ACL refuses that does not hold the
outbox back, and a device that fails over to a second broker when its first is killed.

Each broker is the smallest Mosquitto with Galvani's shape of ACL (a device writes its own
telemetry, state and presence and reads its own ack and config; events are left out here, so
that an ``events`` message is one the broker refuses). The test plays the backend: a client
that acks every telemetry or events seq it receives, as ingest does after its commit.
"""

import asyncio
import base64
import json
import os
import random
import signal
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from agent_rig import DURABLE
from device_agent.connection import MQTT_311
from device_agent.fleet import Fleet, parse_args
from device_agent.link import BrokerAddress, Link
from device_agent.store import DeviceStore, open_database
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from scripted_broker import FakeClock
from test_agent_tls_live import MOSQUITTO, MOSQUITTO_PASSWD, START_TIMEOUT_S, _free_ports

DEVICE = "dev-311-0001"
BACKEND = "backend"
FLEET = tuple(f"dev-311-fleet-{i}" for i in range(4))
PASSWORDS = {
    DEVICE: "device-password",
    BACKEND: "backend-password",
    **{device: f"{device}-password" for device in FLEET},
}
ACL = f"""\
pattern write galvani/v1/d/%u/telemetry
pattern write galvani/v1/d/%u/state
pattern write galvani/v1/d/%u/presence
pattern read galvani/v1/d/%u/ack
pattern read galvani/v1/d/%u/config

user {BACKEND}
topic read galvani/v1/d/+/telemetry
topic read galvani/v1/d/+/events
topic write galvani/v1/d/+/ack
"""
WAIT_S = 10.0
TICK_S = 0.01

pytestmark = pytest.mark.usefixtures("quick")


@dataclass
class Mosquitto:
    """One running Mosquitto on a loopback port."""

    port: int
    process: subprocess.Popen[bytes]

    def kill(self) -> None:
        """SIGKILL: the node dies, with its connections."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)


def _start(directory: Path, port: int) -> Mosquitto:
    user = "root" if os.geteuid() == 0 else os.environ.get("USER", "nobody")
    config = directory / f"mosquitto-{port}.conf"
    config.write_text(
        f"user {user}\nlog_dest stderr\nlog_type error\nlog_type warning\n"
        f"listener {port} 127.0.0.1\nallow_anonymous false\n"
        f"password_file {directory / 'passwd'}\nacl_file {directory / 'acl'}\n"
    )
    log = open(directory / f"mosquitto-{port}.log", "wb")  # noqa: SIM115 - the child keeps it
    process = subprocess.Popen([MOSQUITTO, "-c", str(config)], stdout=log, stderr=log)
    log.close()
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return Mosquitto(port, process)
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"mosquitto did not start on {port}") from None
            time.sleep(0.05)


@pytest.fixture
def brokers(tmp_path: Path) -> Iterator[list[Mosquitto]]:
    """Two Mosquittos with the same accounts and ACL, as two nodes a device may use."""
    (tmp_path / "acl").write_text(ACL)
    (tmp_path / "passwd").touch(mode=0o600)
    for name, password in PASSWORDS.items():
        subprocess.run(
            [MOSQUITTO_PASSWD, "-b", str(tmp_path / "passwd"), name, password], check=True
        )
    started: list[Mosquitto] = []
    try:
        for port in _free_ports(2):
            started.append(_start(tmp_path, port))
        yield started
    finally:
        for broker in started:
            if broker.process.poll() is None:
                broker.process.terminate()
                broker.process.wait(timeout=10)


class Backend:
    """Acks every telemetry or events seq it receives on one broker, as ingest does after its
    commit."""

    def __init__(self, port: int) -> None:
        self.seqs: list[int] = []
        subscribed = threading.Event()
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"backend-{port}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self.client.username_pw_set(BACKEND, PASSWORDS[BACKEND])
        self.client.on_connect = lambda client, *_: client.subscribe(
            [("galvani/v1/d/+/telemetry", 1), ("galvani/v1/d/+/events", 1)]
        )
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert subscribed.wait(WAIT_S), "the backend could not subscribe"

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        seq = json.loads(message.payload)["seq"]
        self.seqs.append(seq)
        device_id = message.topic.split("/")[3]
        ack = json.dumps({"v": 1, "seqs": [[seq, seq]]}).encode()
        client.publish(f"galvani/v1/d/{device_id}/ack", ack, qos=0)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class Device:
    link: Link
    store: DeviceStore
    clock: FakeClock

    def enqueue(self, channel: str = "telemetry") -> int:
        self.store.enqueue(channel, lambda seq: json.dumps({"v": 1, "seq": seq}).encode(), now_ms=0)
        return self.store.last_seq()

    def outbox(self) -> list[int]:
        return [m.seq for m in self.store.pending(limit=1000)]

    async def until(self, check: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + WAIT_S
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await asyncio.sleep(TICK_S)


@asynccontextmanager
async def linked(
    tmp_path: Path, address: BrokerAddress, clock: FakeClock | None = None
) -> AsyncIterator[Device]:
    """A link over ``address`` on the running loop, serviced every few milliseconds; its
    stored-ack timers on a fake clock (a new one by default)."""
    conn = open_database(tmp_path / "agent.sqlite3", durable=DURABLE)
    store = DeviceStore(conn, DEVICE)
    clock = clock or FakeClock()
    link = Link(
        DEVICE,
        address,
        store,
        lambda raw: None,
        loop=asyncio.get_running_loop(),
        rng=random.Random(1),
        clock=clock,
    )

    async def service() -> None:
        while True:
            link.pump()
            link.service()
            await asyncio.sleep(TICK_S)

    ticker = asyncio.create_task(service())
    link.start()
    device = Device(link, store, clock)
    try:
        await device.until(lambda: link.connected, "the link to connect")
        yield device
    finally:
        ticker.cancel()
        link.stop()
        await asyncio.sleep(0.05)
        conn.close()


def _address(*ports: int) -> BrokerAddress:
    first, *others = ports
    return BrokerAddress(
        "127.0.0.1",
        first,
        PASSWORDS[DEVICE],
        protocol=MQTT_311,
        fallbacks=tuple(("127.0.0.1", port) for port in others),
    )


def test_over_311_telemetry_is_pubacked_then_deleted_by_its_stored_ack(
    tmp_path: Path, brokers: list[Mosquitto]
) -> None:
    backend = Backend(brokers[0].port)

    async def main() -> None:
        async with linked(tmp_path, _address(brokers[0].port)) as device:
            seqs = [device.enqueue() for _ in range(5)]
            await device.until(lambda: device.outbox() == [], "every message stored")

            assert sorted(set(backend.seqs)) == seqs
            assert device.link.stats.delivered == 5
            assert device.link.stats.stored == 5

    try:
        asyncio.run(main())
    finally:
        backend.close()


def test_over_311_a_publish_the_acl_refuses_does_not_hold_the_outbox_back(
    tmp_path: Path, brokers: list[Mosquitto], ack_timeouts: FakeClock
) -> None:
    """Mosquitto answers a 3.1.1 publish its ACL refuses with a plain PUBACK and drops it:
    what follows is stored and deleted, and the refused message waits on its own timer."""
    backend = Backend(brokers[0].port)

    async def main() -> None:
        async with linked(tmp_path, _address(brokers[0].port), ack_timeouts) as device:
            first = device.enqueue()
            refused = device.enqueue("events")
            after = [device.enqueue() for _ in range(3)]
            await device.until(lambda: device.outbox() == [refused], "all but events stored")

            assert backend.seqs == [first, *after]
            assert device.link.connected  # Mosquitto 2.0 did not close the connection
            assert device.link.stats.delivered == 5  # the refused one PUBACKed like the rest
            # It goes again when acks for later seqs have passed it over for its timeout.
            resends = device.link.stats.resends
            ack_timeouts.now = 31.0
            await device.until(lambda: device.link.stats.resends == resends + 1, "a copy")
            later = device.enqueue()
            await device.until(lambda: device.outbox() == [refused], f"seq {later} stored")

    try:
        asyncio.run(main())
    finally:
        backend.close()


def test_a_device_whose_broker_is_killed_fails_over_to_the_other_and_resends_there(
    tmp_path: Path, brokers: list[Mosquitto]
) -> None:
    first, second = brokers
    backend = Backend(second.port)  # the first node's backend dies with it

    async def main() -> None:
        async with linked(tmp_path, _address(first.port, second.port)) as device:
            assert device.link.node == ("127.0.0.1", first.port)
            seqs = [device.enqueue() for _ in range(3)]
            await device.until(lambda: device.link.stats.delivered == 3, "the first node's PUBACKs")
            assert device.outbox() == seqs  # nobody acks on the first node

            first.kill()
            await device.until(
                lambda: device.link.connected and device.link.node[1] == second.port,
                "a connection to the second node",
            )
            seqs.append(device.enqueue())
            await device.until(lambda: device.outbox() == [], "the outbox stored via the second")

            assert sorted(set(backend.seqs)) == seqs
            assert device.link.stats.connects == 2

    try:
        asyncio.run(main())
    finally:
        backend.close()


def test_a_311_fleet_spreads_over_the_nodes_and_a_killed_nodes_devices_move_to_the_other(
    tmp_path: Path, brokers: list[Mosquitto]
) -> None:
    first, second = brokers
    credentials = tmp_path / "credentials.json"
    credentials.write_text(json.dumps({device: PASSWORDS[device] for device in FLEET}))
    key = tmp_path / "config-key"
    key.write_text(base64.b64encode(bytes(32)).decode())
    options = parse_args(
        [
            f"--devices={len(FLEET)}",
            f"--credentials={credentials}",
            f"--broker=127.0.0.1:{first.port},127.0.0.1:{second.port}",
            "--mqtt-version=3.1.1",
            f"--public-key={key}",
            f"--store={tmp_path / 'fleet.sqlite3'}",
            "--status-interval=0.1",
            "--duration=60",  # the bound; it stops once the devices have moved
        ]
    )
    fleet = Fleet(options)
    spread: list[dict[str, int]] = []
    stop = asyncio.Event()

    def report() -> None:
        status = fleet.status()
        by_node = status["connected_by_node"]
        assert isinstance(by_node, dict)
        if not spread and status["connected"] == len(FLEET):
            spread.append(by_node)
            first.kill()
        elif spread and by_node == {f"127.0.0.1:{second.port}": len(FLEET)}:
            stop.set()

    fleet.report = report  # type: ignore[method-assign]
    asyncio.run(fleet.run(stop))

    assert spread == [{f"127.0.0.1:{first.port}": 2, f"127.0.0.1:{second.port}": 2}]
    assert all(
        device.link.stats.connects == 1 + (i % 2 == 0) for i, device in enumerate(fleet.devices)
    )
    assert {device.link._connection.address.protocol for device in fleet.devices} == {MQTT_311}
