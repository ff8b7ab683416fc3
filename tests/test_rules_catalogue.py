"""Every rule of the catalogue: a stream that fires it, and a near miss that does not.

The engine runs against the real database; each message is evaluated in its own
transaction, as the worker would when messages arrive one at a time.
"""

from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from services.common.signing import load_or_create_key
from services.rules.engine import Received
from tests.rules import DAY, HOUR, MINUTE, SECOND, T0, Stream, alerts, pushes, run, setup_brand

DEV = "dev-0001"


@pytest.fixture
def key(tmp_path: Path) -> Any:
    return load_or_create_key(tmp_path / "secrets")


@pytest.fixture
def device(database_url: str) -> Stream:
    setup_brand(database_url, [(DEV, "ann")], users={"ann": {"stage": "maintenance"}})
    return Stream(DEV)


def fired(url: str, rule: str) -> int:
    """How many occurrences of ``rule`` were counted (0 when no alert)."""
    return sum(a.count for a in alerts(url, rule))


def locked(url: str, device_id: str = DEV) -> list[str]:
    """The modes locked by the newest table recorded for the device ([] when none)."""
    tables = pushes(url, device_id)
    return sorted(tables[-1]["locked_modes"]) if tables else []


SAFE_LOCKS = ["INFUSE", "LIFT", "TIGHTEN"]
ALL_LOCKS = ["INFUSE", "LIFT", "SAFE", "TIGHTEN"]


# --- usage windows -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "sessions", "every_ms", "threshold", "text"),
    [
        (
            "overuse_24h",
            3,
            3 * HOUR,
            {"max_sessions_24h": 2},
            "This is the 3rd session in 24 hours",
        ),
        (
            "overuse_7d",
            6,
            25 * HOUR,
            {"max_sessions_7d": 5, "max_output_min": 120, "intro": False},
            "The user reached 6 sessions in 7 days (limit 5)",
        ),
    ],
    ids=["overuse_24h-the-third-lift-session-in-a-day", "overuse_7d-the-sixth-in-seven-days"],
)
def test_a_usage_window_fires_on_the_session_one_too_many(
    database_url: str,
    key: Any,
    device: Stream,
    rule: str,
    sessions: int,
    every_ms: int,
    threshold: dict[str, Any],
    text: str,
) -> None:
    for i in range(sessions):
        device.session(f"s{i}", T0 + i * every_ms, 300)
    run(database_url, key, device.messages)
    [alert] = alerts(database_url, rule)
    assert (alert.severity, alert.count, alert.state) == ("warning", 1, "open")
    assert alert.explanation["observed"]["sessions"] == sessions
    assert alert.explanation["threshold"] == threshold
    assert alert.explanation["text"].startswith(text)


def test_overuse_24h_counts_the_users_sessions_across_devices(database_url: str, key: Any) -> None:
    setup_brand(database_url, [("dev-a", "bo"), ("dev-b", "bo")], users={"bo": {}})
    a, b = Stream("dev-a"), Stream("dev-b")
    a.session("s0", T0, 300)
    b.session("s1", T0 + HOUR, 300)
    a.session("s2", T0 + 2 * HOUR, 300)
    run(database_url, key, a.messages + b.messages)
    [alert] = alerts(database_url, "overuse_24h")
    assert alert.device_id == "dev-a"


def test_overuse_7d_allows_seven_in_the_intro_stage_and_fires_on_the_eighth(
    database_url: str, key: Any
) -> None:
    setup_brand(database_url, [("dev-new", "cy")], users={"cy": {"stage": "intro"}})
    stream = Stream("dev-new")
    for i in range(7):
        stream.session(f"s{i}", T0 + i * 23 * HOUR, 300)
    run(database_url, key, stream.messages)
    assert fired(database_url, "overuse_7d") == 0
    stream.messages.clear()
    stream.session("s7", T0 + 7 * 23 * HOUR, 300)
    run(database_url, key, stream.messages)
    assert fired(database_url, "overuse_7d") == 1


def test_overuse_7d_fires_on_more_than_120_output_minutes(
    database_url: str, key: Any, device: Stream
) -> None:
    for i, seconds in enumerate([1500, 1500, 1500, 1500, 1201]):  # 120 min 1 s
        device.session(f"s{i}", T0 + i * 25 * HOUR, seconds)
    run(database_url, key, device.messages)
    [alert] = alerts(database_url, "overuse_7d")
    assert alert.explanation["observed"]["output_min"] == 120.0


def test_cooldown_fires_when_a_session_starts_inside_the_cooldown(
    database_url: str, key: Any, device: Stream
) -> None:
    device.session("s0", T0, 301)
    device.start("s1", T0 + 301 * SECOND + 1799 * SECOND)
    run(database_url, key, device.messages)
    [alert] = alerts(database_url, "cooldown")
    assert alert.severity == "info"
    assert alert.explanation["observed"]["gap_s"] == 1799


def test_an_end_before_its_start_counts_for_the_user_the_start_names(
    database_url: str, key: Any
) -> None:
    setup_brand(database_url, [("dev-x", None)], users={"eve": {}})
    stream = Stream("dev-x")
    start = stream.start("s0", T0, user="eve")
    stream.end("s0", T0 + 600 * SECOND, 600)
    stream.start("s1", T0 + 700 * SECOND)  # no user: the device's own windows
    stream.start("s2", T0 + 800 * SECOND, user="eve")
    stream.messages.remove(start)
    run(database_url, key, [*stream.messages, start])
    with psycopg.connect(database_url) as conn:
        keys = conn.execute(
            "SELECT key FROM alert_triggers WHERE rule = 'cooldown' ORDER BY key"
        ).fetchall()
    assert keys == [("s2",)]


# --- samples -------------------------------------------------------------------------------


def test_session_overrun_fires_30_s_past_the_cap_and_pushes_safe(
    database_url: str, key: Any, device: Stream
) -> None:
    device.start("s0", T0)
    device.samples("s0", T0 + 1225 * SECOND, 52)  # last sample at cap + 30.1 s
    run(database_url, key, device.messages)
    [alert] = alerts(database_url, "session_overrun")
    assert alert.severity == "critical"
    assert alert.explanation["text"] == (
        "The device ran 30.1 s past its 20-minute limit for LIFT; it has been switched to "
        "safe mode (mode table v1)."
    )
    assert locked(database_url) == SAFE_LOCKS


def test_session_overrun_uses_the_first_sample_when_the_start_event_is_missing(
    database_url: str, key: Any, device: Stream
) -> None:
    device.samples("s0", T0, 10)
    device.samples("s0", T0 + 1231 * SECOND, 10)
    run(database_url, key, device.messages)
    assert fired(database_url, "session_overrun") == 1


def test_no_gel_fires_after_more_than_10_s_of_dry_impedance_in_a_session(
    database_url: str, key: Any, device: Stream
) -> None:
    device.samples("s0", T0, 60, z_ohm=55_000.0)
    device.samples("s0", T0 + 30 * SECOND, 41, z_ohm=120_000.0)  # 10.1 s in total
    run(database_url, key, device.messages)
    [alert] = alerts(database_url, "no_gel")
    assert alert.explanation["observed"]["seconds"] == 10.1
    assert pushes(database_url, DEV) == []


def test_no_contact_fires_after_more_than_2_s_and_resolves_when_contact_returns(
    database_url: str, key: Any, device: Stream
) -> None:
    device.samples("s0", T0, 10)
    device.samples("s0", T0 + SECOND, 22, z_ohm=400_000.0)  # 2.1 s
    run(database_url, key, device.messages)
    [alert] = alerts(database_url, "no_contact")
    assert alert.state == "open"
    device.messages.clear()
    device.samples("s0", T0 + 4 * SECOND, 10)
    run(database_url, key, device.messages)
    [alert] = alerts(database_url, "no_contact")
    assert alert.state == "resolved"
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT resolved_by, resolution FROM alerts WHERE rule = 'no_contact'"
        ).fetchone()
    assert row is not None
    assert row[0] == "galvani-rules"
    assert str(row[1]).startswith("contact regained at ")


def test_no_contact_fires_on_current_below_a_tenth_of_setpoint(
    database_url: str, key: Any, device: Stream
) -> None:
    device.samples("s0", T0, 30, i_ua=25.0)
    run(database_url, key, device.messages)
    assert fired(database_url, "no_contact") == 1


def test_overcurrent_fires_above_1_2_times_i_max_for_more_than_200_ms(
    database_url: str, key: Any, device: Stream
) -> None:
    device.samples("s0", T0, 6)
    device.samples("s0", T0 + 600, 4, i_ua=481.0)  # LIFT i_max 400: limit 480 µA, 300 ms
    run(database_url, key, device.messages)
    [alert] = alerts(database_url, "overcurrent")
    assert alert.explanation["observed"]["duration_s"] == 0.3
    assert alert.explanation["threshold"]["i_ua"] == pytest.approx(480.0)
    assert locked(database_url) == SAFE_LOCKS


def test_overcurrent_fires_on_a_single_sample_above_1000_ua(
    database_url: str, key: Any, device: Stream
) -> None:
    device.samples("s0", T0, 1, i_ua=1000.5)
    device.samples("s0", T0 + SECOND, 1, i_ua=1000.0)
    run(database_url, key, device.messages)
    [alert] = alerts(database_url, "overcurrent")
    assert alert.count == 1


def test_a_run_split_across_messages_is_one_occurrence_whatever_the_order(
    database_url: str, key: Any, device: Stream
) -> None:
    parts = device.samples("s0", T0, 30, per_message=10, i_ua=700.0)
    run(database_url, key, [parts[2], parts[0], parts[2], parts[1]])
    [alert] = alerts(database_url, "overcurrent")
    assert alert.count == 1
    with psycopg.connect(database_url) as conn:
        spans = conn.execute(
            "SELECT variant, ended_at - started_at FROM alert_triggers"
            " WHERE rule = 'overcurrent' ORDER BY variant"
        ).fetchall()
    assert [(v, d.total_seconds()) for v, d in spans] == [("sustained", 2.9)]


def test_regulation_drift_fires_off_setpoint_for_more_than_2_s_with_impedance_in_range(
    database_url: str, key: Any, device: Stream
) -> None:
    device.samples("s0", T0, 22, i_ua=230.0)  # 23 % under 300 µA
    run(database_url, key, device.messages)
    assert fired(database_url, "regulation_drift") == 1


def test_electrode_above_39_c_for_more_than_60_s_is_a_warning(
    database_url: str, key: Any, device: Stream
) -> None:
    device.samples("s0", T0, 602, per_message=50, t_elec_c=39.5)  # 60.1 s
    run(database_url, key, device.messages)
    [alert] = alerts(database_url, "electrode_overtemp")
    assert (alert.severity, alert.count) == ("warning", 1)
    assert pushes(database_url, DEV) == []


def test_battery_rising_faster_than_1_c_per_s_fires(
    database_url: str, key: Any, device: Stream
) -> None:
    device.samples("s0", T0, 1, t_batt_c=40.0)
    device.samples("s0", T0 + 1500, 1, t_batt_c=41.8)  # 1.2 °C/s
    run(database_url, key, device.messages)
    [alert] = alerts(database_url, "battery_overtemp")
    assert alert.explanation["variant"] == "rising"


def test_output_while_charging_locks_every_mode(
    database_url: str, key: Any, device: Stream
) -> None:
    device.samples(None, T0, 5, out=False, charging=True)
    run(database_url, key, device.messages)
    assert fired(database_url, "output_while_charging") == 0
    device.samples("s0", T0 + MINUTE, 1, charging=True)
    run(database_url, key, device.messages)
    assert fired(database_url, "output_while_charging") == 1
    assert locked(database_url) == ALL_LOCKS


def test_low_battery_start_fires_below_the_modes_minimum(
    database_url: str, key: Any, device: Stream
) -> None:
    device.start("s0", T0)
    device.samples("s0", T0 + 100, 10, batt_pct=19)
    run(database_url, key, device.messages)
    [alert] = alerts(database_url, "low_battery_start")
    assert alert.explanation["observed"] == {"batt_pct": 19}


def test_reboot_loop_fires_on_three_unexpected_reboots_in_10_minutes(
    database_url: str, key: Any, device: Stream
) -> None:
    for i, reason in enumerate(["watchdog", "brownout", "panic"]):
        device.event("reboot", T0 + i * 4 * MINUTE, reason=reason)
    run(database_url, key, device.messages)
    [alert] = alerts(database_url, "reboot_loop")
    assert alert.explanation["observed"]["reasons"] == ["watchdog", "brownout", "panic"]
    assert locked(database_url) == SAFE_LOCKS


def test_contraindicated_use_locks_every_device_of_the_user(database_url: str, key: Any) -> None:
    setup_brand(
        database_url,
        [("dev-p1", "dee"), ("dev-p2", "dee"), ("dev-other", None)],
        users={"dee": {"contraindications": ["pacemaker"]}},
    )
    stream = Stream("dev-p1")
    stream.start("s0", T0)
    run(database_url, key, stream.messages)
    [alert] = alerts(database_url, "contraindicated_use")
    assert alert.severity == "critical"
    assert "pacemaker" in alert.explanation["text"]
    assert locked(database_url, "dev-p1") == ALL_LOCKS
    assert locked(database_url, "dev-p2") == ALL_LOCKS
    assert pushes(database_url, "dev-other") == []


def test_contraindicated_use_also_locks_the_device_in_use_when_registered_to_another(
    database_url: str, key: Any
) -> None:
    setup_brand(
        database_url,
        [("dev-own", "fay"), ("dev-lent", "gus")],
        users={"fay": {"contraindications": ["epilepsy"]}, "gus": {}},
    )
    stream = Stream("dev-lent")
    stream.start("s0", T0, user="fay")
    run(database_url, key, stream.messages)
    assert locked(database_url, "dev-lent") == ALL_LOCKS
    assert locked(database_url, "dev-own") == ALL_LOCKS
    [alert] = alerts(database_url, "contraindicated_use")
    assert "locked on 2 of the user's 2 device(s)" in alert.explanation["text"]


@pytest.mark.parametrize(
    ("rule", "type_", "minor", "critical", "modes"),
    [
        (
            "adverse_report",
            "user_report",
            [{"kind": "redness"}, {"kind": "discomfort"}],
            {"kind": "burn", "note": "left cheek"},
            ALL_LOCKS,
        ),
        (
            "device_fault",
            "fault",
            [{"code": "dc_offset"}],
            {"code": "overtemp_electrode", "detail": {"t_elec_c": 42.5}},
            SAFE_LOCKS,
        ),
    ],
    ids=[
        "adverse_reports_burn_is_critical_and_locks_redness_is_a_warning",
        "device_fault_severity_and_action_follow_the_code",
    ],
)
def test_a_minor_event_warns_and_a_critical_one_takes_the_rules_action(
    database_url: str,
    key: Any,
    device: Stream,
    rule: str,
    type_: str,
    minor: list[dict[str, Any]],
    critical: dict[str, Any],
    modes: list[str],
) -> None:
    for i, fields in enumerate(minor):
        device.event(type_, T0 + i * MINUTE, **fields)
    run(database_url, key, device.messages)
    [alert] = alerts(database_url, rule)
    assert (alert.severity, alert.count) == ("warning", 1)
    assert pushes(database_url, DEV) == []
    device.messages.clear()
    device.event(type_, T0 + HOUR, **critical)
    run(database_url, key, device.messages)
    [alert] = alerts(database_url, rule)
    assert (alert.severity, alert.count) == ("critical", 2)
    assert locked(database_url) == modes


def test_a_second_critical_finding_does_not_push_safe_twice(
    database_url: str, key: Any, device: Stream
) -> None:
    device.event("fault", T0, code="overcurrent")
    device.samples("s0", T0 + SECOND, 1, i_ua=1500.0)
    run(database_url, key, device.messages)
    assert len(pushes(database_url, DEV)) == 1
    [alert] = alerts(database_url, "overcurrent")
    assert "already in safe mode (mode table v1)" in alert.explanation["text"]


def test_config_rejected_fires_and_an_applied_answer_does_not(
    database_url: str, key: Any, device: Stream
) -> None:
    device.state(T0, {"version": 3, "sha256": "ab" * 32, "status": "applied"})
    device.state(
        T0 + MINUTE,
        {"version": 4, "sha256": "cd" * 32, "status": "rejected", "reason": "outside_envelope"},
    )
    run(database_url, key, device.messages)
    [alert] = alerts(database_url, "config_rejected")
    assert alert.explanation["observed"] == {"version": 4, "reason": "outside_envelope"}
    assert alert.explanation["text"].startswith("The device rejected mode table v4")


def test_unknown_devices_are_ignored(database_url: str, key: Any, device: Stream) -> None:
    ghost = Stream("ghost-001")
    ghost.event("fault", T0, code="overcurrent")
    run(database_url, key, ghost.messages)
    assert alerts(database_url) == []


# --- near misses: a stream just inside the rule's limit fires nothing and pushes nothing ---


def _sessions(*seconds_at: tuple[int, int]) -> Callable[[Stream], object]:
    """Sessions without samples, each (start time, duration in s)."""
    return lambda d: [d.session(f"s{i}", at, s) for i, (at, s) in enumerate(seconds_at)]


def _samples(*batches: tuple[int, int, dict[str, Any]]) -> Callable[[Stream], object]:
    """Samples of session s0, each batch (start time, count, fields of :meth:`Stream.samples`)."""
    return lambda d: [d.samples("s0", at, n, **f) for at, n, f in batches]


def _started(*batches: tuple[int, int, dict[str, Any]]) -> Callable[[Stream], object]:
    """A start event for s0 at T0, then samples as :func:`_samples`."""
    return lambda d: (d.start("s0", T0), _samples(*batches)(d))


def _cooldown(previous_s: int, gap_s: int) -> Callable[[Stream], object]:
    """A session of ``previous_s``, then a start ``gap_s`` after its end."""
    start_at = T0 + (previous_s + gap_s) * SECOND
    return lambda d: (d.session("s0", T0, previous_s), d.start("s1", start_at))


def _reboots(*at_reason: tuple[int, str]) -> Callable[[Stream], object]:
    return lambda d: [d.event("reboot", at, reason=reason) for at, reason in at_reason]


NEAR_MISSES: dict[str, tuple[str, Callable[[Stream], object]]] = {
    "overuse_24h-a-session-exactly-24-hours-earlier-is-outside-the-window": (
        "overuse_24h",
        _sessions((T0, 300), (T0 + 12 * HOUR, 300), (T0 + DAY, 300)),
    ),
    "overuse_7d-the-fifth-session": (
        "overuse_7d",
        _sessions(*((T0 + i * 25 * HOUR, 300) for i in range(5))),
    ),
    "overuse_7d-exactly-120-output-minutes": (
        "overuse_7d",
        _sessions(*((T0 + i * 25 * HOUR, s) for i, s in enumerate([1500] * 4 + [1200]))),
    ),
    "cooldown-over": ("cooldown", _cooldown(301, 1800)),
    "cooldown-short-session": ("cooldown", _cooldown(300, 60)),
    # Last sample at cap + 30.0 s.
    "session_overrun-exactly-30-s-past-the-cap": (
        "session_overrun",
        _started((T0 + 1225 * SECOND, 51, {})),
    ),
    "no_gel-exactly-10-s": ("no_gel", _samples((T0, 100, {"z_ohm": 55_000.0}))),
    "no_contact-exactly-2-s": ("no_contact", _samples((T0, 21, {"z_ohm": 400_000.0}))),
    "short_circuit-exactly-1-s": ("short_circuit", _samples((T0, 11, {"z_ohm": 250.0}))),
    # 200 ms above the limit, then at the limit (not above) for a second.
    "overcurrent-200-ms-and-exactly-the-limit": (
        "overcurrent",
        _samples((T0, 3, {"i_ua": 481.0}), (T0 + SECOND, 10, {"i_ua": 480.0})),
    ),
    "regulation_drift-exactly-2s": ("regulation_drift", _samples((T0, 21, {"i_ua": 230.0}))),
    "regulation_drift-within-20pct": ("regulation_drift", _samples((T0, 40, {"i_ua": 241.0}))),
    "regulation_drift-impedance-out-of-range": (
        "regulation_drift",
        _samples((T0, 40, {"i_ua": 200.0, "z_ohm": 25_000.0})),
    ),
    # 60.0 s above 39 °C, then exactly 41 °C.
    "electrode_overtemp-41-c-and-60-s-above-39-c": (
        "electrode_overtemp",
        _samples(
            (T0, 601, {"t_elec_c": 39.5, "per_message": 50}),
            (T0 + 2 * MINUTE, 5, {"t_elec_c": 41.0}),
        ),
    ),
    # Exactly 1 °C/s, exactly 60 °C, and a 0.1 °C sensor step between two 10 Hz samples.
    "battery_overtemp-60-c-and-1-c-per-s": (
        "battery_overtemp",
        _samples(
            (T0, 1, {"t_batt_c": 50.0}),
            (T0 + SECOND, 1, {"t_batt_c": 51.0}),
            (T0 + 10 * SECOND, 1, {"t_batt_c": 60.0}),
            (T0 + 20 * SECOND, 1, {"t_batt_c": 36.3}),
            (T0 + 20 * SECOND + 100, 1, {"t_batt_c": 36.4}),
        ),
    ),
    # At the minimum as the session starts, drained later in the session.
    "low_battery_start-at-the-minimum-and-later-in-the-session": (
        "low_battery_start",
        _started((T0 + 100, 10, {"batt_pct": 20}), (T0 + 5 * MINUTE, 10, {"batt_pct": 5})),
    ),
    "reboot_loop-spread-over-10-minutes-and-expected-reboots": (
        "reboot_loop",
        _reboots(
            (T0, "watchdog"),
            (T0 + 5 * MINUTE, "watchdog"),
            (T0 + 10 * MINUTE + 1, "watchdog"),
            (T0 + 11 * MINUTE, "power_on"),
            (T0 + 12 * MINUTE, "firmware_update"),
        ),
    ),
    "contraindicated_use-a-user-without-flags": (
        "contraindicated_use",
        _started(),
    ),
}


@pytest.mark.parametrize(("rule", "send"), NEAR_MISSES.values(), ids=NEAR_MISSES.keys())
def test_near_miss_does_not_fire(
    database_url: str, key: Any, device: Stream, rule: str, send: Callable[[Stream], object]
) -> None:
    send(device)
    run(database_url, key, device.messages)
    assert fired(database_url, rule) == 0
    assert pushes(database_url, DEV) == []


# --- critical conditions of samples push their action --------------------------------------

SAFE_MODE = "it has been switched to safe mode (mode table v1)"
ALL_LOCKED = "all modes have been locked (mode table v1)"


@pytest.mark.parametrize(
    ("rule", "count", "fields", "modes", "action"),
    [
        ("short_circuit", 12, {"z_ohm": 250.0}, SAFE_LOCKS, SAFE_MODE),  # more than 1 s
        ("electrode_overtemp", 1, {"t_elec_c": 41.2}, SAFE_LOCKS, SAFE_MODE),  # above 41 °C
        ("battery_overtemp", 1, {"t_batt_c": 60.5, "out": False}, ALL_LOCKS, ALL_LOCKED),
    ],
    ids=["short-circuit-over-1-s", "electrode-above-41-c", "battery-above-60-c"],
)
def test_critical_sample_conditions_push_their_action(
    database_url: str,
    key: Any,
    device: Stream,
    rule: str,
    count: int,
    fields: dict[str, Any],
    modes: list[str],
    action: str,
) -> None:
    device.samples("s0", T0, count, **fields)
    run(database_url, key, device.messages)
    [alert] = alerts(database_url, rule)
    assert alert.severity == "critical"
    assert locked(database_url) == modes
    assert alert.explanation["text"].endswith(f"; {action}.")


# --- a message that arrives last is judged with what arrived before it ---------------------


def _cooldown_stream(d: Stream) -> tuple[Received, Received]:
    """A 600 s session, then a start 100 s after its end: its start and its end."""
    start = d.start("s0", T0)
    end = d.end("s0", T0 + 600 * SECOND, 600)
    d.start("s1", T0 + 700 * SECOND)
    return start, end


def _low_battery_stream(d: Stream) -> Received:
    """A start, then samples at 12 % right after it: the start."""
    start = d.start("s0", T0)
    d.samples("s0", T0 + 100, 10, batt_pct=12)
    return start


LATE: dict[str, tuple[str, Callable[[Stream], Received]]] = {
    "cooldown_is_found_when_the_earlier_sessions_end_arrives_last": (
        "cooldown",
        lambda d: _cooldown_stream(d)[1],
    ),
    "cooldown_is_found_when_the_earlier_sessions_start_arrives_last": (
        "cooldown",
        lambda d: _cooldown_stream(d)[0],
    ),
    "low_battery_start_is_judged_when_the_start_event_arrives_after_the_samples": (
        "low_battery_start",
        _low_battery_stream,
    ),
}


@pytest.mark.parametrize(("rule", "send"), LATE.values(), ids=LATE.keys())
def test_a_message_that_arrives_last_is_judged_with_the_rest(
    database_url: str, key: Any, device: Stream, rule: str, send: Callable[[Stream], Received]
) -> None:
    last = send(device)
    device.messages.remove(last)
    run(database_url, key, [*device.messages, last])
    assert fired(database_url, rule) == 1
