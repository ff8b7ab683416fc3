"""Simulated output stage, sensors and battery: physical enough to exercise every safety rule.

:class:`SimulatedHardware` implements :class:`~device_agent.hardware.Hardware`. Each call
integrates the physics from the previous one to ``clock()`` in closed form (first-order lags
as exact exponentials, linear battery rates), so a 0.1 s step and a one-hour jump cost the
same and neither overshoots. The figures come from ``spec/safety.md``.

Impedance
    Tissue (~0.9 kΩ) in series with the electrodes' contact. With gel the contact is 3-8 kΩ (a
    per-device baseline) and dries by 3 % a minute of contact, at most +60 %; it sways ±5 % as
    the device glides over the face and reads with ±1 % noise: 3.7-15 kΩ in any session,
    inside the 1-20 kΩ gel band. Without gel the contact is 60-150 kΩ (drawn at each
    placement), inside the 20-200 kΩ ``no_gel`` band. Lifted off, the front end reads
    :data:`~device_agent.hardware.OPEN_CIRCUIT_OHM`. Impedance is measured with or without
    output (the front end has a sense signal).
Current
    The regulator tracks the setpoint with a first-order rise (95 % in :data:`RISE_TIME_S`) and
    ±1.5 % noise, but cannot drive more than the compliance limit ``v_max_v / z`` (I = V/Z):
    15 V into a 100 kΩ dry contact gives at most 150 µA, an open circuit ~1 µA. The regulator
    follows that limit down, so regained contact ramps up again rather than stepping. The
    electrode voltage is I * Z, capped at ``v_max_v``. Output off: 0 µA and 0 V.
Temperatures
    The electrode relaxes (time constant 60 s) toward ambient off the skin and toward the skin
    (34 °C) on it, plus 1 °C of driver warmth and 1 °C per mW delivered (I * V) while output
    runs: 35-38 °C in a normal session. The battery relaxes (300 s) toward ambient, +2 °C with
    output, +8 °C on the charger: about 32 °C at most at 22 °C ambient. Temperatures read
    without noise: ±0.05 °C at 10 Hz would look like 1 °C/s, the ``battery_overtemp`` rate.
Battery
    1 % a minute of output, 4 % a day idle, +1 % every 20 s on the charger; clamped to 0-100
    and read as a whole percent, rounded down as a fuel gauge does. The hardware allows output
    while charging: preventing it is the agent's job.

Each :class:`Scenario` is one hardware fault, described where it is declared. The random
draws (per device, per placement, per output start, noise per read) all come from the ``rng``
given, so a seed and a sequence of clock values reproduce the same readings.
"""

import math
import random
from collections.abc import Callable, Iterable
from enum import StrEnum
from typing import Final

from device_agent.hardware import OPEN_CIRCUIT_OHM, Output, Reading


class Scenario(StrEnum):
    """A hardware misbehaviour that support teams and tests switch on per device."""

    DRY_ELECTRODE = "dry-electrode"  # no gel whatever the user does: 60-150 kΩ contact
    CONTACT_LOSS = "contact-loss"  # lifted off for 3-8 s after every 10-30 s on the skin
    OVERCURRENT_SPIKE = "overcurrent-spike"  # 650-1300 µA for 0.5 s every 5-15 s of output
    REGULATION_DRIFT = "regulation-drift"  # gain error: settles 30 % below or above setpoint
    ELECTRODE_OVERHEAT = "electrode-overheat"  # heats toward 42 °C while output runs
    BATTERY_OVERHEAT = "battery-overheat"  # ~1.5 °C/s from 10 s of output, up to 95 °C
    SHORT_CIRCUIT = "short-circuit"  # 50-250 Ω from 2 s of output
    STUCK_OUTPUT = "stuck-output"  # stop_output() does not stop the output
    OUTPUT_WHILE_CHARGING = "output-while-charging"  # charger plugged after 30 s of output
    LOW_BATTERY = "low-battery"  # battery at 12 % at most when switched on


# Impedance.
TISSUE_OHM: Final = 900.0
GEL_CONTACT_OHM_RANGE: Final = (3_000.0, 8_000.0)
GEL_DRYING_PER_S: Final = 0.03 / 60  # fraction of the contact impedance
GEL_DRYING_MAX: Final = 0.6
DRY_CONTACT_OHM_RANGE: Final = (60_000.0, 150_000.0)
GLIDE_SWAY: Final = 0.05  # fraction of the contact impedance
GLIDE_PERIOD_S: Final = 20.0
Z_NOISE: Final = 0.01  # fraction, uniform
# Current.
RISE_TIME_S: Final = 0.3  # to 95 % of setpoint: three time constants
I_NOISE: Final = 0.015  # fraction, uniform
# Temperatures.
SKIN_C: Final = 34.0
ELECTRODE_TAU_S: Final = 60.0
DRIVER_WARMING_C: Final = 1.0
ELECTRODE_C_PER_MW: Final = 1.0
BATTERY_TAU_S: Final = 300.0
BATTERY_OUTPUT_RISE_C: Final = 2.0
BATTERY_CHARGING_RISE_C: Final = 8.0
# Battery.
OUTPUT_DRAIN_PCT_PER_S: Final = 1 / 60
IDLE_DRAIN_PCT_PER_S: Final = 4 / 86_400
CHARGE_PCT_PER_S: Final = 1 / 20
# Scenarios.
CONTACT_HELD_S_RANGE: Final = (10.0, 30.0)
CONTACT_LOST_S_RANGE: Final = (3.0, 8.0)  # past the agent's 3 s pause and the rule's 2 s
SPIKE_FIRST_S_RANGE: Final = (2.0, 8.0)  # of output
SPIKE_INTERVAL_S_RANGE: Final = (5.0, 15.0)
SPIKE_DURATION_S: Final = 0.5
# Above 1.2 x the envelope's largest i_max_ua (500 µA) always; above 1000 µA about half the time.
SPIKE_PEAK_UA_RANGE: Final = (650.0, 1300.0)
DRIFT_GAIN_ERROR: Final = 0.3
# An equilibrium just above 41 °C: the electrode spends over a minute between 39 and 41 °C
# (60 s * ln 3), so both the warning and the critical electrode_overtemp rules fire.
OVERHEAT_ELECTRODE_C: Final = 42.0
RUNAWAY_C_PER_S: Final = 1.5
RUNAWAY_ONSET_S: Final = 10.0  # of output
RUNAWAY_MAX_C: Final = 95.0
SHORT_OHM_RANGE: Final = (50.0, 250.0)
SHORT_ONSET_S: Final = 2.0  # of output
CHARGER_PLUGGED_AFTER_S: Final = 30.0  # of output
LOW_BATTERY_PCT: Final = 12.0

_RISE_TAU_S: Final = RISE_TIME_S / 3


class SimulatedHardware:
    """A device's output stage, sensors and battery, simulated; see the module docstring."""

    __slots__ = (
        "_ambient_c",
        "_batt_pct",
        "_charger_fault",
        "_charger_fault_done",
        "_charging",
        "_clock",
        "_contact_change_at",
        "_contact_loss",
        "_contact_lost",
        "_drift",
        "_drift_gain",
        "_dry",
        "_dry_contact_ohm",
        "_elec_overheat",
        "_gel",
        "_gel_contact_ohm",
        "_i_reg_ua",
        "_i_ua",
        "_on_s",
        "_on_skin",
        "_output",
        "_placed_at",
        "_rng",
        "_runaway",
        "_scenarios",
        "_short",
        "_short_ohm",
        "_spike_at_s",
        "_spike_peak_ua",
        "_spikes",
        "_stop_requested",
        "_stuck",
        "_t",
        "_t_batt_c",
        "_t_elec_c",
        "_z_ohm",
    )

    def __init__(
        self,
        *,
        clock: Callable[[], float],
        rng: random.Random,
        scenarios: Iterable[Scenario] = (),
        batt_pct: float = 80.0,
        ambient_c: float = 22.0,
    ) -> None:
        self._clock = clock
        self._rng = rng
        self._ambient_c = ambient_c
        self._t = clock()
        # This unit's parts, drawn once.
        self._gel_contact_ohm = rng.uniform(*GEL_CONTACT_OHM_RANGE)
        self._short_ohm = rng.uniform(*SHORT_OHM_RANGE)
        self._drift_gain = 1.0 + (DRIFT_GAIN_ERROR if rng.random() < 0.5 else -DRIFT_GAIN_ERROR)
        # The world around it.
        self._on_skin = False
        self._gel = False
        self._placed_at = self._t
        self._dry_contact_ohm = DRY_CONTACT_OHM_RANGE[0]
        self._contact_lost = False
        self._contact_change_at = math.inf
        self._charging = False
        # The output stage; _on_s is output time since the last start from off.
        self._output: Output | None = None
        self._stop_requested = False
        self._on_s = 0.0
        self._i_reg_ua = 0.0
        self._spike_at_s = math.inf
        self._spike_peak_ua = 0.0
        self._charger_fault_done = False
        # Physical state, noise-free.
        self._z_ohm = OPEN_CIRCUIT_OHM
        self._i_ua = 0.0
        self._t_elec_c = ambient_c
        self._t_batt_c = ambient_c
        self._batt_pct = min(max(batt_pct, 0.0), 100.0)
        self._scenarios: frozenset[Scenario] = frozenset()
        self._set_flags()
        for scenario in scenarios:
            self.set_scenario(scenario)

    # -- the Hardware protocol --------------------------------------------------------------

    def read(self) -> Reading:
        """Measure everything now."""
        self._advance(self._clock())
        output = self._output
        z = self._z_ohm
        if z < OPEN_CIRCUIT_OHM:
            z *= 1.0 + Z_NOISE * (2.0 * self._rng.random() - 1.0)
        if output is None:
            i = v = 0.0
        else:
            i = self._i_ua * (1.0 + I_NOISE * (2.0 * self._rng.random() - 1.0))
            v = i * z * 1e-6
            if v > output.v_max_v:
                v = output.v_max_v
        return Reading(
            output_on=output is not None,
            i_ua=i,
            v_v=v,
            z_ohm=z,
            t_elec_c=self._t_elec_c,
            t_batt_c=self._t_batt_c,
            batt_pct=int(self._batt_pct),
            charging=self._charging,
        )

    def start_output(self, output: Output) -> None:
        """Deliver ``output`` until :meth:`stop_output` (or change the running output)."""
        self._advance(self._clock())
        if self._output is None:
            self._on_s = 0.0
            self._i_reg_ua = 0.0
            self._spike_at_s = self._rng.uniform(*SPIKE_FIRST_S_RANGE)
            self._spike_peak_ua = self._rng.uniform(*SPIKE_PEAK_UA_RANGE)
            self._charger_fault_done = False
        self._output = output
        self._stop_requested = False

    def stop_output(self) -> None:
        """Stop delivering current, unless the relay is stuck (then only remember the request)."""
        self._advance(self._clock())
        if self._stuck and self._output is not None:
            self._stop_requested = True
        else:
            self._cut()

    # -- the simulated world -----------------------------------------------------------------

    def place_on_skin(self, *, gel: bool = True) -> None:
        """Put the electrodes on the skin, with fresh gel or dry."""
        now = self._clock()
        self._advance(now)
        self._on_skin = True
        self._gel = gel
        self._placed_at = now
        self._dry_contact_ohm = self._rng.uniform(*DRY_CONTACT_OHM_RANGE)
        self._contact_lost = False
        self._contact_change_at = now + self._rng.uniform(*CONTACT_HELD_S_RANGE)

    def lift_off(self) -> None:
        """Take the electrodes off the skin: an open circuit."""
        self._advance(self._clock())
        self._on_skin = False

    def plug_charger(self) -> None:
        """Plug the charger in."""
        self._advance(self._clock())
        self._charging = True

    def unplug_charger(self) -> None:
        """Unplug the charger."""
        self._advance(self._clock())
        self._charging = False

    @property
    def scenarios(self) -> frozenset[Scenario]:
        """The misbehaviours switched on."""
        return self._scenarios

    def set_scenario(self, scenario: Scenario, on: bool = True) -> None:
        """Switch one misbehaviour on or off, from now."""
        self._advance(self._clock())
        if on:
            self._scenarios = self._scenarios | {scenario}
        else:
            self._scenarios = self._scenarios - {scenario}
        self._set_flags()
        if scenario is Scenario.LOW_BATTERY and on:
            self._batt_pct = min(self._batt_pct, LOW_BATTERY_PCT)
        elif scenario is Scenario.CONTACT_LOSS and not on:
            self._contact_lost = False
        elif scenario is Scenario.STUCK_OUTPUT and not on and self._stop_requested:
            self._cut()  # the relay comes free and obeys the stop it was given

    # -- physics -----------------------------------------------------------------------------

    def _set_flags(self) -> None:
        # Plain attributes: a set lookup per scenario per read would cost more than the physics.
        scenarios = self._scenarios
        self._dry = Scenario.DRY_ELECTRODE in scenarios
        self._contact_loss = Scenario.CONTACT_LOSS in scenarios
        self._spikes = Scenario.OVERCURRENT_SPIKE in scenarios
        self._drift = Scenario.REGULATION_DRIFT in scenarios
        self._elec_overheat = Scenario.ELECTRODE_OVERHEAT in scenarios
        self._runaway = Scenario.BATTERY_OVERHEAT in scenarios
        self._short = Scenario.SHORT_CIRCUIT in scenarios
        self._stuck = Scenario.STUCK_OUTPUT in scenarios
        self._charger_fault = Scenario.OUTPUT_WHILE_CHARGING in scenarios

    def _cut(self) -> None:
        self._output = None
        self._stop_requested = False
        self._i_reg_ua = self._i_ua = 0.0

    def _advance(self, now: float) -> None:
        """Integrate everything from the last update to ``now``, under the current inputs."""
        # The hot path of thousands of simulated devices: conditionals rather than min() and
        # max(), which cost ten times as much in CPython.
        dt = now - self._t
        if dt > 0.0:
            self._t = now
        else:  # no time passed, but a change of contact or output shows at once
            dt = 0.0

        if self._contact_loss and self._on_skin and now >= self._contact_change_at:
            self._contact_lost = not self._contact_lost
            span = CONTACT_LOST_S_RANGE if self._contact_lost else CONTACT_HELD_S_RANGE
            self._contact_change_at = now + self._rng.uniform(*span)
        touching = self._on_skin and not self._contact_lost
        if touching:
            since = now - self._placed_at
            if self._gel and not self._dry:
                drying = since * GEL_DRYING_PER_S
                contact = self._gel_contact_ohm * (
                    1.0 + (drying if drying < GEL_DRYING_MAX else GEL_DRYING_MAX)
                )
            else:
                contact = self._dry_contact_ohm
            sway = 1.0 + GLIDE_SWAY * math.sin(math.tau * since / GLIDE_PERIOD_S)
            z = TISSUE_OHM + contact * sway
            t_elec_eq = SKIN_C
        else:
            z = OPEN_CIRCUIT_OHM
            t_elec_eq = self._ambient_c
        t_batt_eq = self._ambient_c
        drain = IDLE_DRAIN_PCT_PER_S

        output = self._output
        if output is None:
            i = 0.0
        else:
            on_s = self._on_s = self._on_s + dt
            if self._short and on_s >= SHORT_ONSET_S:
                z = self._short_ohm
            v_max = output.v_max_v
            limit = v_max / z * 1e6
            goal = output.i_set_ua * self._drift_gain if self._drift else output.i_set_ua
            if goal > limit:
                goal = limit
            rise = -math.expm1(-dt / _RISE_TAU_S)  # 1 - e^(-dt/tau): the exact first-order lag
            i = self._i_reg_ua = self._i_reg_ua + (goal - self._i_reg_ua) * rise
            if i > limit:
                i = limit
            if self._spikes:
                i = self._spike(on_s, i, limit)
            fault_plugs = self._charger_fault and not self._charger_fault_done
            if fault_plugs and on_s >= CHARGER_PLUGGED_AFTER_S:
                self._charging = self._charger_fault_done = True
            v = i * z * 1e-6
            power_mw = i * (v if v < v_max else v_max) * 1e-3
            t_elec_eq += DRIVER_WARMING_C + ELECTRODE_C_PER_MW * power_mw
            if self._elec_overheat and t_elec_eq < OVERHEAT_ELECTRODE_C:
                t_elec_eq = OVERHEAT_ELECTRODE_C
            t_batt_eq += BATTERY_OUTPUT_RISE_C
            if self._runaway and on_s >= RUNAWAY_ONSET_S:
                # A steady heat input: relaxing toward eq + rate * tau starts at that rate.
                t_batt_eq += RUNAWAY_C_PER_S * BATTERY_TAU_S
            drain += OUTPUT_DRAIN_PCT_PER_S
        self._z_ohm = z
        self._i_ua = i

        self._t_elec_c += (t_elec_eq - self._t_elec_c) * -math.expm1(-dt / ELECTRODE_TAU_S)
        if self._charging:
            t_batt_eq += BATTERY_CHARGING_RISE_C
            drain -= CHARGE_PCT_PER_S
        t_batt = self._t_batt_c + (t_batt_eq - self._t_batt_c) * -math.expm1(-dt / BATTERY_TAU_S)
        self._t_batt_c = t_batt if t_batt < RUNAWAY_MAX_C else RUNAWAY_MAX_C
        batt = self._batt_pct - drain * dt
        self._batt_pct = 0.0 if batt < 0.0 else 100.0 if batt > 100.0 else batt

    def _spike(self, on_s: float, i: float, limit: float) -> float:
        """The current during a regulation fault: the spike's peak (up to the limit) or ``i``."""
        if on_s >= self._spike_at_s + SPIKE_DURATION_S:
            self._spike_at_s = on_s + self._rng.uniform(*SPIKE_INTERVAL_S_RANGE)
            self._spike_peak_ua = self._rng.uniform(*SPIKE_PEAK_UA_RANGE)
        if on_s >= self._spike_at_s:
            return min(self._spike_peak_ua, limit)
        return i
