"""Brand thresholds (tighten, never loosen past the envelope) and the periodic rules."""

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from services.common.migrations.grants import ServiceRole
from services.common.signing import load_or_create_key
from services.rules.catalogue import RULES, ThresholdError, check_overrides
from services.rules.context import save_overrides
from services.rules.sweeps import TRIM_BATCH, sweep, trim
from tests.roles import as_service
from tests.rules import DAY, HOUR, RECEIVED_AT, SECOND, T0, Stream, alerts, run, setup_brand

DEV = "dev-0001"
NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


@pytest.fixture
def key(tmp_path: Path) -> Any:
    return load_or_create_key(tmp_path / "secrets")


@pytest.fixture
def device(database_url: str) -> Stream:
    setup_brand(database_url, [(DEV, "ann")], users={"ann": {"stage": "maintenance"}})
    return Stream(DEV)


def test_every_rule_of_the_catalogue_is_defined_once_with_a_version() -> None:
    ids = [rule.id for rule in RULES]
    assert len(ids) == len(set(ids)) == 22
    assert all(rule.version >= 1 for rule in RULES)


@pytest.mark.parametrize(
    ("rule", "params", "limit"),
    [
        ("electrode_overtemp", {"critical_c": 42}, 41),
        ("overuse_24h", {"max_sessions": 4}, 3),
        ("overuse_7d", {"max_sessions": 11}, 10),
        ("low_battery_start", {"min_batt_pct": 10}, 15),
        ("no_contact", {"duration_s": 3}, 2),
        ("short_circuit", {"z_ohm": 200}, 300),
    ],
)
def test_loosening_past_the_limit_is_refused_naming_the_limit(
    rule: str, params: dict[str, float], limit: float
) -> None:
    with pytest.raises(ThresholdError) as refused:
        check_overrides(rule, params)
    assert refused.value.limit == limit
    assert "never loosen it past the envelope" in str(refused.value)


@pytest.mark.parametrize(
    ("rule", "params"),
    [
        ("no_such_rule", {"x": 1}),
        ("no_gel", {"no_such_threshold": 1}),
        ("no_gel", {"total_s": "5"}),
    ],
)
def test_unknown_rules_thresholds_and_non_numbers_are_refused(
    rule: str, params: dict[str, Any]
) -> None:
    with pytest.raises(ThresholdError):
        check_overrides(rule, params)


def test_a_tightened_brand_threshold_fires_where_the_default_would_not(
    database_url: str, key: Any, device: Stream
) -> None:
    with psycopg.connect(database_url) as conn:
        assert save_overrides(conn, "acme", "no_gel", {"total_s": 5}, "admin@acme") == {
            "total_s": 5.0
        }
        # Loosening within the envelope is allowed where the envelope has room.
        save_overrides(conn, "acme", "overuse_7d", {"max_sessions": 8}, "admin@acme")
    device.samples("s0", T0, 60, z_ohm=55_000.0)  # 6 s: under the default 10 s
    for i in range(7):
        device.session(f"u{i}", T0 + DAY + i * 25 * HOUR, 300)
    run(database_url, key, device.messages)
    [alert] = alerts(database_url, "no_gel")
    assert alert.explanation["text"].startswith(
        "The electrodes read 20 to 200 kΩ, dry skin with no gel, for 6 s of this session "
        "(limit 5 s)"
    )
    assert alerts(database_url, "overuse_7d") == []


def test_other_brands_keep_the_default_thresholds(database_url: str, key: Any) -> None:
    setup_brand(database_url, [("strict-1", None)], brand="strict")
    setup_brand(database_url, [("plain-1", None)], brand="plain")
    with psycopg.connect(database_url) as conn:
        save_overrides(conn, "strict", "no_gel", {"total_s": 5}, "admin@strict")
    streams = [Stream("strict-1"), Stream("plain-1")]
    for stream in streams:
        stream.samples("s0", T0, 60, z_ohm=55_000.0)
    run(database_url, key, streams[0].messages + streams[1].messages)
    assert [a.device_id for a in alerts(database_url, "no_gel")] == ["strict-1"]


def _set_presence(url: str, device_id: str, *, online: bool, since: datetime) -> None:
    with psycopg.connect(url) as conn:
        conn.execute(
            "UPDATE devices SET online = %s, presence_at = %s, last_seen = %s WHERE id = %s",
            [online, since, since, device_id],
        )
        conn.execute(
            "INSERT INTO presence_log (device_id, online, ts, received_at) VALUES (%s, %s, %s, %s)",
            [device_id, online, since, since],
        )


def _sweep(url: str, key: Any, now: datetime = NOW) -> None:
    with psycopg.connect(as_service(url, ServiceRole.RULES)) as conn, conn.transaction():
        sweep(conn, key, now)


def test_offline_fires_after_72_hours_silent_following_a_recent_session(
    database_url: str, key: Any, device: Stream
) -> None:
    recent = int((NOW - timedelta(days=4)).timestamp() * 1000)
    device.session("s0", recent, 300)
    run(database_url, key, device.messages)
    _set_presence(database_url, DEV, online=False, since=NOW - timedelta(hours=72, minutes=1))
    _sweep(database_url, key)
    _sweep(database_url, key)  # a second sweep counts nothing new
    [alert] = alerts(database_url, "offline")
    assert (alert.severity, alert.count, alert.state) == ("info", 1, "open")
    device.messages.clear()
    device.presence(True, int(NOW.timestamp() * 1000))
    run(database_url, key, device.messages)
    [alert] = alerts(database_url, "offline")
    assert alert.state == "resolved"


@pytest.mark.parametrize(
    ("silent_hours", "session_days_ago"),
    [(71.9, 1), (80, 8)],
    ids=["72h-not-reached", "no-recent-session"],
)
def test_offline_near_misses(
    database_url: str, key: Any, device: Stream, silent_hours: float, session_days_ago: int
) -> None:
    at = int((NOW - timedelta(days=session_days_ago)).timestamp() * 1000)
    device.session("s0", at, 300)
    run(database_url, key, device.messages)
    _set_presence(database_url, DEV, online=False, since=NOW - timedelta(hours=silent_hours))
    _sweep(database_url, key)
    assert alerts(database_url, "offline") == []


def _record_published_push(url: str, device_id: str, version: int, published: datetime) -> None:
    with psycopg.connect(url) as conn:
        conn.execute(
            "INSERT INTO config_pushes (device_id, version, payload, sha256, reason, source,"
            " issued_at, published_at) VALUES (%s, %s, '{}', 'x', 'test', 'api', %s, %s)",
            [device_id, version, published, published],
        )
        conn.execute(
            "UPDATE devices SET config_desired_version = %s WHERE id = %s", [version, device_id]
        )


def _unanswered_push(url: str, offline_hours: int) -> None:
    """Table v2 published 30 h ago and not answered; the device offline from an hour before
    the push until ``offline_hours`` after it, then online."""
    published = NOW - timedelta(hours=30)
    _record_published_push(url, DEV, 2, published)
    _set_presence(url, DEV, online=False, since=published - timedelta(hours=1))
    _set_presence(url, DEV, online=True, since=published + timedelta(hours=offline_hours))


def test_config_unacked_fires_after_24_hours_online_and_resolves_when_answered(
    database_url: str, key: Any, device: Stream
) -> None:
    _unanswered_push(database_url, offline_hours=5)  # 25 h online in all
    _sweep(database_url, key)
    [alert] = alerts(database_url, "config_unacked")
    assert alert.explanation["observed"] == {"version": 2, "online_hours": 25.0}
    device.state(T0, {"version": 2, "sha256": "ab" * 32, "status": "applied"})
    run(database_url, key, device.messages)
    [alert] = alerts(database_url, "config_unacked")
    assert alert.state == "resolved"


def test_config_unacked_near_miss_23_hours_online(
    database_url: str, key: Any, device: Stream
) -> None:
    _unanswered_push(database_url, offline_hours=7)  # 23 h online
    _sweep(database_url, key)
    assert alerts(database_url, "config_unacked") == []


def test_trimming_keeps_what_the_windows_need_and_drops_the_rest(
    database_url: str, key: Any, device: Stream
) -> None:
    device.samples("s0", T0, 10)
    device.session("s1", T0 + 5 * SECOND, 300)
    run(database_url, key, device.messages)

    def counts(now: datetime) -> tuple[object, object]:
        with psycopg.connect(as_service(database_url, ServiceRole.RULES)) as conn:
            while trim(conn, now) == TRIM_BATCH:
                pass
            conn.commit()
            samples = conn.execute("SELECT count(*) FROM rule_samples").fetchone()
            sessions = conn.execute("SELECT count(*) FROM rule_sessions").fetchone()
        assert samples is not None
        assert sessions is not None
        return samples[0], sessions[0]

    t0 = datetime.fromtimestamp(T0 / 1000, tz=UTC)
    # Samples live two hours from receipt (RECEIVED_AT), sessions eight days from their start.
    assert counts(RECEIVED_AT.replace(year=2026, month=11, day=2)) == (10, 1)
    assert counts(t0 + timedelta(days=7, hours=23)) == (10, 1)
    assert counts(RECEIVED_AT + timedelta(hours=1, minutes=59)) == (10, 0)
    assert counts(RECEIVED_AT + timedelta(hours=2, minutes=1)) == (0, 0)
