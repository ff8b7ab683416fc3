"""Simulated devices reproduce the catalogue's rules on demand (fake clock, no broker).

The link is built but never started, so everything stays in the outbox where the test reads
it: exactly what the device would have sent.
"""

import asyncio
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from agent_rig import DURABLE, Clock
from device_agent.agent import Identity
from device_agent.link import BrokerAddress
from device_agent.modes import DEFAULT_MODES
from device_agent.simulation import (
    REBOOT_LOOP_INTERVAL_MS,
    Habits,
    Plan,
    SimulatedDevice,
    parse_scenarios,
)
from device_agent.store import DeviceStore, open_database

MINUTE_MS = 60_000


def simulate(
    tmp_path: Path,
    minutes: float,
    *,
    scenarios: tuple[str, ...] = (),
    plan: Plan | None = None,
    habits: Habits | None = None,
    batt_pct: float | None = 80.0,
    during: Callable[[SimulatedDevice], None] | None = None,
) -> tuple[SimulatedDevice, list[tuple[str, dict[str, Any]]]]:
    """Run one simulated device for ``minutes``; what it sent, in order."""
    clock = Clock()

    async def run() -> tuple[SimulatedDevice, list[tuple[str, dict[str, Any]]]]:
        conn = open_database(tmp_path / "sim.sqlite3", durable=DURABLE)
        device = SimulatedDevice(
            Identity("sim-00001"),
            DeviceStore(conn, "sim-00001"),
            BrokerAddress("127.0.0.1", 1, "unused"),
            public_keys=(bytes(32),),
            clock_ms=clock,
            rng=random.Random(3),
            habits=habits,
            plan=plan,
            scenarios=scenarios,
            batt_pct=batt_pct,
        )
        now = clock.ms
        device.agent.boot(now)
        if plan is not None or habits is not None:
            device._next_use_ms = now  # as start() does, without connecting
        if scenarios and "reboot-loop" in scenarios:
            device._next_reboot_ms = now + REBOOT_LOOP_INTERVAL_MS
        end = now + int(minutes * MINUTE_MS)
        while clock.ms < end:
            clock.ms += device.tick()
            if during is not None:
                during(device)
        sent = [
            (m.channel, json.loads(m.payload)) for m in device.agent.store.pending(limit=10_000_000)
        ]
        conn.close()
        return device, sent

    return asyncio.run(run())


def events(sent: list[tuple[str, dict[str, Any]]], event_type: str) -> list[dict[str, Any]]:
    return [p for channel, p in sent if channel == "events" and p["type"] == event_type]


def session_samples(sent: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    return [
        s for channel, p in sent if channel == "telemetry" and p["session"] for s in p["samples"]
    ]


def test_unknown_scenarios_are_refused_by_name() -> None:
    hardware, agent = parse_scenarios(["dry-electrode", "reboot-loop"])
    assert ({str(s) for s in hardware}, {str(m) for m in agent}) == (
        {"dry-electrode"},
        {"reboot-loop"},
    )
    with pytest.raises(ValueError, match="unknown scenario 'turbo'"):
        parse_scenarios(["turbo"])


def test_reboot_loop_reboots_three_times_in_ten_minutes(tmp_path: Path) -> None:
    _, sent = simulate(tmp_path, 10, scenarios=("reboot-loop",))
    reasons = [e["reason"] for e in events(sent, "reboot")]
    assert reasons[0] == "power_on"
    assert reasons[1:].count("watchdog") >= 3


def test_dry_electrode_runs_in_the_no_gel_band_for_more_than_ten_seconds(tmp_path: Path) -> None:
    plan = Plan("LIFT", 5, 60, None)
    _, sent = simulate(tmp_path, 2, scenarios=("dry-electrode",), plan=plan)
    dry = [s for s in session_samples(sent) if s["out"] and 20_000 <= s["z_ohm"] <= 200_000]
    assert len(dry) > 100  # more than 10 s at 10 Hz
    assert all(s["i_ua"] < s["i_set_ua"] for s in dry)  # 15 V cannot push 300 µA through it


def test_report_burn_follows_each_session(tmp_path: Path) -> None:
    plan = Plan("LIFT", 5, 60, None)
    _, sent = simulate(tmp_path, 3, scenarios=("report-burn",), plan=plan)
    [end] = events(sent, "session_end")
    [report] = events(sent, "user_report")
    assert report["kind"] == "burn"
    assert report["seq"] > end["seq"]


def test_ignore_config_never_answers_a_table(tmp_path: Path) -> None:
    def push(device: SimulatedDevice) -> None:
        device._on_config(b'{"v": 1, "version": 5}')

    _, sent = simulate(tmp_path, 0.1, scenarios=("ignore-config",), during=push)
    assert all("config" not in p for channel, p in sent if channel == "state")


def test_without_the_scenario_the_same_table_is_answered(tmp_path: Path) -> None:
    def push(device: SimulatedDevice) -> None:
        device._on_config(b'{"v": 1, "version": 5}')

    _, sent = simulate(tmp_path, 0.1, during=push)
    answers = [p["config"] for channel, p in sent if channel == "state" and "config" in p]
    assert answers
    assert answers[0]["status"] == "rejected"
    assert answers[0]["reason"] == "bad_signature"


def test_unenforced_firmware_starts_below_the_battery_minimum_and_overruns_the_cap(
    tmp_path: Path,
) -> None:
    cap_s = DEFAULT_MODES["LIFT"].session_cap_s
    plan = Plan("LIFT", 5, cap_s + 60, None)
    _, sent = simulate(
        tmp_path,
        cap_s / 60 + 2,
        scenarios=("unenforced-firmware", "low-battery"),
        plan=plan,
        batt_pct=None,
    )
    [start] = events(sent, "session_start")
    first = session_samples(sent)[0]
    assert first["batt_pct"] < DEFAULT_MODES["LIFT"].min_batt_pct
    cap_end_ms = start["ts"] + 1000 * (cap_s + 30)
    overrun = [s for s in session_samples(sent) if s["out"] and s["ts"] > cap_end_ms]
    assert overrun  # session_overrun: output on 30 s past the cap


def test_the_same_device_with_enforced_firmware_refuses_to_start(tmp_path: Path) -> None:
    device, sent = simulate(
        tmp_path, 1, scenarios=("low-battery",), plan=Plan("LIFT", 5, 60, None), batt_pct=None
    )
    assert events(sent, "session_start") == []
    assert device.refusals == 1


def test_habits_start_sessions_at_about_the_weekly_rate(tmp_path: Path) -> None:
    habits = Habits(user_id="u-1", sessions_per_week=7 * 24 * 6, gel_forgotten=0.0)  # 6 an hour
    device, sent = simulate(tmp_path, 60, habits=habits)
    started = events(sent, "session_start")
    # The mode table allows at most 2 a day per device: the rest are refused, not run.
    assert len(started) == 2
    assert all(s["user"] == "u-1" for s in started)
    assert device.refusals >= 2
