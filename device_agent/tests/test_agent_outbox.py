"""The outbox: seq, reading, deleting and transactions (the limits: test_agent_outbox_limits.py).

Every test uses a real database file under tmp_path; reopening it is how a restart is shown.
"""

import json
from collections.abc import Callable

import pytest
from device_agent.store import DeviceStore, DropCounts, OutboxLimits
from store_helpers import DEVICE, T0, Opener, send, seqs

from device_agent import outbox as outbox_module

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
