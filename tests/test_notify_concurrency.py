"""Per-channel concurrency across dispatcher processes, the lease column, and quiet-hours rows
in the dispatcher (services/notify/dispatcher.py), against the real database and the real
webhook receiver (tests/notify_receiver.py), with the dispatchers as processes of their own.

A channel's ``max_concurrency`` bounds its deliveries in flight across every dispatcher: each
claim counts the channel's rows with ``leased_until > now()`` (all processes' leases) under an
advisory lock that serialises claims."""

import json
import time
from collections.abc import Callable

import psycopg

from tests.notify_receiver import Receiver
from tests.test_notify_dispatcher import (
    Dispatcher,
    Setup,
    add_channel,
    all_settled,
    dispatchers,  # noqa: F401 (fixture)
    open_alerts,
    outbox,
    receiver,  # noqa: F401 (fixture)
    setup,  # noqa: F401 (fixture)
    wait_for,
)

NARROW = "/hooks/narrow"
WIDE = "/hooks/wide"


def serving(dispatcher: Dispatcher) -> bool:
    """Whether the process serves its metrics (it does before its first claim)."""
    try:
        dispatcher.metric("galvani_notify_in_flight")
    except OSError:
        return False
    return True


def delivered_by(dispatcher: Dispatcher) -> float:
    return dispatcher.metric('galvani_notify_deliveries_total{outcome="delivered"}')


def test_two_dispatchers_together_keep_each_channels_limit(
    setup: Setup,  # noqa: F811
    receiver: Receiver,  # noqa: F811
    dispatchers: Callable[..., Dispatcher],  # noqa: F811
) -> None:
    add_channel(setup, receiver.url_for(NARROW), max_concurrency=2)
    add_channel(setup, receiver.url_for(WIDE), max_concurrency=4)
    # Each request takes a while, so deliveries overlap. Three delivery threads each: the wide
    # channel gets more than 2 at once only from both processes together, and each process
    # alone could take both of the narrow channel's slots (with limits kept per process, the
    # two together would send it 4 at once).
    receiver.delay_s = 0.2
    first = dispatchers("notify-1", workers="3")
    second = dispatchers("notify-2", workers="3")
    wait_for(lambda: serving(first) and serving(second), 20, "both dispatchers up")
    open_alerts(setup, [f"rule-{n}" for n in range(40)])
    wait_for(all_settled(setup), 60, "every notification delivered")
    rows = outbox(setup)
    assert len(rows) == 80
    received = receiver.snapshot()
    assert {r.key for r in received} == {r["idempotency_key"] for r in rows}
    # Both processes delivered: the limit held across them, not because one did everything.
    assert delivered_by(first) > 0
    assert delivered_by(second) > 0
    assert receiver.max_in_progress[NARROW] == 2
    assert 2 < receiver.max_in_progress[WIDE] <= 4
    with psycopg.connect(setup.database_url) as conn:
        leased = conn.execute(
            "SELECT count(*) FROM notifications WHERE leased_until IS NOT NULL"
        ).fetchone()
    assert leased == (0,), "every recorded outcome clears its lease"


def test_rows_in_flight_carry_their_lease_until_their_outcome(
    setup: Setup,  # noqa: F811
    receiver: Receiver,  # noqa: F811
    dispatchers: Callable[..., Dispatcher],  # noqa: F811
) -> None:
    add_channel(setup, receiver.url, max_concurrency=3)
    receiver.delay_s = 1.0
    dispatchers(lease_s="30", request_timeout_s="5")
    open_alerts(setup, [f"rule-{n}" for n in range(6)])
    wait_for(lambda: len(receiver.snapshot()) >= 3, 20, "the first deliveries under way")
    with psycopg.connect(setup.database_url) as conn:
        leases = conn.execute(
            "SELECT extract(epoch FROM leased_until - now()),"
            " extract(epoch FROM next_attempt_at - leased_until)"
            " FROM notifications WHERE leased_until IS NOT NULL"
        ).fetchall()
    # Three in flight (the channel's limit), each leased ~30 s ahead, due again at its end.
    assert len(leases) == 3
    assert all(25 < float(str(ahead)) <= 30 for ahead, _ in leases)
    assert all(float(str(gap)) == 0 for _, gap in leases)
    wait_for(all_settled(setup), 30, "every notification delivered")


def insert_held(
    setup: Setup,  # noqa: F811
    channel: int,
    key: str,
    *,
    created_ago_s: float,
    held_s: float,
) -> None:
    """A notification written ``created_ago_s`` ago and held by quiet hours until ``held_s``
    from now (as the outbox trigger of migration 0015 writes one)."""
    payload = {"v": 1, "idempotency_key": key, "event": "test", "alert": None}
    with psycopg.connect(setup.database_url) as conn:
        conn.execute(
            "INSERT INTO notifications (channel_id, brand_id, transition, alert_change,"
            " idempotency_key, payload, created_at, held_until, next_attempt_at)"
            " VALUES (%s, 'acme', 'test', 0, %s, %s,"
            " now() - make_interval(secs => %s), now() + make_interval(secs => %s),"
            " now() + make_interval(secs => %s))",
            [channel, key, json.dumps(payload), created_ago_s, held_s, held_s],
        )


def test_held_notification_waits_for_its_window_end_and_gives_up_counted_from_it(
    setup: Setup,  # noqa: F811
    receiver: Receiver,  # noqa: F811
    dispatchers: Callable[..., Dispatcher],  # noqa: F811
) -> None:
    channel = add_channel(setup, receiver.url)
    # Written two hours ago, held until 3 s from now; give-up after an hour: counted from the
    # row's creation it would be failed at its first attempt, counted from its release not.
    insert_held(setup, channel, f"ntf_{channel}_0_test_0", created_ago_s=7200, held_s=3)
    receiver.fail_until = time.monotonic() + 4.5
    dispatchers(give_up_after_s="3600")
    started = time.monotonic()
    wait_for(lambda: receiver.answered_500 > 0, 20, "the first attempt")
    assert time.monotonic() - started >= 2.0, "a held notification waits for its release"
    wait_for(all_settled(setup), 20, "the notification delivered")
    [row] = outbox(setup)
    assert int(str(row["attempts"])) >= 2
    assert [r.key for r in receiver.snapshot()] == [f"ntf_{channel}_0_test_0"]
