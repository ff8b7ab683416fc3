"""The link's delivery rules against a scripted broker: PUBACK reason codes, stored-acks,
subscriptions, and the legacy delete-on-PUBACK mode.

The stored-ack timers that send a delivered message again: test_agent_link_resend.py.
"""

import asyncio
from pathlib import Path

import pytest
from device_agent.link import DeleteOn
from device_agent.store import DropCounts
from scripted_broker import (
    ACK_TOPIC,
    DEVICE,
    NO_MATCHING_SUBSCRIBERS,
    SUCCESS,
    Device,
    ScriptedBroker,
    run_linked,
)

from device_agent import connection as connection_module
from device_agent import puback as puback_module

pytestmark = pytest.mark.usefixtures("quick")


def test_a_delivered_message_stays_in_the_outbox_until_a_stored_ack_covers_it(
    tmp_path: Path,
) -> None:
    async def scenario(device: Device) -> None:
        await device.deliver(3)
        assert device.outbox() == [1, 2, 3]  # the broker has them; the backend may not

        await device.acked((1, 2), leaving=[3])
        assert device.store.backlog()[0] == 1
        # and 1..2 acknowledged again: nothing more
        await device.acked((3, 3), (1, 2), leaving=[])

        assert device.link.stats.stored == 3
        assert device.broker.seqs() == [1, 2, 3]  # sent once each
        assert device.store.dropped() == DropCounts()

    run_linked(scenario, tmp_path, ScriptedBroker())


def test_the_link_subscribes_to_config_and_ack_on_every_connection(tmp_path: Path) -> None:
    async def scenario(device: Device) -> None:
        device.broker.hang_up()
        await device.until(lambda: device.broker.connects == 2, "a reconnect")
        await device.until(lambda: len(device.broker.subscriptions) == 2, "a subscribe")

        # config at QoS 1; ack at 0, the QoS its stored-acks are published at (on NATS a QoS 1
        # filter costs a JetStream consumer, which an election can refuse).
        wanted = {(f"galvani/v1/d/{DEVICE}/config", 1), (ACK_TOPIC, 0)}
        for subscription in device.broker.subscriptions:
            assert set(subscription) == wanted

    run_linked(scenario, tmp_path, ScriptedBroker())


def test_a_new_connection_sends_every_unstored_message_again_from_the_oldest(
    tmp_path: Path,
) -> None:
    async def scenario(device: Device) -> None:
        await device.deliver(4)
        await device.acked((2, 2), leaving=[1, 3, 4])

        device.broker.hang_up()  # say the broker crashed with 1, 3 and 4 in memory
        await device.until(lambda: device.broker.seqs()[4:] == [1, 3, 4], "a resend")

        assert device.outbox() == [1, 3, 4]

    run_linked(scenario, tmp_path, ScriptedBroker())


def test_a_malformed_ack_deletes_nothing_and_the_link_carries_on(tmp_path: Path) -> None:
    malformed = [
        b"not json",
        b"[" * 100_000,
        b'{"v": 2, "seqs": [[1, 3]]}',
        b'{"v": 1, "seqs": [[1, 3], [5, 4]]}',
        b'{"v": 1, "seqs": [[1, true]]}',
        b'{"v": 1}',
        b"",
    ]

    async def scenario(device: Device) -> None:
        await device.deliver(3)
        for payload in malformed:
            device.broker.send(ACK_TOPIC, payload)
        await device.acked((2, 2), leaving=[1, 3])  # a good ack after them is still read

        assert device.link.stats.malformed_acks == len(malformed)
        assert device.link.connected

    run_linked(scenario, tmp_path, ScriptedBroker())


def test_no_matching_subscribers_keeps_the_message_and_sends_it_again_after_a_backoff(
    tmp_path: Path,
) -> None:
    # After a broker restart the backend's subscription is not back yet: the first two tries
    # of every message meet no subscriber.
    broker = ScriptedBroker(lambda seq, seen: NO_MATCHING_SUBSCRIBERS if seen < 2 else SUCCESS)

    async def scenario(device: Device) -> None:
        await device.deliver(3)

        assert device.outbox() == [1, 2, 3]  # delivered, not yet stored
        assert device.link.stats.no_subscribers == 6
        assert broker.seqs(SUCCESS) == [1, 2, 3]
        # Each round starts again from the oldest message not taken, in seq order.
        assert broker.seqs() == [1, 2, 3] * 3
        tries = [p.at for p in broker.published if p.seq == 1]
        assert tries[1] - tries[0] >= 0.5 * puback_module.RETRY_BACKOFF_MIN_S

    run_linked(scenario, tmp_path, broker)


def test_quota_exceeded_is_sent_again_until_the_broker_takes_it(tmp_path: Path) -> None:
    refusals = puback_module.REFUSED_RETRIES + 2  # more than a refusal that may not clear gets
    broker = ScriptedBroker(lambda seq, seen: 0x97 if seq == 2 and seen < refusals else SUCCESS)

    async def scenario(device: Device) -> None:
        device.enqueue(3)
        await device.until(lambda: set(broker.seqs(SUCCESS)) == {1, 2, 3}, "every seq taken")

        assert broker.seqs().count(2) == refusals + 1
        assert device.link.stats.retried == refusals
        assert device.store.dropped() == DropCounts()
        assert device.outbox() == [1, 2, 3]

    run_linked(scenario, tmp_path, broker)


# (code, tries): a refusal that cannot clear is given up at once (0x87 not authorized, 0x90
# topic name invalid, 0x99 payload format invalid); one that may clear is sent again
# REFUSED_RETRIES times first. Telemetry and events are given up alike.
REFUSALS = [
    *[pytest.param(code, "telemetry", 1, id=hex(code)) for code in (0x87, 0x90, 0x99)],
    *[
        pytest.param(code, "events", 1 + puback_module.REFUSED_RETRIES, id=hex(code))
        for code in (0x80, 0x83, 0x91)
    ],
]


@pytest.mark.parametrize(("code", "channel", "tries"), REFUSALS)
def test_a_refusal_is_given_up_after_its_tries_and_reported_as_a_drop(
    tmp_path: Path, code: int, channel: str, tries: int
) -> None:
    broker = ScriptedBroker(lambda seq, seen: code if seq == 2 else SUCCESS)

    async def scenario(device: Device) -> None:
        device.enqueue(3, channel=channel)
        await device.until(lambda: device.link.stats.refused == 1, "seq 2 given up")
        await device.until(lambda: broker.seqs(SUCCESS) == [1, 3], "seqs 1 and 3 taken")

        assert broker.seqs().count(2) == tries
        assert device.outbox() == [1, 3]
        assert device.store.dropped() == DropCounts(
            messages=1, first_seq=2, last_seq=2, **{channel: 1}
        )

    run_linked(scenario, tmp_path, broker)


def test_after_a_refusal_what_was_delivered_meanwhile_is_not_sent_again(tmp_path: Path) -> None:
    # Seq 1's first try meets a full quota; seqs 2 and 3, in flight beside it, are taken.
    broker = ScriptedBroker(lambda seq, seen: 0x97 if seq == 1 and seen == 0 else SUCCESS)

    async def scenario(device: Device) -> None:
        device.enqueue(3)
        await device.until(lambda: broker.seqs(SUCCESS).count(1) == 1, "seq 1 taken")
        marker = await device.marker()

        assert broker.seqs() == [1, 2, 3, 1, marker]
        assert device.outbox() == [1, 2, 3, marker]  # delivered, waiting for stored-acks

    run_linked(scenario, tmp_path, broker)


def test_a_refused_subscription_is_logged_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A missing ACL line for ``ack``: no stored-ack will ever come, and the outbox fills."""
    broker = ScriptedBroker(refuse=frozenset({ACK_TOPIC}))

    async def scenario(device: Device) -> None:
        await device.until(lambda: device.link.stats.subscribe_refused == 1, "the SUBACK")
        device.broker.hang_up()
        await device.until(lambda: device.link.stats.subscribe_refused == 2, "again")

    with caplog.at_level("ERROR", logger="galvani.agent.link"):
        run_linked(scenario, tmp_path, broker)
    refusals = [r for r in caplog.records if ACK_TOPIC in r.getMessage()]
    assert len(refusals) == 2
    assert all(r.levelname == "ERROR" for r in refusals)
    assert not any(f"d/{DEVICE}/config" in r.getMessage() for r in caplog.records)


def test_a_refused_subscription_is_subscribed_again_on_the_same_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As NATS refuses a QoS 1 filter while JetStream elects a leader: the device must not
    stay connected and deaf until its connection happens to end."""
    monkeypatch.setattr(connection_module, "SUBSCRIBE_RETRY_MIN_S", 0.05)
    config = f"galvani/v1/d/{DEVICE}/config"
    broker = ScriptedBroker(refuse=frozenset({ACK_TOPIC, config}))

    async def scenario(device: Device) -> None:
        await device.until(lambda: device.link.stats.subscribe_refused == 2, "the SUBACK")
        await device.until(lambda: device.link.stats.subscribe_refused == 4, "a refused retry")
        broker.refuse = frozenset()
        await device.until(lambda: len(broker.subscriptions) == 3, "a granted retry")
        await asyncio.sleep(0.3)  # time for a retry that should not come

        assert broker.connects == 1
        assert broker.subscriptions[1:] == [[(ACK_TOPIC, 0), (config, 1)]] * 2
        assert device.link.stats.subscribe_refused == 4

    run_linked(scenario, tmp_path, broker)


def test_puback_mode_deletes_on_the_brokers_puback_as_before(tmp_path: Path) -> None:
    broker = ScriptedBroker(lambda seq, seen: NO_MATCHING_SUBSCRIBERS if seq == 2 else SUCCESS)

    async def scenario(device: Device) -> None:
        device.enqueue(3)
        await device.until(lambda: device.outbox() == [], "every message deleted")

        # No backend stored-acks in this mode: the broker taking it (even with nobody
        # subscribed) is the end of the device's part, as before stored-acks.
        assert broker.seqs() == [1, 2, 3]
        assert device.link.stats.delivered == 3
        assert [[name for name, _ in s] for s in broker.subscriptions] == [
            [f"galvani/v1/d/{DEVICE}/config"]
        ]

    run_linked(scenario, tmp_path, broker, DeleteOn.PUBACK)
