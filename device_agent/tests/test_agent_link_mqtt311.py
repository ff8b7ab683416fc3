"""The link over MQTT 3.1.1 against a scripted broker: no PUBACK reason codes, so a PUBACK is
a success, a refusal is a silent drop or a closed connection, and a refused subscription is
SUBACK 0x80; and failing over to another node of a cluster.

What MQTT 5's reason codes decide is tested in test_agent_link.py; the same link against a real
Mosquitto speaking 3.1.1: test_agent_mqtt311_live.py.
"""

import asyncio
from pathlib import Path

import pytest
from device_agent.connection import MQTT_5, MQTT_311
from device_agent.store import DropCounts
from scripted_broker import (
    ACK_TOPIC,
    HANG_UP,
    NOT_AUTHORIZED,
    SUCCESS,
    Device,
    FakeClock,
    ScriptedBroker,
    connected,
    run_linked,
)

from device_agent import connection as connection_module
from device_agent import puback as puback_module

pytestmark = pytest.mark.usefixtures("quick")


def test_over_311_a_puback_is_a_delivery_and_only_a_stored_ack_deletes(tmp_path: Path) -> None:
    broker = ScriptedBroker()

    async def scenario(device: Device) -> None:
        await device.deliver(3)
        assert device.outbox() == [1, 2, 3]

        await device.acked((1, 2), leaving=[3])
        assert broker.levels == [4]
        assert device.link.stats.stored == 2

    run_linked(scenario, tmp_path, broker, protocol=MQTT_311)


def test_a_311_suback_refusal_is_counted(tmp_path: Path) -> None:
    broker = ScriptedBroker(refuse=frozenset({ACK_TOPIC}))

    async def scenario(device: Device) -> None:
        await device.until(lambda: device.link.stats.subscribe_refused == 1, "the SUBACK 0x80")

    run_linked(scenario, tmp_path, broker, protocol=MQTT_311)


def test_a_message_the_broker_hangs_up_on_is_given_up_after_its_tries_and_reported(
    tmp_path: Path,
) -> None:
    """As RabbitMQ does for a publish its permissions refuse: the connection closes, and
    the message never leaves the outbox on its own."""
    broker = ScriptedBroker(lambda seq, seen: HANG_UP if seq == 2 else SUCCESS)

    async def scenario(device: Device) -> None:
        device.enqueue(3, channel="events")
        await device.until(lambda: device.link.stats.refused == 1, "seq 2 given up", 10)
        await device.until(lambda: 3 in broker.seqs(SUCCESS), "seq 3 taken")

        assert broker.seqs().count(2) == 1 + puback_module.REFUSED_RETRIES
        assert device.link.stats.hung_up == 1 + puback_module.REFUSED_RETRIES
        assert device.outbox() == [1, 3]  # delivered, waiting for their stored-acks
        assert device.store.dropped() == DropCounts(messages=1, first_seq=2, last_seq=2, events=1)
        await device.acked((1, 3), leaving=[])

    run_linked(scenario, tmp_path, broker, protocol=MQTT_311)


def test_a_puback_starts_the_count_of_lost_connections_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node dying under a message is not a refusal: only ends in a row with no PUBACK for
    the message between them give it up."""
    monkeypatch.setattr(puback_module, "REFUSED_RETRIES", 2)
    # Seq 2 meets a lost connection, a PUBACK, then two lost connections: never three in a row.
    broker = ScriptedBroker(
        lambda seq, seen: HANG_UP if seq == 2 and seen in (0, 2, 3) else SUCCESS
    )

    async def scenario(device: Device) -> None:
        device.enqueue(3)
        await device.until(lambda: broker.seqs(SUCCESS).count(2) == 1, "seq 2 taken")
        broker.hang_up()  # the next connection sends the outbox again from seq 1
        await device.until(lambda: broker.seqs(SUCCESS).count(2) == 2, "seq 2 taken again")

        assert broker.seqs().count(2) == 5
        assert device.link.stats.refused == 0
        assert device.store.dropped() == DropCounts()
        await device.acked((1, 3), leaving=[])

    run_linked(scenario, tmp_path, broker, protocol=MQTT_311)


def test_mqtt_5_never_gives_a_message_up_for_a_lost_connection(tmp_path: Path) -> None:
    """Over MQTT 5 a refusal comes as a reason code: a lost connection is only a lost
    connection, however often it happens."""
    broker = ScriptedBroker(lambda seq, seen: HANG_UP if seq == 2 and seen < 7 else SUCCESS)

    async def scenario(device: Device) -> None:
        device.enqueue(3)
        await device.until(lambda: 2 in broker.seqs(SUCCESS), "seq 2 taken", 15)

        assert device.link.stats.refused == 0
        assert device.link.stats.hung_up == 0
        assert device.outbox() == [1, 2, 3]

    run_linked(scenario, tmp_path, broker, protocol=MQTT_5)


def test_over_311_a_silently_dropped_message_is_sent_again_on_its_stored_ack_timer(
    tmp_path: Path, ack_timeouts: FakeClock
) -> None:
    """Mosquitto 2.0 and NATS PUBACK a 3.1.1 publish their ACL refuses: the message is
    dropped, and later ones are stored. It goes again when its stored-ack is overdue."""
    broker = ScriptedBroker(lambda seq, seen: NOT_AUTHORIZED if seq == 2 else SUCCESS)

    async def scenario(device: Device) -> None:
        await device.deliver(3)
        assert device.link.stats.refused == 0  # nothing in a 3.1.1 PUBACK says so
        await device.acked((1, 1), (3, 3), leaving=[2])
        before, at_due = await device.around(30)

        assert device.since(before) == [2, at_due]
        assert device.outbox() == [2, before, at_due]

    run_linked(scenario, tmp_path, broker, clock=ack_timeouts, protocol=MQTT_311)


def test_a_device_fails_over_to_the_next_node_and_sends_its_outbox_there(
    tmp_path: Path,
) -> None:
    first, second = ScriptedBroker(), ScriptedBroker()

    async def main() -> None:
        second_port = await second.start()
        async with connected(
            tmp_path, first, protocol=MQTT_311, fallbacks=(("127.0.0.1", second_port),)
        ) as device:
            await device.deliver(2)
            await first.close()  # the node dies: its listener is gone, its connections cut
            await device.until(lambda: second.connects == 1, "a connection to the second node")
            await device.until(lambda: device.link.connected, "the second node's CONNACK")

            assert device.link.node == ("127.0.0.1", second_port)
            await device.until(lambda: second.seqs() == [1, 2], "the outbox sent again")
            assert second.levels == [4]
            await asyncio.sleep(0)
            device.broker = second
            await device.acked((1, 2), leaving=[])
        await second.close()

    asyncio.run(main())


def test_a_node_that_never_answers_the_connect_is_left_for_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stopped node's kernel still accepts the TCP connection: without a CONNACK timeout the
    device would wait out its keepalive there."""
    monkeypatch.setattr(connection_module, "CONNECT_TIMEOUT_S", 0.3)
    wedged, working = ScriptedBroker(wedged=True), ScriptedBroker()

    async def main() -> None:
        port = await working.start()
        started = asyncio.get_running_loop().time()
        async with connected(
            tmp_path, wedged, protocol=MQTT_311, fallbacks=(("127.0.0.1", port),)
        ) as device:
            assert device.link.node == ("127.0.0.1", port)
            assert wedged.connects == 1
            assert asyncio.get_running_loop().time() - started < 2.0
        await working.close()

    asyncio.run(main())


def test_a_node_that_stops_answering_is_left_after_the_keepalive(tmp_path: Path) -> None:
    """A stopped (SIGSTOP) or partitioned node keeps the TCP connection open and answers
    nothing: paho gives it up after one to two keepalives, and the next node is tried."""
    stalled, working = ScriptedBroker(), ScriptedBroker()

    async def main() -> None:
        port = await working.start()
        async with connected(
            tmp_path, stalled, protocol=MQTT_311, fallbacks=(("127.0.0.1", port),), keepalive_s=1
        ) as device:
            stalled.wedged = True
            started = asyncio.get_running_loop().time()
            await device.until(lambda: working.connects == 1, "a connection to the next node")
            await device.until(lambda: device.link.connected, "its CONNACK")

            assert 1.0 <= asyncio.get_running_loop().time() - started < 4.0
            assert device.link.node == ("127.0.0.1", port)
        await working.close()

    asyncio.run(main())
