"""The agent's core on the physical simulator with a fake clock: no broker, no cloud.

Everything here runs with the cloud unreachable by construction (the core only writes its
outbox), which is the point of local enforcement. Pushed mode tables: test_agent_mode_tables.py.
"""

from pathlib import Path

import pytest
from agent_rig import HOUR_MS, T0, PowerLoss, Rig, lose_power_at
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from device_agent.agent import (
    CONTACT_GIVE_UP_MS,
    CONTACT_PAUSE_MS,
    HEARTBEAT_INTERVAL_MS,
    Refusal,
    SessionRefused,
)
from device_agent.modes import DEFAULT_MODES
from device_agent.simulator import Scenario
from device_agent.store import OutboxLimits


def test_boot_reports_the_reboot_and_the_state(rig: Rig) -> None:
    assert [p["type"] for p in rig.events()] == ["reboot"]
    assert rig.events()[0]["reason"] == "power_on"
    [state] = rig.states()
    assert (state["fw"], state["hw"]) == ("1.4.2", "B")


def test_session_sends_ten_samples_a_second_in_one_message_a_second(rig: Rig) -> None:
    session = rig.start(seconds=60)
    rig.run(10_000)
    batches = [p for channel, p in rig.messages() if channel == "telemetry"]
    assert len(batches) == 10
    assert all(len(p["samples"]) == 10 and p["session"] == session for p in batches)
    stamps = [s["ts"] for s in rig.samples()]
    assert stamps == list(range(T0 + 100, T0 + 10_001, 100))
    current = [s["i_ua"] for s in rig.samples()[10:]]
    assert all(abs(i - 300) < 30 for i in current), current  # level 5: LIFT's i_target_ua
    seqs = [p["seq"] for _, p in rig.messages()]
    assert seqs == sorted(set(seqs))


def test_idle_device_sends_one_heartbeat_sample_a_minute(rig: Rig) -> None:
    rig.run(5 * HEARTBEAT_INTERVAL_MS)
    samples = rig.samples()
    assert 5 <= len(samples) <= 6
    assert all(s["out"] is False and "mode" not in s for s in samples)


def test_session_is_cut_at_the_cap_without_the_cloud(rig: Rig) -> None:
    cap_s = DEFAULT_MODES["LIFT"].session_cap_s
    session = rig.start(seconds=cap_s + 600)  # the user asked for more than the cap
    rig.run(1000 * cap_s + 5_000)
    [end] = rig.events("session_end")
    assert end == {**end, "session": session, "reason": "auto_shutoff", "duration_s": cap_s}
    late = [s for s in rig.samples() if s["ts"] > T0 + 1000 * cap_s + 100 and s.get("out")]
    assert late == []
    assert rig.agent.session is None
    assert not rig.hardware.read().output_on


def test_a_locked_mode_cannot_start(rig: Rig) -> None:
    rig.agent.on_config(rig.clock.ms, rig.signed(locked_modes=["INFUSE"]))
    with pytest.raises(SessionRefused) as refused:
        rig.start("INFUSE")
    assert refused.value.reason is Refusal.LOCKED
    assert rig.events("session_start") == []
    assert not rig.hardware.read().output_on
    rig.start("LIFT")  # the others still run


def test_no_session_below_the_modes_battery_minimum(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "a.sqlite3", Ed25519PrivateKey.generate(), batt_pct=19.0)
    with pytest.raises(SessionRefused) as refused:
        rig.start()
    assert refused.value.reason is Refusal.LOW_BATTERY
    rig.conn.close()


def test_no_session_while_charging(rig: Rig) -> None:
    rig.hardware.plug_charger()
    with pytest.raises(SessionRefused) as refused:
        rig.start()
    assert refused.value.reason is Refusal.CHARGING


def test_charger_plugged_mid_session_stops_output_with_a_fault(rig: Rig) -> None:
    rig.start(seconds=300)
    rig.run(3_000)
    rig.hardware.plug_charger()
    rig.run(1_000)
    [fault] = rig.events("fault")
    assert fault["code"] == "output_while_charging"
    assert rig.events("session_end")[0]["reason"] == "fault"
    assert any(s.get("out") and s.get("charging") for s in rig.samples())  # what happened
    assert not rig.hardware.read().output_on


def test_third_session_in_24_hours_is_refused_then_allowed_a_day_later(rig: Rig) -> None:
    for _ in range(2):
        rig.start(seconds=60)
        rig.run(61_000)
        rig.hardware.lift_off()
        rig.run(10 * 60_000)
    with pytest.raises(SessionRefused) as refused:
        rig.start(seconds=60)
    assert refused.value.reason is Refusal.DAILY_LIMIT
    rig.run(24 * HOUR_MS)
    rig.start(seconds=60)


def test_cooldown_follows_a_session_over_five_minutes(rig: Rig) -> None:
    rig.start(seconds=360)
    rig.run(361_000)
    cooldown_s = DEFAULT_MODES["LIFT"].cooldown_s
    rig.run(1000 * cooldown_s - 60_000)
    with pytest.raises(SessionRefused) as refused:
        rig.start(seconds=60)
    assert refused.value.reason is Refusal.COOLDOWN
    rig.run(61_000)
    rig.start(seconds=60)


def test_lost_contact_pauses_output_and_regained_contact_resumes_it(rig: Rig) -> None:
    rig.start(seconds=300)
    rig.run(5_000)
    rig.hardware.lift_off()
    rig.run(CONTACT_PAUSE_MS + 1_000)
    assert not rig.hardware.read().output_on
    assert rig.agent.session is not None
    rig.hardware.place_on_skin(gel=True)
    rig.run(2_000)
    assert rig.hardware.read().output_on
    rig.hardware.lift_off()
    rig.run(CONTACT_PAUSE_MS + CONTACT_GIVE_UP_MS + 1_000)
    [end] = rig.events("session_end")
    assert end["reason"] == "no_contact"


def test_overcurrent_trips_output_after_it_shows_in_the_samples(tmp_path: Path) -> None:
    rig = Rig(
        tmp_path / "a.sqlite3",
        Ed25519PrivateKey.generate(),
        scenarios=[Scenario.OVERCURRENT_SPIKE],
    )
    rig.start(seconds=300)
    rig.run(60_000)
    [fault] = rig.events("fault")
    assert fault["code"] == "overcurrent"
    assert rig.events("session_end")[0]["reason"] == "fault"
    i_max = DEFAULT_MODES["LIFT"].i_max_ua
    assert any(s["i_ua"] > 1.2 * i_max for s in rig.samples() if s.get("out"))
    assert not rig.hardware.read().output_on
    rig.conn.close()


def test_boot_after_a_crash_closes_the_cut_session(rig: Rig) -> None:
    session = rig.start(seconds=300)
    rig.run(30_000)
    rig.hardware.stop_output()
    rig.agent = rig.new_agent()  # the process died; a new one starts on the same store
    rig.agent.boot(rig.clock.ms + 60_000)
    ends = rig.events("session_end")
    assert [(e["session"], e["reason"]) for e in ends] == [(session, "fault")]
    assert 29 <= ends[0]["duration_s"] <= 30
    assert rig.store.open_session() is None


def test_power_lost_as_a_session_ends_does_not_end_it_twice(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    session = rig.start(seconds=10)
    rig.run(5_000)
    lose_power_at(monkeypatch, rig.store, "session_end")
    with pytest.raises(PowerLoss):
        rig.run(10_000)
    rig.hardware.stop_output()

    rig.restart()

    assert [e["session"] for e in rig.events("session_end")] == [session]
    assert rig.store.open_session() is None


def test_seq_survives_a_restart(rig: Rig) -> None:
    rig.run(3 * HEARTBEAT_INTERVAL_MS)
    before = rig.store.last_seq()
    rig.agent = rig.new_agent()
    rig.agent.boot(rig.clock.ms)
    assert [p["seq"] for _, p in rig.messages()][-2:] == [before + 1, before + 2]


def test_unenforced_firmware_runs_past_the_cap(rig: Rig) -> None:
    rig.agent = rig.new_agent(enforce_limits=False)
    rig.start(seconds=1300)
    rig.run(1_301_000)
    [end] = rig.events("session_end")
    assert end["reason"] == "completed"
    assert end["duration_s"] == 1300


def test_an_outbox_too_small_for_the_outage_keeps_events_and_reports_the_drop(
    tmp_path: Path,
) -> None:
    rig = Rig(tmp_path / "a.sqlite3", Ed25519PrivateKey.generate(), OutboxLimits(max_bytes=20_000))
    session = rig.start(seconds=60)
    rig.run(61_000 + HEARTBEAT_INTERVAL_MS)
    assert [e["type"] for e in rig.events()] == ["reboot", "session_start", "session_end"]
    assert rig.events("session_start")[0]["session"] == session
    dropped = rig.states()[-1]["dropped"]
    assert dropped["telemetry"] == dropped["messages"] > 0
    assert dropped["events"] == 0
    assert dropped["first_seq"] >= rig.events("session_start")[0]["seq"] + 1
