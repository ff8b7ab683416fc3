"""The simulated hardware on a fake clock, read ten times a second as the agent reads it.

Each scenario is checked against the rule it exists to exercise (``spec/safety.md``), and
the normal device against the limits it must stay inside.
"""

import random
from collections.abc import Callable, Iterable

import pytest
from device_agent.hardware import OPEN_CIRCUIT_OHM, Output, Reading
from device_agent.simulator import Scenario, SimulatedHardware

T0_S = 1_763_805_600.0
STEP_S = 0.1
LIFT = Output(
    mode="LIFT", waveform="mono_alt", i_set_ua=300.0, v_max_v=15.0, freq_hz=10, pulse_ms=40
)
LIFT_LEVEL_10 = Output(
    mode="LIFT", waveform="mono_alt", i_set_ua=400.0, v_max_v=15.0, freq_hz=10, pulse_ms=40
)
GEL_BAND_OHM = (1_000.0, 20_000.0)
NO_GEL_BAND_OHM = (20_000.0, 200_000.0)


class Rig:
    """Simulated hardware and the fake clock that drives it, in steps of 0.1 s."""

    def __init__(self, seed: int = 7, scenarios: Iterable[Scenario] = (), **hardware: float):
        self.ticks = 0
        self.hw = SimulatedHardware(
            clock=self.now, rng=random.Random(seed), scenarios=scenarios, **hardware
        )

    def now(self) -> float:
        return T0_S + self.ticks * STEP_S

    def run(self, seconds: float) -> list[Reading]:
        """Read every 0.1 s for ``seconds``."""
        readings = []
        for _ in range(round(seconds / STEP_S)):
            self.ticks += 1
            readings.append(self.hw.read())
        return readings

    def session(self, output: Output = LIFT, *, gel: bool = True) -> None:
        self.hw.place_on_skin(gel=gel)
        self.hw.start_output(output)


def settled_session() -> Rig:
    """A rig five seconds into a LIFT session on gel: the soft start is over."""
    rig = Rig()
    rig.session()
    rig.run(5.0)
    return rig


def streaks_s(readings: list[Reading], condition: Callable[[Reading], bool]) -> list[float]:
    """How long each run of consecutive readings meeting ``condition`` lasted (first to last)."""
    streaks, count = [], 0
    for reading in [*readings, None]:
        if reading is not None and condition(reading):
            count += 1
        elif count:
            streaks.append(round((count - 1) * STEP_S, 1))
            count = 0
    return streaks


def first_s(readings: list[Reading], condition: Callable[[Reading], bool]) -> float:
    """Seconds from the start of ``readings`` to the first one meeting ``condition``."""
    return next(STEP_S * (k + 1) for k, r in enumerate(readings) if condition(r))


def in_band(z_ohm: float, band: tuple[float, float]) -> bool:
    return band[0] <= z_ohm <= band[1]


# -- the normal device ---------------------------------------------------------------------


def test_with_gel_current_rises_to_setpoint_within_a_second() -> None:
    rig = Rig()
    rig.session()
    first_second = rig.run(1.0)
    assert first_second[0].i_ua < 0.9 * LIFT.i_set_ua  # a soft start, not a step
    assert first_second[-1].i_ua == pytest.approx(LIFT.i_set_ua, rel=0.03)


@pytest.mark.parametrize("seed", range(10))
def test_with_gel_ten_minutes_of_output_stay_in_the_gel_band_at_setpoint(seed: int) -> None:
    rig = Rig(seed)
    rig.session()
    readings = rig.run(600.0)
    assert all(in_band(r.z_ohm, GEL_BAND_OHM) for r in readings)
    assert all(r.i_ua == pytest.approx(LIFT.i_set_ua, rel=0.02) for r in readings[10:])
    assert all(r.v_v == pytest.approx(r.i_ua * r.z_ohm * 1e-6) for r in readings)
    assert max(r.z_ohm for r in readings[-100:]) > max(r.z_ohm for r in readings[:100])  # drying


def test_output_off_delivers_no_current_and_no_voltage() -> None:
    rig = settled_session()
    rig.hw.stop_output()
    readings = rig.run(1.0)
    assert all(not r.output_on and r.i_ua == 0.0 and r.v_v == 0.0 for r in readings)
    assert all(in_band(r.z_ohm, GEL_BAND_OHM) for r in readings)  # contact is still measured


@pytest.mark.parametrize("seed", range(5))
def test_a_normal_twenty_minute_session_stays_under_the_temperature_limits(seed: int) -> None:
    rig = Rig(seed)
    rig.session(LIFT_LEVEL_10)
    readings = rig.run(1200.0)
    assert max(r.t_elec_c for r in readings) < 39.0  # not even the electrode warning level
    assert max(r.t_batt_c for r in readings) < 45.0
    assert readings[-1].t_elec_c > 33.0  # warmed by the skin and the output


def test_electrode_cools_toward_ambient_once_lifted_off() -> None:
    rig = Rig(ambient_c=22.0)
    rig.session()
    warm = rig.run(300.0)[-1].t_elec_c
    rig.hw.stop_output()
    rig.hw.lift_off()
    cooled = rig.run(600.0)[-1].t_elec_c
    assert warm > 33.0
    assert 22.0 < cooled < 23.0


def test_battery_drains_with_output_and_charges_on_the_charger() -> None:
    rig = Rig(batt_pct=80.0)
    rig.session()
    after_output = rig.run(600.0)[-1].batt_pct
    assert 69 <= after_output <= 70  # 1 % a minute, plus a trace of idle drain
    rig.hw.stop_output()
    rig.hw.plug_charger()
    charged = rig.run(200.0)
    assert charged[-1].charging
    assert charged[-1].batt_pct - after_output in (9, 10, 11)  # 1 % every 20 s
    assert max(r.t_batt_c for r in rig.run(3600.0)) < 45.0  # inside the Li-ion charging window
    assert rig.hw.read().batt_pct == 100


def test_a_long_clock_jump_integrates_like_many_small_steps() -> None:
    stepped, jumped = Rig(), Rig()
    for rig in (stepped, jumped):
        rig.hw.place_on_skin()
        rig.hw.plug_charger()
    stepped.run(300.0)
    jumped.ticks += 3000
    a, b = stepped.hw.read(), jumped.hw.read()
    assert a.t_elec_c == pytest.approx(b.t_elec_c, abs=1e-6)
    assert a.t_batt_c == pytest.approx(b.t_batt_c, abs=1e-6)
    assert a.batt_pct == b.batt_pct


def test_the_same_seed_and_clock_give_the_same_readings() -> None:
    def script(seed: int) -> list[Reading]:
        rig = Rig(seed, [Scenario.OVERCURRENT_SPIKE, Scenario.CONTACT_LOSS])
        rig.session()
        readings = rig.run(60.0)
        rig.hw.lift_off()
        readings += rig.run(5.0)
        rig.hw.place_on_skin(gel=False)
        readings += rig.run(20.0)
        rig.hw.stop_output()
        return readings + rig.run(5.0)

    assert script(3) == script(3)
    assert script(3) != script(4)


# -- contact -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("gel", "scenarios"),
    [(False, []), (True, [Scenario.DRY_ELECTRODE])],
    ids=["forgotten-gel", "dry-electrode-scenario"],
)
def test_a_dry_contact_reads_in_the_no_gel_band_and_cannot_reach_setpoint(
    gel: bool, scenarios: list[Scenario]
) -> None:
    rig = Rig(scenarios=scenarios)
    rig.session(gel=gel)
    readings = rig.run(60.0)
    assert all(in_band(r.z_ohm, NO_GEL_BAND_OHM) for r in readings)
    assert all(r.i_ua < 0.9 * LIFT.i_set_ua for r in readings)
    assert all(r.i_ua <= 1.03 * LIFT.v_max_v / r.z_ohm * 1e6 for r in readings)  # I = V/Z
    assert all(r.v_v == pytest.approx(LIFT.v_max_v, rel=0.03) for r in readings[10:])


def test_lifting_off_opens_the_circuit_and_regained_contact_restores_current() -> None:
    rig = settled_session()
    rig.hw.lift_off()
    lifted = rig.run(3.0)
    assert all(r.output_on and r.z_ohm == OPEN_CIRCUIT_OHM for r in lifted)
    assert all(r.i_ua < 5.0 for r in lifted)
    rig.hw.place_on_skin()
    assert rig.run(1.0)[-1].i_ua == pytest.approx(LIFT.i_set_ua, rel=0.03)


def test_contact_loss_lifts_off_for_seconds_then_regains_contact() -> None:
    rig = Rig(scenarios=[Scenario.CONTACT_LOSS])
    rig.session()
    readings = rig.run(180.0)
    lost = streaks_s(readings, lambda r: r.z_ohm >= NO_GEL_BAND_OHM[1])
    assert len(lost) >= 3
    assert all(s > 2.0 for s in lost[:-1])  # the no_contact rule's 2 s (the last may be cut)
    assert all(r.i_ua < 0.1 * LIFT.i_set_ua for r in readings if r.z_ohm >= 200_000)
    at_setpoint = streaks_s(readings, lambda r: abs(r.i_ua / LIFT.i_set_ua - 1) < 0.03)
    assert len(at_setpoint) >= len(lost)
    rig.hw.set_scenario(Scenario.CONTACT_LOSS, on=False)
    assert all(in_band(r.z_ohm, GEL_BAND_OHM) for r in rig.run(60.0))


def test_a_short_circuit_reads_below_300_ohm_with_output_on() -> None:
    rig = Rig(scenarios=[Scenario.SHORT_CIRCUIT])
    rig.hw.place_on_skin()
    assert all(in_band(r.z_ohm, GEL_BAND_OHM) for r in rig.run(1.0))
    rig.hw.start_output(LIFT)
    readings = rig.run(10.0)
    assert max(streaks_s(readings, lambda r: r.z_ohm < 300.0)) > 5.0
    assert all(r.v_v < 0.1 for r in readings if r.z_ohm < 300.0)


# -- current faults ------------------------------------------------------------------------


def test_overcurrent_spikes_repeat_above_1_2x_the_limit_for_over_200_ms() -> None:
    rig = Rig(scenarios=[Scenario.OVERCURRENT_SPIKE])
    rig.session()
    readings = rig.run(180.0)
    spikes = streaks_s(readings, lambda r: r.i_ua > 1.2 * LIFT.i_set_ua)
    assert len(spikes) >= 8
    assert all(0.2 < s < 1.0 for s in spikes)
    assert all(r.i_ua > 1.2 * 500.0 for r in readings if r.i_ua > 1.2 * LIFT.i_set_ua)
    assert any(r.i_ua > 1000.0 for r in readings)


def test_regulation_drift_holds_current_over_20_percent_off_setpoint_in_band() -> None:
    signs = set()
    for seed in range(10):
        rig = Rig(seed, [Scenario.REGULATION_DRIFT])
        rig.session()
        settled = rig.run(10.0)[10:]
        errors = [r.i_ua / LIFT.i_set_ua - 1 for r in settled]
        assert all(0.2 < abs(e) < 0.4 for e in errors)
        assert all(in_band(r.z_ohm, GEL_BAND_OHM) for r in settled)
        signs |= {e > 0 for e in errors}
    assert signs == {True, False}  # below on some units, above on others


def test_a_stuck_relay_keeps_current_flowing_after_stop_until_it_comes_free() -> None:
    rig = Rig(scenarios=[Scenario.STUCK_OUTPUT])
    rig.session()
    rig.run(2.0)
    rig.hw.stop_output()
    readings = rig.run(5.0)
    assert all(r.output_on and r.i_ua > 0.9 * LIFT.i_set_ua for r in readings)
    rig.hw.set_scenario(Scenario.STUCK_OUTPUT, on=False)
    freed = rig.hw.read()
    assert not freed.output_on
    assert freed.i_ua == 0.0


# -- temperature and battery faults --------------------------------------------------------


def test_electrode_overheat_passes_39_then_41_within_a_few_minutes() -> None:
    rig = Rig(scenarios=[Scenario.ELECTRODE_OVERHEAT])
    rig.hw.place_on_skin()
    rig.run(120.0)
    rig.hw.start_output(LIFT)
    readings = rig.run(300.0)
    above_39 = first_s(readings, lambda r: r.t_elec_c > 39.0)
    above_41 = first_s(readings, lambda r: r.t_elec_c > 41.0)
    assert above_41 < 180.0
    assert above_41 - above_39 > 60.0  # long enough for the warning before the critical


def test_battery_overheat_rises_faster_than_1_c_per_s_and_passes_60_c() -> None:
    rig = Rig(scenarios=[Scenario.BATTERY_OVERHEAT])
    rig.session()
    readings = rig.run(60.0)
    temps = [r.t_batt_c for r in readings]
    per_second = [b - a for a, b in zip(temps, temps[10:], strict=False)]
    assert max(temps[:50]) < 30.0  # normal at first
    assert max(per_second) > 1.0
    assert max(temps) > 60.0


def test_output_while_charging_plugs_the_charger_in_mid_session() -> None:
    rig = Rig(scenarios=[Scenario.OUTPUT_WHILE_CHARGING])
    rig.session()
    readings = rig.run(60.0)
    assert 29.0 < first_s(readings, lambda r: r.charging) < 31.0
    assert any(r.output_on and r.charging for r in readings)  # the hardware does not refuse


def test_low_battery_starts_nearly_empty() -> None:
    assert Rig(scenarios=[Scenario.LOW_BATTERY], batt_pct=90.0).hw.read().batt_pct == 12
    rig = Rig(batt_pct=90.0)
    assert rig.hw.read().batt_pct == 90
    rig.hw.set_scenario(Scenario.LOW_BATTERY)
    assert rig.hw.read().batt_pct == 12
    assert rig.hw.scenarios == frozenset({Scenario.LOW_BATTERY})
    rig.hw.set_scenario(Scenario.LOW_BATTERY, on=False)
    assert rig.hw.scenarios == frozenset()
