"""The outbox's bounds: what it drops over its bytes and age, in which order, and the counts.

Every test uses a real database file under tmp_path; reopening it is how a restart is shown.
"""

import itertools
import logging

import pytest
from device_agent.store import DROP_ORDER, DeviceStore, DropCounts, OutboxLimits
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from store_helpers import DEVICE, T0, Opener, send, seqs

# -- outbox limits -------------------------------------------------------------------------


def test_over_max_bytes_telemetry_is_dropped_oldest_first_before_any_event(db: Opener) -> None:
    store = DeviceStore(db(), DEVICE, OutboxLimits(max_bytes=1000))
    channels = ["events", "telemetry", "telemetry", "events", "telemetry"]
    channels += ["state", "telemetry", "events", "telemetry", "events"]
    for channel in channels:
        send(store, channel)
    assert store.backlog() == (10, 1000)
    assert store.dropped() == DropCounts()  # exactly at the limit is within it

    new = send(store, "events", 250)

    # 250 bytes over: the three oldest telemetry messages (seq 2, 3, 5) go.
    assert seqs(store) == [1, 4, 6, 7, 8, 9, 10, new]
    assert store.backlog() == (8, 950)
    assert store.dropped() == DropCounts(messages=3, telemetry=3, first_seq=2, last_seq=5)


def test_state_is_dropped_before_events_once_telemetry_is_gone(db: Opener) -> None:
    store = DeviceStore(db(), DEVICE, OutboxLimits(max_bytes=500))
    for channel in ["events", "state", "telemetry", "state", "events"]:
        send(store, channel)

    new = send(store, "events", 250)

    assert seqs(store) == [1, 5, new]
    assert store.backlog() == (3, 450)
    assert store.dropped() == DropCounts(messages=3, telemetry=1, state=2, first_seq=2, last_seq=4)


def test_with_only_events_left_the_oldest_events_are_dropped(db: Opener) -> None:
    store = DeviceStore(db(), DEVICE, OutboxLimits(max_bytes=300))
    for _ in range(3):
        send(store, "events")

    send(store, "events", 150)

    assert seqs(store) == [3, 4]
    assert store.backlog() == (2, 250)
    assert store.dropped() == DropCounts(messages=2, events=2, first_seq=1, last_seq=2)


def test_new_telemetry_never_pushes_out_an_event(db: Opener) -> None:
    store = DeviceStore(db(), DEVICE, OutboxLimits(max_bytes=300))
    for _ in range(3):
        send(store, "events")

    # The only telemetry is the new message: it is what goes, not an older event.
    send(store, "telemetry")
    assert seqs(store) == [1, 2, 3]
    assert store.backlog() == (3, 300)
    assert store.dropped() == DropCounts(messages=1, telemetry=1, first_seq=4, last_seq=4)


def test_the_message_just_inserted_survives_when_older_ones_of_its_kind_make_room(
    db: Opener,
) -> None:
    store = DeviceStore(db(), DEVICE, OutboxLimits(max_bytes=300))
    for channel in ("telemetry", "events", "telemetry"):
        send(store, channel)

    send(store, "telemetry")
    assert seqs(store) == [2, 3, 4]
    assert store.dropped() == DropCounts(messages=1, telemetry=1, first_seq=1, last_seq=1)

    # An event of exactly max_bytes pushes out everything else, events last.
    send(store, "events", 300)
    assert seqs(store) == [5]
    assert store.backlog() == (1, 300)
    assert store.dropped() == DropCounts(messages=4, telemetry=3, events=1, first_seq=1, last_seq=4)


def test_a_message_bigger_than_max_bytes_is_dropped_and_counted(db: Opener) -> None:
    store = DeviceStore(db(), DEVICE, OutboxLimits(max_bytes=300))
    send(store, "telemetry")

    assert send(store, "events", 301) == 2

    assert seqs(store) == [1]
    assert store.backlog() == (1, 100)
    assert store.dropped() == DropCounts(messages=1, events=1, first_seq=2, last_seq=2)
    assert send(store, "events") == 3


def test_messages_older_than_max_age_are_dropped_and_counted(db: Opener) -> None:
    store = DeviceStore(db(), DEVICE, OutboxLimits(max_age_s=60.0))
    send(store, "events", now_ms=T0)
    send(store, "telemetry", now_ms=T0 + 30_000)

    send(store, "telemetry", now_ms=T0 + 60_000)  # the first is exactly max_age old: kept
    assert seqs(store) == [1, 2, 3]

    send(store, "telemetry", now_ms=T0 + 60_001)
    assert seqs(store) == [2, 3, 4]
    assert store.dropped() == DropCounts(messages=1, events=1, first_seq=1, last_seq=1)

    send(store, "state", now_ms=T0 + 200_000)
    assert seqs(store) == [5]
    assert store.backlog() == (1, 100)
    assert store.dropped() == DropCounts(messages=4, telemetry=3, events=1, first_seq=1, last_seq=4)


def test_room_freed_by_age_spares_messages_from_the_size_limit(db: Opener) -> None:
    store = DeviceStore(db(), DEVICE, OutboxLimits(max_bytes=300, max_age_s=60.0))
    send(store, "telemetry", now_ms=T0)
    send(store, "telemetry", now_ms=T0 + 30_000)
    send(store, "telemetry", now_ms=T0 + 30_000)

    send(store, "events", now_ms=T0 + 61_000)

    assert seqs(store) == [2, 3, 4]
    assert store.backlog() == (3, 300)
    assert store.dropped() == DropCounts(messages=1, telemetry=1, first_seq=1, last_seq=1)


def test_drop_counts_accumulate_and_survive_reopen(db: Opener) -> None:
    limits = OutboxLimits(max_bytes=200)
    conn = db()
    store = DeviceStore(conn, DEVICE, limits)
    for _ in range(4):
        send(store, "telemetry")
    assert store.dropped() == DropCounts(messages=2, telemetry=2, first_seq=1, last_seq=2)
    conn.close()

    store = DeviceStore(db(), DEVICE, limits)
    assert store.dropped() == DropCounts(messages=2, telemetry=2, first_seq=1, last_seq=2)
    assert store.backlog() == (2, 200)
    send(store, "state")
    assert store.dropped() == DropCounts(messages=3, telemetry=3, first_seq=1, last_seq=3)


def test_smaller_limits_after_a_restart_shrink_the_outbox_at_the_next_enqueue(
    db: Opener,
) -> None:
    conn = db()
    store = DeviceStore(conn, DEVICE)
    for _ in range(5):
        send(store, "telemetry")
    conn.close()

    store = DeviceStore(db(), DEVICE, OutboxLimits(max_bytes=250))
    send(store, "events")
    assert seqs(store) == [5, 6]
    assert store.dropped() == DropCounts(messages=4, telemetry=4, first_seq=1, last_seq=4)


def test_drops_are_logged_once_per_enqueue_with_device_and_seq_range(
    db: Opener, caplog: pytest.LogCaptureFixture
) -> None:
    store = DeviceStore(db(), DEVICE, OutboxLimits(max_bytes=300))
    for _ in range(3):
        send(store, "telemetry")
    assert caplog.records == []

    with caplog.at_level(logging.WARNING, logger="galvani.agent.store"):
        send(store, "events", 250)

    (record,) = caplog.records
    assert record.name == "galvani.agent.store"
    assert record.levelno == logging.WARNING
    text = record.getMessage()
    assert DEVICE in text
    assert "dropped 3 messages" in text
    assert "seq 1..3" in text


def test_outbox_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        OutboxLimits(max_bytes=0)
    with pytest.raises(ValueError, match="positive"):
        OutboxLimits(max_age_s=-1.0)


_counter = itertools.count()
_operation = st.one_of(
    st.tuples(
        st.sampled_from(["telemetry", "events", "state"]),
        st.integers(min_value=20, max_value=700),
        st.integers(min_value=0, max_value=40_000),
    ),
    st.just("delete-oldest"),
    st.just("give-up-oldest"),
    st.tuples(st.just("stored"), st.integers(min_value=1, max_value=45), st.integers(0, 5)),
)


# Each example uses a device of its own in the test's database, so sharing it is safe.
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(operations=st.lists(_operation, max_size=40))
def test_the_running_backlog_matches_the_outbox_and_stays_within_limits(
    db: Opener, operations: list[tuple[str, int, int] | str]
) -> None:
    limits = OutboxLimits(max_bytes=1000, max_age_s=60.0)
    store = DeviceStore(db(), f"dev-{next(_counter)}", limits)
    now_ms = T0
    sent = acked = given_up = 0
    for operation in operations:
        if operation == "delete-oldest":
            oldest = store.pending(limit=1)
            store.delete(m.id for m in oldest)
            acked += len(oldest)
            continue
        if operation == "give-up-oldest":
            given_up += len(store.give_up(m.id for m in store.pending(limit=1)))
            continue
        if operation[0] == "stored":
            _, first, width = operation
            acked += store.delete_stored([(first, first + width)])
            continue
        channel, size, step_ms = operation
        assert isinstance(channel, str)
        assert isinstance(size, int)
        assert isinstance(step_ms, int)
        now_ms += step_ms
        send(store, channel, size, now_ms)
        sent += 1

        waiting = store.pending(limit=1_000_000)
        assert store.backlog() == (len(waiting), sum(len(m.payload) for m in waiting))
        assert store.backlog()[1] <= limits.max_bytes
        if not waiting or waiting[-1].seq != sent:
            # The message just sent went only because all that is left outranks it.
            rank = DROP_ORDER.index(channel)
            assert all(DROP_ORDER.index(m.channel) > rank for m in waiting)
        assert [m.seq for m in waiting] == sorted(m.seq for m in waiting)

    dropped = store.dropped()
    assert store.last_seq() == sent
    assert store.backlog()[0] + acked + dropped.messages == sent
    assert dropped.messages >= given_up
    assert dropped.messages == dropped.telemetry + dropped.events + dropped.state
