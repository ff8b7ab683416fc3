"""The device agent's SQLite store: seq, outbox and its limits, small state, session history.

Every test uses a real database file under tmp_path; reopening it is how a restart is shown.
"""

import itertools
import json
import logging
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from device_agent.store import (
    DROP_ORDER,
    DeviceStore,
    DropCounts,
    OutboxLimits,
    SessionRecord,
    open_database,
    total_backlog,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device_agent import outbox as outbox_module

T0 = 1_763_805_600_000
DEVICE = "dev-0001"

Opener = Callable[[], sqlite3.Connection]


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Opener]:
    """Opens the test's database file; every connection it opened is closed afterwards."""
    opened: list[sqlite3.Connection] = []

    def open_() -> sqlite3.Connection:
        opened.append(open_database(tmp_path / "agent.db"))
        return opened[-1]

    yield open_
    for conn in opened:
        conn.close()


def message(size: int) -> Callable[[int], bytes]:
    """A build() whose payload carries its seq and is exactly size bytes long."""

    def build(seq: int) -> bytes:
        body = json.dumps({"seq": seq}).encode()
        assert len(body) <= size
        return body.ljust(size)

    return build


def send(store: DeviceStore, channel: str, size: int = 100, now_ms: int = T0) -> int:
    return store.enqueue(channel, message(size), now_ms=now_ms)


def seqs(store: DeviceStore) -> list[int]:
    return [m.seq for m in store.pending(limit=1_000_000)]


# -- seq -----------------------------------------------------------------------------------


def test_seq_starts_at_one_increases_by_one_and_survives_reopen(db: Opener) -> None:
    conn = db()
    store = DeviceStore(conn, DEVICE)
    assert store.last_seq() == 0
    assert [send(store, "telemetry"), send(store, "events"), send(store, "state")] == [1, 2, 3]
    conn.close()

    store = DeviceStore(db(), DEVICE)
    assert store.last_seq() == 3
    assert send(store, "events") == 4


def test_build_receives_the_seq_it_is_given(db: Opener) -> None:
    store = DeviceStore(db(), DEVICE)
    send(store, "telemetry")
    seq = send(store, "events")
    (_, second) = store.pending()
    assert json.loads(second.payload) == {"seq": seq}


def test_a_build_that_raises_consumes_no_seq_and_leaves_no_row(db: Opener) -> None:
    store = DeviceStore(db(), DEVICE)
    send(store, "telemetry")

    def broken(seq: int) -> bytes:
        raise ValueError("invalid message")

    with pytest.raises(ValueError, match="invalid message"):
        store.enqueue("events", broken, now_ms=T0)

    assert store.last_seq() == 1
    assert store.backlog() == (1, 100)
    assert seqs(store) == [1]
    assert send(store, "events") == 2


def test_an_unknown_channel_is_refused_without_consuming_a_seq(db: Opener) -> None:
    store = DeviceStore(db(), DEVICE)
    with pytest.raises(ValueError, match="presence"):
        send(store, "presence")
    assert store.last_seq() == 0
    assert store.backlog() == (0, 0)


# -- outbox --------------------------------------------------------------------------------


def test_pending_returns_id_order_and_honours_after_id_and_limit(db: Opener) -> None:
    store = DeviceStore(db(), DEVICE)
    for channel in ["telemetry", "events", "state", "telemetry", "events"]:
        send(store, channel)

    everything = store.pending()
    ids = [m.id for m in everything]
    assert ids == sorted(ids)
    assert len(set(ids)) == 5
    assert [m.seq for m in everything] == [1, 2, 3, 4, 5]
    assert [m.channel for m in everything] == [
        "telemetry",
        "events",
        "state",
        "telemetry",
        "events",
    ]
    assert [m.retain for m in everything] == [False, False, True, False, False]
    assert [json.loads(m.payload)["seq"] for m in everything] == [1, 2, 3, 4, 5]

    assert [m.seq for m in store.pending(limit=2)] == [1, 2]
    assert [m.seq for m in store.pending(after_id=ids[1])] == [3, 4, 5]
    assert [m.seq for m in store.pending(after_id=ids[1], limit=1)] == [3]
    assert store.pending(after_id=ids[-1]) == []
    assert store.pending(limit=0) == []


def test_pending_refuses_a_negative_limit(db: Opener) -> None:
    store = DeviceStore(db(), DEVICE)
    send(store, "events")
    with pytest.raises(ValueError, match="limit"):
        store.pending(limit=-1)


def test_pending_by_id_reads_those_rows_of_this_device_only_oldest_first(
    db: Opener, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(outbox_module, "_IDS_PER_QUERY", 2)  # several queries, one answer
    conn = db()
    store, other = DeviceStore(conn, DEVICE), DeviceStore(conn, "dev-0002")
    for channel in ["telemetry", "state", "events", "telemetry", "events"]:
        send(store, channel)
    send(other, "events")
    ids = [m.id for m in store.pending()]
    [other_id] = [m.id for m in other.pending()]
    store.delete([ids[3]])

    found = store.pending_by_id(iter([ids[4], ids[1], ids[3], other_id, ids[1], ids[0]]))

    assert found == [m for m in store.pending() if m.id in {ids[0], ids[1], ids[4]}]
    assert [(m.seq, m.retain) for m in found] == [(1, False), (2, True), (5, False)]
    assert store.pending_by_id([]) == []
    assert store.kept([*ids, other_id]) == {ids[0], ids[1], ids[2], ids[4]}
    assert store.kept([]) == set()


def test_delete_removes_only_those_rows_and_ignores_unknown_ids(db: Opener) -> None:
    store = DeviceStore(db(), DEVICE)
    for size in (100, 200, 300, 400):
        send(store, "telemetry", size)
    ids = [m.id for m in store.pending()]
    assert store.backlog() == (4, 1000)

    store.delete([ids[1], ids[3], ids[3] + 1000])

    assert seqs(store) == [1, 3]
    assert store.backlog() == (2, 400)
    store.delete(iter([ids[0]]))
    store.delete([])
    assert seqs(store) == [3]
    assert store.backlog() == (1, 300)


def test_ids_are_never_reused_once_the_outbox_is_emptied(db: Opener) -> None:
    # The link asks for ids after the last one it handed to paho: a reused id would be missed.
    conn = db()
    store = DeviceStore(conn, DEVICE)
    send(store, "events")
    send(store, "events")
    last_id = store.pending()[-1].id
    store.delete(m.id for m in store.pending())
    assert store.backlog() == (0, 0)

    send(store, "events")
    assert [m.seq for m in store.pending(after_id=last_id)] == [3]
    conn.close()

    store = DeviceStore(db(), DEVICE)
    store.delete(m.id for m in store.pending())
    send(store, "events")
    assert [m.seq for m in store.pending(after_id=last_id)] == [4]


def test_the_outbox_survives_reopen(db: Opener) -> None:
    conn = db()
    store = DeviceStore(conn, DEVICE)
    send(store, "telemetry", 120)
    send(store, "state", 80)
    before = store.pending()
    conn.close()

    store = DeviceStore(db(), DEVICE)
    assert store.pending() == before
    assert store.backlog() == (2, 200)


def test_devices_in_one_database_have_independent_seqs_outboxes_and_limits(db: Opener) -> None:
    conn = db()
    small = DeviceStore(conn, "dev-small", OutboxLimits(max_bytes=250))
    large = DeviceStore(conn, "dev-large")
    for _ in range(3):
        send(small, "telemetry")
    for _ in range(5):
        send(large, "telemetry")
    send(small, "events")

    assert small.last_seq() == 4
    assert large.last_seq() == 5
    assert seqs(small) == [3, 4]
    assert seqs(large) == [1, 2, 3, 4, 5]
    assert small.dropped().messages == 2
    assert large.dropped() == DropCounts()
    assert small.backlog() == (2, 200)
    assert large.backlog() == (5, 500)

    small.delete(m.id for m in large.pending())
    assert seqs(large) == [1, 2, 3, 4, 5]
    assert large.backlog() == (5, 500)


def test_delete_stored_removes_exactly_the_seqs_in_the_ranges(db: Opener) -> None:
    store = DeviceStore(db(), DEVICE)
    for _ in range(8):
        send(store, "telemetry")
    send(store, "events", 50)

    assert store.delete_stored([(2, 3), (5, 5), (9, 1000)]) == 4

    assert seqs(store) == [1, 4, 6, 7, 8]
    assert store.backlog() == (5, 500)
    assert store.delete_stored([(2, 3), (9, 9)]) == 0  # acked again: nothing left to delete
    assert store.delete_stored([]) == 0
    assert store.backlog() == (5, 500)
    assert store.dropped() == DropCounts()


def test_delete_stored_leaves_other_devices_alone(db: Opener) -> None:
    conn = db()
    one, other = DeviceStore(conn, "dev-one"), DeviceStore(conn, "dev-other")
    for _ in range(3):
        send(one, "telemetry")
        send(other, "telemetry")

    assert one.delete_stored([(1, 3)]) == 3

    assert seqs(one) == []
    assert seqs(other) == [1, 2, 3]
    assert other.backlog() == (3, 300)


def test_delete_stored_is_a_range_scan_of_the_seq_index(db: Opener) -> None:
    # The fleet runs thousands of outboxes in one database: an ack must cost the rows it
    # deletes, not a scan of the outbox.
    conn = db()
    plan = conn.execute(
        "EXPLAIN QUERY PLAN DELETE FROM outbox WHERE device_id = ? AND seq BETWEEN ? AND ?",
        (DEVICE, 1, 2),
    ).fetchall()

    [(*_, detail)] = plan
    assert "USING COVERING INDEX" in detail or "USING INDEX" in detail
    assert "seq>? AND seq<?" in detail


def test_a_message_given_up_is_counted_and_reported_as_a_drop(db: Opener) -> None:
    store = DeviceStore(db(), DEVICE)
    send(store, "telemetry")
    send(store, "events", 40)
    send(store, "telemetry")
    [_, event, _] = store.pending()

    assert store.give_up([event.id]) == [2]
    assert store.give_up([event.id]) == []  # gone already: not counted twice

    assert seqs(store) == [1, 3]
    assert store.backlog() == (2, 200)
    assert store.dropped() == DropCounts(messages=1, events=1, first_seq=2, last_seq=2)


def test_a_transaction_keeps_all_of_its_writes_or_none(db: Opener) -> None:
    conn = db()
    store = DeviceStore(conn, DEVICE)

    def lose_power(*writes: Callable[[], object]) -> None:
        with store.transaction():
            for write in writes:
                write()
            raise RuntimeError("power lost")

    with pytest.raises(RuntimeError):
        lose_power(lambda: store.put("table", {"version": 2}), lambda: send(store, "state"))
    assert store.get("table") is None
    assert store.last_seq() == 0
    assert store.backlog() == (0, 0)

    with store.transaction():
        store.put("table", {"version": 2})
        with pytest.raises(RuntimeError):  # a nested part is undone alone
            lose_power(lambda: store.put("scratch", 1))
        send(store, "state")
    conn.close()

    store = DeviceStore(db(), DEVICE)
    assert store.get("table") == {"version": 2}
    assert store.get("scratch") is None
    assert seqs(store) == [1]


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


# -- small state ---------------------------------------------------------------------------


def test_get_and_put_round_trip_json_and_survive_reopen(db: Opener) -> None:
    conn = db()
    store = DeviceStore(conn, DEVICE)
    table = {"version": 7, "modes": {"LIFT": {"i_max_ua": 400}}, "locked_modes": ["INFUSE"]}
    assert store.get("table") is None
    store.put("table", table)
    store.put("config_seen", "ab12")
    store.put("config_seen", "cd34")
    conn.close()

    store = DeviceStore(db(), DEVICE)
    assert store.get("table") == table
    assert store.get("config_seen") == "cd34"
    assert store.get("missing") is None


def test_state_of_one_device_is_invisible_to_another(db: Opener) -> None:
    conn = db()
    DeviceStore(conn, "dev-a").put("table", {"version": 1})
    assert DeviceStore(conn, "dev-b").get("table") is None


def test_put_refuses_what_json_cannot_carry(db: Opener) -> None:
    store = DeviceStore(db(), DEVICE)
    with pytest.raises(ValueError):
        store.put("progress", {"output_s": float("nan")})
    assert store.get("progress") is None


# -- session history -----------------------------------------------------------------------

MIN_MS = 60_000


def test_sessions_are_recorded_and_ended(db: Opener) -> None:
    conn = db()
    store = DeviceStore(conn, DEVICE)
    assert store.last_session() is None
    store.record_session_start("s-1", "LIFT", T0)
    assert store.last_session() == SessionRecord("s-1", "LIFT", T0, None, 0.0)
    store.record_session_end("s-1", T0 + 5 * MIN_MS, 290.5)
    conn.close()

    store = DeviceStore(db(), DEVICE)
    assert store.last_session() == SessionRecord("s-1", "LIFT", T0, T0 + 5 * MIN_MS, 290.5)
    assert store.open_session() is None


def test_sessions_since_includes_only_sessions_started_at_or_after(db: Opener) -> None:
    store = DeviceStore(db(), DEVICE)
    for n, started in enumerate([T0, T0 + 10 * MIN_MS, T0 + 20 * MIN_MS]):
        store.record_session_start(f"s-{n}", "LIFT", started)
        store.record_session_end(f"s-{n}", started + 15 * MIN_MS, 600.0)

    # s-0 ended after the cut-off but started before it: not counted.
    since = store.sessions_since(T0 + 10 * MIN_MS)
    assert [s.session_id for s in since] == ["s-1", "s-2"]
    assert [s.session_id for s in store.sessions_since(T0)] == ["s-0", "s-1", "s-2"]
    assert store.sessions_since(T0 + 21 * MIN_MS) == []


def test_last_session_is_the_one_started_last(db: Opener) -> None:
    store = DeviceStore(db(), DEVICE)
    store.record_session_start("s-late", "TONE", T0 + MIN_MS)
    store.record_session_start("s-early", "LIFT", T0)
    last = store.last_session()
    assert last is not None
    assert last.session_id == "s-late"


def test_open_session_is_the_latest_one_never_ended(db: Opener) -> None:
    store = DeviceStore(db(), DEVICE)
    store.record_session_start("s-1", "LIFT", T0)
    store.record_session_start("s-2", "TONE", T0 + MIN_MS)
    store.record_session_start("s-3", "LIFT", T0 + 2 * MIN_MS)
    store.record_session_end("s-3", T0 + 3 * MIN_MS, 60.0)

    cut = store.open_session()
    assert cut is not None
    assert (cut.session_id, cut.ended_ms) == ("s-2", None)
    store.record_session_end("s-2", T0 + 2 * MIN_MS, 30.0)
    cut = store.open_session()
    assert cut is not None
    assert cut.session_id == "s-1"


def test_prune_sessions_forgets_those_started_before(db: Opener) -> None:
    store = DeviceStore(db(), DEVICE)
    for n in range(4):
        store.record_session_start(f"s-{n}", "LIFT", T0 + n * MIN_MS)
    store.prune_sessions(T0 + 2 * MIN_MS)
    assert [s.session_id for s in store.sessions_since(0)] == ["s-2", "s-3"]


def test_session_history_is_per_device(db: Opener) -> None:
    conn = db()
    DeviceStore(conn, "dev-a").record_session_start("s-1", "LIFT", T0)
    other = DeviceStore(conn, "dev-b")
    assert other.sessions_since(0) == []
    assert other.open_session() is None
    other.prune_sessions(T0 + MIN_MS)
    assert DeviceStore(conn, "dev-a").open_session() is not None


# -- the file ------------------------------------------------------------------------------


def test_the_database_is_in_wal_mode(db: Opener) -> None:
    conn = db()
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL: a device's flash


def test_the_fleet_simulator_database_syncs_at_checkpoints_only(tmp_path: Path) -> None:
    conn = open_database(tmp_path / "fleet.sqlite3", durable=False)
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    conn.close()


def test_a_database_from_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "agent.db"
    open_database(path).close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(RuntimeError, match="schema 99"):
        open_database(path)


def test_total_backlog_sums_every_device_in_the_database(db: Opener) -> None:
    conn = db()
    first, second = DeviceStore(conn, "dev-a"), DeviceStore(conn, "dev-b")
    send(first, "events", 100)
    send(first, "telemetry", 200)
    send(second, "state", 50)
    assert total_backlog(conn) == (3, 350)
    first.delete(m.id for m in first.pending(limit=1))
    assert total_backlog(conn) == (2, 250)
    assert (first.enqueued, second.enqueued) == (2, 1)
