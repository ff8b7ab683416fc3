"""The rules' checks as pure functions: a context and figures in, a finding (or none) out.

No database and no broker: each check gets a device context built here and the rows the store
would have read. The end-to-end behaviour of each rule is in ``test_rules_catalogue.py``.
"""

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from services.common.mode_tables import DEFAULT_MODES
from services.common.protocol.models import Fault, SessionStart, State, UserReport
from services.rules.alerts import Finding
from services.rules.catalogue import BY_ID, RULES, Action, Severity, Thresholds, load_rules
from services.rules.conditions import SampleIn, sample_mask
from services.rules.context import DeviceContext, UserInfo
from services.rules.engine import checks
from services.rules.engine.store import (
    BanRow,
    EndedRow,
    NoGelTotal,
    RebootRow,
    SessionInfo,
    StartRow,
)
from services.rules.explain import ordinal, say
from tests.rules import T0, Stream

AT = datetime(2026, 11, 2, 8, 0, tzinfo=UTC)


def context(thresholds: Thresholds | None = None, user: UserInfo | None = None) -> DeviceContext:
    """A LIFT-capable device of brand acme, registered to ann, on the factory table."""
    return DeviceContext(
        device_id="dev-1",
        brand_id="acme",
        user_id="ann",
        user=user or UserInfo(),
        table=None,
        modes=DEFAULT_MODES,
        desired_locked=frozenset(),
        desired_version=None,
        thresholds=thresholds or Thresholds(),
    )


def sample(offset_s: float, **fields: Any) -> SampleIn:
    """A LIFT sample ``offset_s`` after AT, output on, inside every limit, with its mask."""
    values: dict[str, Any] = {
        "ts": AT + timedelta(seconds=offset_s),
        "session": "s0",
        "mode": "LIFT",
        "out": True,
        "i_ua": 300.0,
        "i_set_ua": 300.0,
        "z_ohm": 8000.0,
        "t_elec_c": 33.0,
        "t_batt_c": 30.0,
        "batt_pct": 80,
        "charging": False,
    }
    values.update(fields)
    plain = SampleIn(**values)
    return SampleIn(**values, mask=sample_mask(plain, DEFAULT_MODES, Thresholds()))


def start(session: str, hours: float, duration_s: int | None = 300) -> StartRow:
    return StartRow("dev-1", session, "LIFT", AT + timedelta(hours=hours), duration_s)


def test_every_rule_has_a_sentence_and_a_grade_for_each_way_it_fires() -> None:
    for rule in RULES:
        assert rule.says.endswith("."), rule.id
        assert rule.grade().severity is rule.severity
    assert BY_ID["electrode_overtemp"].grade(minor=True).action is Action.ALERT
    with pytest.raises(ValueError, match="no minor variant"):
        BY_ID["short_circuit"].grade(minor=True)


def test_a_finding_takes_severity_and_action_from_the_catalogue() -> None:
    found = Finding("device_fault", "dev-1", AT, AT, {}, {}, "x", minor=True)
    assert (found.severity, found.action) == (Severity.WARNING, Action.ALERT)
    found = Finding("device_fault", "dev-1", AT, AT, {}, {}, "x")
    assert (found.severity, found.action) == (Severity.CRITICAL, Action.PUSH_SAFE)


def test_ordinals_and_sentences() -> None:
    assert [ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 112)] == [
        "1st",
        "2nd",
        "3rd",
        "4th",
        "11th",
        "12th",
        "13th",
        "21st",
        "112th",
    ]
    assert say("device_fault", code="dc offset") == "The device reported a dc offset fault."


def test_run_findings_report_only_runs_with_a_new_sample_and_long_enough() -> None:
    window = [sample(i / 10, i_ua=481.0) for i in range(4)]  # 300 ms above 480 µA
    [found] = checks.run_findings(context(), window, [window[-1].ts], window[0].mask)
    assert (found.rule, found.variant, found.severity) == ("overcurrent", "sustained", "critical")
    assert found.threshold["i_ua"] == pytest.approx(480.0)
    assert found.text == "The output current reached 481 µA for 0.3 s, above the 480 µA limit."
    assert checks.run_findings(context(), window[:3], [window[0].ts], window[0].mask) == []
    assert checks.run_findings(context(), window, [], window[0].mask) == []


def test_an_electrode_only_warm_for_long_is_the_minor_variant() -> None:
    window = [sample(i / 10, t_elec_c=39.5) for i in range(602)]
    [found] = checks.run_findings(context(), window, [window[0].ts], window[0].mask)
    assert (found.variant, found.severity, found.action) == ("warning", "warning", "alert")


def test_no_gel_needs_more_than_the_total_seconds() -> None:
    total = NoGelTotal(101, AT, AT + timedelta(seconds=30), 120_000.0)
    found = checks.no_gel(context(), "s0", total)
    assert found is not None
    assert found.observed["seconds"] == 10.1
    assert checks.no_gel(context(), "s0", NoGelTotal(100, AT, AT, 1.0)) is None


def test_session_overrun_counts_from_the_start_and_allows_the_grace() -> None:
    info = SessionInfo(AT, "LIFT", None, None)
    over = checks.session_overrun(context(), "s0", info, AT + timedelta(seconds=1230.1))
    assert over is not None
    assert over.text == "The device ran 30.1 s past its 20-minute limit for LIFT."
    assert checks.session_overrun(context(), "s0", info, AT + timedelta(seconds=1230)) is None
    unknown = SessionInfo(None, None, None, None)
    assert checks.session_overrun(context(), "s0", unknown, AT + timedelta(days=1)) is None


def test_low_battery_start_uses_the_mode_table_unless_the_brand_sets_it() -> None:
    info = SessionInfo(AT, "LIFT", None, None)
    assert checks.low_battery_start(context(), "s0", info, 19) is not None
    assert checks.low_battery_start(context(), "s0", info, 20) is None
    strict = Thresholds({"low_battery_start": {"min_batt_pct": 50}})
    assert checks.low_battery_start(context(strict), "s0", info, 40) is not None


def test_overuse_24h_fires_past_the_modes_daily_limit() -> None:
    day = [start("s0", 0), start("s1", 3), start("s2", 6)]
    found = checks.overuse_24h(context(), day[-1], day, "user:ann")
    assert found is not None
    assert found.text == "This is the 3rd session in 24 hours; the limit is 2 a day."
    assert checks.overuse_24h(context(), day[1], day[:2], "user:ann") is None


def test_overuse_7d_names_each_limit_passed_and_allows_more_in_the_intro_stage() -> None:
    week = [start(f"s{i}", 25 * i, 1500) for i in range(6)]
    found = checks.overuse_7d(context(), week[-1], week, "user:ann", intro=False)
    assert found is not None
    assert found.text == (
        "The user reached 6 sessions in 7 days (limit 5) and 150 output-minutes in 7 days"
        " (limit 120)."
    )
    short = [start(f"s{i}", 25 * i, 60) for i in range(6)]
    assert checks.overuse_7d(context(), short[-1], short, "user:ann", intro=True) is None


def test_cooldown_judges_the_latest_long_session_before_the_start() -> None:
    later = start("s1", 1)
    ended = [EndedRow("s0", "LIFT", later.started_at - timedelta(seconds=1799), 301)]
    found = checks.cooldown(context(), later, ended, "user:ann")
    assert found is not None
    assert found.observed["gap_s"] == 1799
    assert found.severity == "info"
    rested = [EndedRow("s0", "LIFT", later.started_at - timedelta(seconds=1800), 301)]
    assert checks.cooldown(context(), later, rested, "user:ann") is None


def test_reboot_loop_needs_count_reboots_within_the_window() -> None:
    reboots = [RebootRow(i, AT + timedelta(minutes=4 * i), "watchdog") for i in range(3)]
    [found] = checks.reboot_loops(context(), AT, reboots)
    assert found.key == "reboot:2"
    assert found.text == (
        "The device rebooted unexpectedly 3 times in 10 minutes (watchdog, watchdog, watchdog)."
    )
    spread = [RebootRow(i, AT + timedelta(minutes=5 * i, seconds=i), "panic") for i in range(3)]
    assert checks.reboot_loops(context(), AT, spread) == []


def test_event_checks_grade_by_what_the_device_reported() -> None:
    stream = Stream("dev-1")
    burn = stream.event("user_report", T0, kind="burn").message
    redness = stream.event("user_report", T0, kind="redness").message
    discomfort = stream.event("user_report", T0, kind="discomfort").message
    assert isinstance(burn, UserReport)
    assert isinstance(redness, UserReport)
    assert isinstance(discomfort, UserReport)
    found = checks.adverse_report(context(), burn)
    assert found is not None
    assert (found.severity, found.action) == ("critical", "lock_device")
    found = checks.adverse_report(context(), redness)
    assert found is not None
    assert (found.severity, found.text) == (
        "warning",
        "The user reported redness after using the device.",
    )
    assert checks.adverse_report(context(), discomfort) is None
    fault = stream.event("fault", T0, code="dc_offset").message
    assert isinstance(fault, Fault)
    assert checks.device_fault(context(), fault).severity == "warning"


def test_contraindicated_use_and_config_rejected() -> None:
    stream = Stream("dev-1")
    begun = stream.start("s0", T0).message
    assert isinstance(begun, SessionStart)
    flagged = UserInfo(contraindications=("pacemaker",))
    found = checks.contraindicated_use(context(), begun, flagged, "user:ann")
    assert found is not None
    assert found.action == "lock_user_devices"
    assert checks.contraindicated_use(context(), begun, UserInfo(), "user:ann") is None
    answer = {"version": 4, "sha256": "cd" * 32, "status": "rejected", "reason": "bad_signature"}
    rejected = stream.state(T0, answer).message
    assert isinstance(rejected, State)
    found = checks.config_rejected(context(), rejected)
    assert found is not None
    assert found.text == "The device rejected mode table v4 (bad signature)."


def test_silence_checks_use_the_brands_thresholds() -> None:
    now = AT + timedelta(days=4)
    found = checks.offline(context(), AT, AT, now)
    assert found is not None
    assert found.text.startswith("The device has been offline for 96 hours")
    assert checks.offline(context(), AT, now - timedelta(days=8), now) is None
    assert checks.config_unacked(context(), 2, AT, 25 * 3600.0, now) is not None
    assert checks.config_unacked(context(), 2, AT, 24 * 3600.0, now) is None


def test_the_catalogue_file_refuses_unknown_keys_and_values_of_the_wrong_kind() -> None:
    entry = '[x]\nversion = 1\nseverity = "info"\naction = "alert"\nsummary = "s"\nsays = "t."\n'
    param = '{ name = "p", tighter = "lower", limit = 2, unit = "s" }'
    [rule] = load_rules(f"{entry}params = [{param}]")
    assert (rule.id, rule.param("p").default, rule.param("p").limit) == ("x", None, 2)
    with pytest.raises(ValueError, match=r"catalogue x: unknown \['sevirity'\]"):
        load_rules(entry + 'sevirity = "info"\n')
    with pytest.raises(TypeError, match="is not a number"):
        load_rules(entry + 'params = [{ name = "p", tighter = "lower", limit = "2", unit = "s" }]')


def test_device_flooding_names_the_budget_and_the_messages_over_it() -> None:
    ban = BanRow(
        id=7,
        device_id="dev-1",
        banned_at=AT,
        until=AT + timedelta(seconds=30),
        messages_over_budget=1234,
        budget=2000,
        window_s=10.0,
    )
    found = checks.device_flooding(context(), ban)
    assert (found.rule, found.severity, found.action) == ("device_flooding", "warning", "alert")
    assert found.key == "ban:7"  # each ban counts once, however often the sweep sees it
    assert (found.started_at, found.ended_at) == (AT, AT + timedelta(seconds=30))
    assert found.threshold == {"budget_messages": 2000, "window_s": 10.0}
    assert found.observed == {"messages_over_budget": 1234, "ban_s": 30.0}
    assert found.text == (
        "The device sent 1234 messages past its budget of 2000 in 10 s, so the broker refused"
        " it for 30 s: its firmware may be stuck in a loop, or its credential may be in use"
        " elsewhere."
    )
    other = checks.device_flooding(context(), replace(ban, id=8))
    assert other.key != found.key


def test_certificate_expiring_fires_within_the_brands_lead_time_once_per_certificate() -> None:
    certificate = checks.CertificateRow(
        device_id="dev-1", serial=0xABC, not_after=AT + timedelta(days=30)
    )
    found = checks.certificate_expiring(context(), certificate, AT + timedelta(seconds=1))
    assert found is not None
    assert (found.rule, found.severity, found.action) == (
        "certificate_expiring",
        "warning",
        "alert",
    )
    assert found.key == f"cert:{0xABC}"  # one occurrence per certificate
    assert (found.started_at, found.ended_at) == (AT, AT + timedelta(days=30))
    assert found.threshold == {"days_before": 30}
    assert found.observed["serial"] == "abc"
    assert found.text == (
        "The device's certificate (serial abc) expires on 2026-12-02 08:00 UTC, in 30 days:"
        " issue it a new one (POST /v1/devices/<id>/certificate) or it cannot connect after"
        " that."
    )
    # A second earlier: 30 days and a second left, past the lead time.
    assert checks.certificate_expiring(context(), certificate, AT - timedelta(seconds=1)) is None
    earlier = context(Thresholds({"certificate_expiring": {"days_before": 45.0}}))
    assert checks.certificate_expiring(earlier, certificate, AT - timedelta(days=10)) is not None
    expired = checks.certificate_expiring(context(), certificate, AT + timedelta(days=31))
    assert expired is not None
    assert expired.variant == "expired"
    assert expired.text.startswith("The device's certificate (serial abc) expired on 2026-12-02")


def test_certificate_renewed_when_the_newest_expires_past_the_lead_time() -> None:
    assert checks.certificate_renewed(context(), AT + timedelta(days=31), AT)
    assert not checks.certificate_renewed(context(), AT + timedelta(days=29), AT)
    assert not checks.certificate_renewed(context(), None, AT)
