"""The link sends a delivered message again on its own stored-ack timer, as TCP retransmits a
segment: when acks for later seqs show its ack was lost, or as a probe when none come at all.

The stored-ack timeouts run on a fake clock (the ``ack_timeouts`` fixture), so they fire only
when a test moves it, however slowly the machine runs the loop.
"""

from pathlib import Path

import pytest
from scripted_broker import (
    NO_MATCHING_SUBSCRIBERS,
    SUCCESS,
    Device,
    FakeClock,
    ScriptedBroker,
    run_linked,
)

from device_agent import link as link_module
from device_agent import unstored as unstored_module

pytestmark = pytest.mark.usefixtures("quick")


def test_with_no_stored_ack_at_all_only_the_oldest_message_is_sent_again_with_a_doubling_wait(
    tmp_path: Path, ack_timeouts: FakeClock
) -> None:
    """The backend silent (ingest or PostgreSQL down): one probe, not the whole outbox."""

    async def scenario(device: Device) -> None:
        await device.deliver(3)

        due = 0.0
        for probes, wait in enumerate((30, 60, 120, 240, 480, 480), start=1):
            due += wait
            await device.at(due - 0.001)
            await device.marker()
            assert device.sent(1) == probes, f"seq 1 sent again before {due} s"
            await device.at(due)
            await device.marker()
            assert device.sent(1) == 1 + probes, f"seq 1 not sent again at {due} s"
        assert [seq for seq in device.broker.seqs() if seq <= 3] == [1, 2, 3] + [1] * 6
        assert device.link.stats.resends == 6

        # An ack: the backend is back. The wait starts over at its shortest, and the next
        # probe is the oldest message still unacknowledged.
        device.broker.ack((1, 1))
        await device.until(lambda: 1 not in device.outbox(), "seq 1 deleted")
        await device.at(due + 30 - 0.001)
        await device.marker()
        assert device.sent(2) == 1
        await device.at(due + 30)
        await device.marker()
        assert device.sent(2) == 2
        assert device.sent(3) == 1

    run_linked(scenario, tmp_path, ScriptedBroker(), clock=ack_timeouts)


def test_acks_resuming_after_a_silence_bring_no_copies_of_what_the_backend_works_through(
    tmp_path: Path, ack_timeouts: FakeClock
) -> None:
    """Ingest back after an outage drains the broker's queue in order: its first acks name
    the oldest messages, and the younger ones are on their way, not lost."""

    async def scenario(device: Device) -> None:
        await device.deliver(5)
        await device.at(30)
        await device.until(lambda: device.sent(1) == 2, "the probe")

        await device.at(40)
        await device.acked((1, 1), leaving=[2, 3, 4, 5])
        await device.at(60 - 0.001)
        marker = await device.marker()

        assert device.broker.seqs() == [1, 2, 3, 4, 5, 1, marker]
        await device.acked((2, marker), leaving=[])

    run_linked(scenario, tmp_path, ScriptedBroker(), clock=ack_timeouts)


def test_a_message_whose_ack_was_lost_is_sent_again_alone_with_its_own_doubling_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ack_timeouts: FakeClock
) -> None:
    """An ingest worker killed between its commit and its publish loses that batch's acks;
    the backend goes on storing and acking the device's later messages. The unacked one must
    not wait for the next reconnect (days, for a device that stays online), nor be copied
    every 30 s while, say, a lagging worker still holds it."""
    monkeypatch.setattr(unstored_module, "ACK_TIMEOUT_MAX_S", 120.0)

    async def scenario(device: Device) -> None:
        await device.deliver(3)
        await device.acked((2, 3), leaving=[1])

        # 30 s, then 60, 120, and the cap, 120, again.
        for copies, due in enumerate((30, 90, 210, 330), start=1):
            await device.stream_to(due - 0.001)
            assert device.sent(1) == copies, f"seq 1 sent again before {due} s"
            await device.stream_to(due)
            assert device.sent(1) == 1 + copies, f"seq 1 not sent again at {due} s"

        await device.acked((1, 1), leaving=[])
        assert device.link.stats.resends == 4

    run_linked(scenario, tmp_path, ScriptedBroker(), clock=ack_timeouts)


def test_a_lost_ack_sends_again_only_the_overdue_messages_not_the_outbox(
    tmp_path: Path, ack_timeouts: FakeClock
) -> None:
    async def scenario(device: Device) -> None:
        await device.deliver(3)
        await device.acked((3, 3), leaving=[1, 2])  # 1 and 2 passed over: their acks look lost
        await device.at(10)
        await device.deliver(3)
        # now 4 and 5 too, but they were delivered at 10 s
        await device.acked((6, 6), leaving=[1, 2, 4, 5])

        before, after = await device.around(30)
        assert device.since(before) == [1, 2, after]

        # the backend answering: no probe at 40 s
        await device.acked((before, after), leaving=[1, 2, 4, 5])
        before, after = await device.around(40)
        assert device.since(before) == [4, 5, after]
        assert device.link.stats.resends == 4

    run_linked(scenario, tmp_path, ScriptedBroker(), clock=ack_timeouts)


def test_acks_out_of_order_by_moments_after_an_outage_bring_no_copies(
    tmp_path: Path, ack_timeouts: FakeClock
) -> None:
    """After an outage every message's wait is long over; two ingest workers of the share
    group draining their queues side by side ack out of order by moments. A message passed
    over gets its full wait from then, so only a worker behind by more than that is copied."""

    async def scenario(device: Device) -> None:
        await device.deliver(4)
        await device.at(30)
        await device.at(90)
        await device.until(lambda: device.sent(1) == 3, "the probes at 30 and 90 s")

        await device.at(100)
        await device.acked((4, 4), leaving=[1, 2, 3])  # one worker is first to come back
        await device.at(129.999)
        marker = await device.marker()
        assert device.broker.seqs() == [1, 2, 3, 4, 1, 1, marker]
        await device.acked((1, 3), (marker, marker), leaving=[])  # and the other

        # A worker behind by the full wait: its messages are copied.
        await device.at(130)
        device.enqueue(3)
        first = marker + 1
        await device.until(lambda: device.link.stats.delivered == 10, "three more")
        device.broker.ack((first + 2, first + 2))
        await device.until(lambda: len(device.outbox()) == 2, "the last one deleted")
        before, after = await device.around(160)
        assert device.since(first + 2) == [before, first, first + 1, after]

    run_linked(scenario, tmp_path, ScriptedBroker(), clock=ack_timeouts)


def test_more_overdue_messages_than_the_window_holds_are_each_sent_again_once(
    tmp_path: Path, ack_timeouts: FakeClock
) -> None:
    lost = link_module.PUBLISH_WINDOW + 5

    async def scenario(device: Device) -> None:
        device.enqueue(lost + 1)
        await device.until(lambda: device.link.stats.delivered == lost + 1, "delivered")
        device.broker.ack((lost + 1, lost + 1))
        await device.until(lambda: len(device.outbox()) == lost, "the last one deleted")

        await device.at(30)
        await device.until(
            lambda: all(device.sent(seq) == 2 for seq in range(1, lost + 1)), "every copy"
        )
        await device.marker()
        assert [device.sent(seq) for seq in range(1, lost + 1)] == [2] * lost
        assert device.link.stats.resends == lost

    run_linked(scenario, tmp_path, ScriptedBroker(), clock=ack_timeouts)


def test_a_copy_the_broker_refuses_is_sent_again_on_its_own_timer(
    tmp_path: Path, ack_timeouts: FakeClock
) -> None:
    # The first copy of seq 1 meets no subscriber; it is neither lost nor sent in a loop.
    broker = ScriptedBroker(
        lambda seq, seen: NO_MATCHING_SUBSCRIBERS if seq == 1 and seen == 1 else SUCCESS
    )

    async def scenario(device: Device) -> None:
        await device.deliver(2)
        await device.acked((2, 2), leaving=[1])

        await device.stream_to(30)
        assert broker.seqs(NO_MATCHING_SUBSCRIBERS) == [1]
        await device.stream_to(90 - 0.001)
        assert device.sent(1) == 2
        await device.stream_to(90)
        assert device.sent(1) == 3
        assert broker.seqs(SUCCESS).count(1) == 2

    run_linked(scenario, tmp_path, broker, clock=ack_timeouts)


def test_a_message_dropped_from_the_outbox_while_unacked_is_not_sent_again(
    tmp_path: Path, ack_timeouts: FakeClock
) -> None:
    async def scenario(device: Device) -> None:
        await device.deliver(3)
        await device.acked((3, 3), leaving=[1, 2])
        [first, _] = device.store.pending()
        device.store.give_up([first.id])  # as the outbox's byte limit would

        await device.at(30)
        marker = await device.marker()
        assert device.broker.seqs()[3:] == [2, marker]

    run_linked(scenario, tmp_path, ScriptedBroker(), clock=ack_timeouts)


def test_delivered_messages_the_outbox_dropped_are_forgotten_while_no_ack_comes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Acks that never arrive must not make the link keep every delivery of a long
    connection: what the outbox has dropped is forgotten each time the count doubles."""
    monkeypatch.setattr(unstored_module, "PRUNE_MIN", 4)

    async def scenario(device: Device) -> None:
        await device.deliver(4)
        assert device.link.awaiting_ack == 4
        device.store.give_up(m.id for m in device.store.pending() if m.seq <= 3)
        device.enqueue(3)
        await device.until(lambda: device.link.stats.delivered == 7, "seven PUBACKs")
        assert device.link.awaiting_ack == 7
        device.enqueue(1)  # the eighth: twice the count at the last check
        await device.until(lambda: device.link.stats.delivered == 8, "eight PUBACKs")

        assert device.link.awaiting_ack == 5
        assert device.outbox() == [4, 5, 6, 7, 8]

    run_linked(scenario, tmp_path, ScriptedBroker())


def test_a_link_whose_delivered_messages_wait_past_the_longest_ack_timeout_says_so(
    tmp_path: Path, ack_timeouts: FakeClock
) -> None:
    """Mosquitto 2.0 grants a filter its ACL forbids and then delivers nothing: the SUBACK
    looks fine, and only the missing acks show it."""

    async def scenario(device: Device) -> None:
        assert not device.link.acks_overdue
        await device.deliver(2)
        await device.at(480)
        assert not device.link.acks_overdue
        await device.at(480.001)
        assert device.link.acks_overdue

        await device.acked((1, 1), leaving=[2])
        assert device.link.acks_overdue  # seq 2 still waits from its first delivery
        await device.acked((2, 2), leaving=[])
        assert not device.link.acks_overdue

    run_linked(scenario, tmp_path, ScriptedBroker(), clock=ack_timeouts)
