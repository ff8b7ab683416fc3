"""Quiet hours in the outbox trigger (migration 0015): a notification that is not critical,
queued while the channel's local time is inside its window, waits for the window's end
(``held_until`` = ``next_attempt_at``); critical ones and those outside the window go at once.

The trigger reads the real clock, so each test places the window around the current local
time of a zone chosen for it (far from UTC where the hour allows), rather than faking time."""

from collections.abc import Callable, Iterable
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import pytest
from psycopg import errors

from tests.test_notification_outbox import Outbox, brands_and_devices

# Far from UTC first, then whole-hour zones covering every offset, so some zone always has
# the local hour a test needs.
FAR_ZONES = ("Pacific/Auckland", "America/Los_Angeles", "Asia/Kolkata", "Pacific/Honolulu")
EVERY_OFFSET = (*(f"Etc/GMT{offset:+d}" for offset in range(-14, 13) if offset), "UTC")
QUIET = "quiet_hours_start, quiet_hours_end, quiet_hours_time_zone"


@pytest.fixture
def outbox(database_url: str, rules_database_url: str, api_database_url: str) -> Outbox:
    """Brands acme and other, acme's devices of two models and one of other's."""
    return brands_and_devices(database_url, rules_database_url, api_database_url)


def local_now(zone: str) -> datetime:
    """Now in ``zone``, to the second (a time column's precision is enough for the window)."""
    return datetime.now(ZoneInfo(zone)).replace(microsecond=0)


def zone_where(wanted: Callable[[time], bool], zones: Iterable[str] = FAR_ZONES) -> str:
    """The first zone (the far ones, then any offset) whose local time now is ``wanted``."""
    for zone in (*zones, *EVERY_OFFSET):
        if wanted(local_now(zone).time()):
            return zone
    raise AssertionError("no zone has the wanted local time")


def at(zone: str, day: date, clock: time) -> datetime:
    """The instant ``day`` ``clock`` in ``zone``, in UTC."""
    return datetime.combine(day, clock, tzinfo=ZoneInfo(zone)).astimezone(UTC)


def channel(outbox: Outbox, start: time, end: time, zone: str, brand: str = "acme") -> int:
    """A webhook channel with quiet hours, made as the API's role."""
    with psycopg.connect(outbox.api) as conn:
        row = conn.execute(
            "INSERT INTO notification_channels (brand_id, name, kind, url, secret_ciphertext,"
            " quiet_hours_start, quiet_hours_end, quiet_hours_time_zone)"
            " VALUES (%s, 'night', 'webhook', 'https://hooks.example.com/x', 'sealed',"
            " %s, %s, %s) RETURNING id",
            [brand, start, end, zone],
        ).fetchone()
    assert row is not None
    return int(row[0])


def the_row(outbox: Outbox, alert_id: int, channel_id: int) -> dict[str, Any]:
    [row] = [row for row in outbox.rows(alert_id) if row["channel_id"] == channel_id]
    return row


def assert_held_until(row: dict[str, Any], until: datetime) -> None:
    assert row["held_until"] == until, (row["held_until"], until)
    assert row["next_attempt_at"] == until
    assert row["status"] == "pending"
    assert row["payload"]["held_until"] == until.strftime("%Y-%m-%dT%H:%M:%S.000000Z")


def assert_not_held(row: dict[str, Any], before: datetime) -> None:
    assert row["held_until"] is None
    assert row["payload"]["held_until"] is None
    assert before <= row["next_attempt_at"] <= datetime.now(UTC)


def test_a_warning_inside_a_window_within_the_day_waits_for_its_end(outbox: Outbox) -> None:
    zone = zone_where(lambda now: time(2) <= now < time(22))
    now = local_now(zone)
    start, end = (now - timedelta(hours=1)).time(), (now + timedelta(hours=1)).time()
    assert start < end
    held = channel(outbox, start, end, zone)
    plain = outbox.channel()
    alert_id = outbox.open_alert(severity="warning")
    assert_held_until(the_row(outbox, alert_id, held), at(zone, now.date(), end))
    assert the_row(outbox, alert_id, plain)["held_until"] is None


def test_a_window_wrapping_midnight_holds_until_the_next_days_end_before_midnight(
    outbox: Outbox,
) -> None:
    zone = zone_where(lambda now: now >= time(5))
    now = local_now(zone)
    start, end = (now - timedelta(hours=1)).time(), time(3)
    assert start > end  # wraps
    held = channel(outbox, start, end, zone)
    alert_id = outbox.open_alert(severity="info")
    assert_held_until(the_row(outbox, alert_id, held), at(zone, now.date() + timedelta(1), end))


def test_a_window_wrapping_midnight_holds_until_the_same_days_end_after_midnight(
    outbox: Outbox,
) -> None:
    zone = zone_where(lambda now: now < time(20))
    now = local_now(zone)
    start, end = time(22), (now + timedelta(hours=1)).time()
    assert start > end  # wraps
    held = channel(outbox, start, end, zone)
    alert_id = outbox.open_alert(severity="warning")
    assert_held_until(the_row(outbox, alert_id, held), at(zone, now.date(), end))


@pytest.mark.parametrize("zone", ["Pacific/Auckland", "America/Los_Angeles"])
def test_the_window_is_read_in_the_channels_zone(outbox: Outbox, zone: str) -> None:
    """An hour either side of now there, whatever the hour (wrapping midnight or not): held
    until an hour from now. The same hours read in UTC would (almost always) not hold."""
    now = local_now(zone)
    start, end = (now - timedelta(hours=1)).time(), (now + timedelta(hours=1)).time()
    held = channel(outbox, start, end, zone)
    alert_id = outbox.open_alert(severity="warning")
    day = now.date() if end > now.time() else now.date() + timedelta(1)
    until = at(zone, day, end)
    assert until - now.astimezone(UTC) == timedelta(hours=1)
    assert_held_until(the_row(outbox, alert_id, held), until)


def test_critical_is_never_held(outbox: Outbox) -> None:
    zone = "Pacific/Auckland"
    now = local_now(zone)
    start, end = (now - timedelta(hours=1)).time(), (now + timedelta(hours=1)).time()
    held = channel(outbox, start, end, zone)
    before = datetime.now(UTC)
    alert_id = outbox.open_alert(severity="critical")
    outbox.update(alert_id, "count = count + 1")
    outbox.update(alert_id, "state = 'resolved', resolved_at = now()")
    rows = [row for row in outbox.rows(alert_id) if row["channel_id"] == held]
    assert [row["transition"] for row in rows] == ["opened", "count_raised", "resolved"]
    for row in rows:
        assert_not_held(row, before)


def test_every_transition_of_a_warning_inside_the_window_is_held(outbox: Outbox) -> None:
    zone = "America/Los_Angeles"
    now = local_now(zone)
    start, end = (now - timedelta(hours=1)).time(), (now + timedelta(hours=1)).time()
    held = channel(outbox, start, end, zone)
    alert_id = outbox.open_alert(severity="warning")
    outbox.update(alert_id, "count = count + 1")
    outbox.update(alert_id, "state = 'acknowledged', acknowledged_at = now()")
    rows = [row for row in outbox.rows(alert_id) if row["channel_id"] == held]
    assert [row["transition"] for row in rows] == ["opened", "count_raised", "acknowledged"]
    [until] = {row["held_until"] for row in rows}
    assert until is not None
    assert timedelta(minutes=59) < until - datetime.now(UTC) <= timedelta(hours=1)
    for row in rows:
        assert_held_until(row, until)


@pytest.mark.parametrize(
    ("from_now", "to_now"),
    [
        (timedelta(hours=1), timedelta(hours=2)),  # later today (or just after midnight)
        (timedelta(hours=1), timedelta(hours=-1)),  # all but the two hours around now
        (timedelta(hours=-2), timedelta(minutes=-1)),  # ended a minute ago
    ],
)
def test_outside_the_window_nothing_is_held(
    outbox: Outbox, from_now: timedelta, to_now: timedelta
) -> None:
    zone = "Pacific/Auckland"
    now = local_now(zone)
    held = channel(outbox, (now + from_now).time(), (now + to_now).time(), zone)
    before = datetime.now(UTC)
    alert_id = outbox.open_alert(severity="info")
    assert_not_held(the_row(outbox, alert_id, held), before)


@pytest.mark.parametrize(
    ("columns", "values", "error"),
    [
        # A zone PostgreSQL does not know: refused, so the trigger can never fail on it.
        (QUIET, "'22:00', '07:00', 'Mars/Olympus'", errors.InvalidParameterValue),
        (QUIET, "'22:00', '22:00', 'UTC'", errors.CheckViolation),
        ("quiet_hours_start, quiet_hours_end", "'22:00', '07:00'", errors.CheckViolation),
        ("quiet_hours_time_zone", "'UTC'", errors.CheckViolation),
        ("recipients", "'{a@example.com}'", errors.CheckViolation),
    ],
)
def test_the_table_refuses_quiet_hours_and_columns_that_do_not_fit(
    outbox: Outbox, columns: str, values: str, error: type[Exception]
) -> None:
    with psycopg.connect(outbox.api) as conn, pytest.raises(error):
        conn.execute(
            "INSERT INTO notification_channels (brand_id, name, kind, url, secret_ciphertext,"  # noqa: S608
            f" {columns}) VALUES ('acme', 'x', 'webhook', 'https://h.example/', 'k', {values})"
        )


@pytest.mark.parametrize(
    ("kind", "url", "secret", "recipients"),
    [
        ("email", None, None, None),  # no recipients
        ("email", "https://h.example/", None, ["a@example.com"]),
        ("email", None, b"k", ["a@example.com"]),
        ("email", None, None, []),
        ("email", None, None, [f"a{n}@example.com" for n in range(21)]),
        ("slack", None, b"k", None),
        ("pagerduty", "https://h.example/", None, None),
        ("sms", "https://h.example/", b"k", None),
    ],
)
def test_each_kind_has_exactly_its_columns(
    outbox: Outbox, kind: str, url: str | None, secret: bytes | None, recipients: list[str] | None
) -> None:
    with psycopg.connect(outbox.api) as conn, pytest.raises(errors.CheckViolation):
        conn.execute(
            "INSERT INTO notification_channels (brand_id, name, kind, url, secret_ciphertext,"
            " recipients) VALUES ('acme', 'x', %s, %s, %s, %s)",
            [kind, url, secret, recipients],
        )


def test_the_dispatchers_lease_column_and_its_index_exist(outbox: Outbox) -> None:
    with psycopg.connect(outbox.owner) as conn:
        [(definition,)] = conn.execute(
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'notifications_leased_idx'"
        ).fetchall()
    assert "(channel_id) WHERE (leased_until IS NOT NULL)" in definition
