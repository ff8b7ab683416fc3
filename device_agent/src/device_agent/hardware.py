"""The hardware boundary: what the agent asks of the device's analog front end and battery.

Two implementations: :class:`device_agent.simulator.SimulatedHardware`, physical enough to
exercise every rule of the safety catalogue, and a real driver. A real driver (the firmware
team's) implements :class:`Hardware` over the board's ADC, DAC and fuel gauge, typically via
the vendor's kernel driver or a serial link to the output MCU, and is passed to
:class:`device_agent.agent.Agent` in place of the simulator. The agent calls it from one
thread, about ten times a second while output runs.
"""

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Output:
    """What the output stage is asked to deliver: one mode at one level."""

    mode: str
    waveform: str
    i_set_ua: float
    v_max_v: float
    freq_hz: int
    pulse_ms: int


@dataclass(frozen=True, slots=True)
class Reading:
    """One sample of the front end and the battery, as measured (not as commanded).

    ``output_on`` is what the output stage reports, which differs from what the agent asked
    when a relay sticks. ``z_ohm`` is capped at :data:`OPEN_CIRCUIT_OHM` (JSON has no
    infinity).
    """

    output_on: bool
    i_ua: float
    v_v: float
    z_ohm: float
    t_elec_c: float
    t_batt_c: float
    batt_pct: int
    charging: bool


# What an open circuit reads as: the front end's measuring range ends at 10 MΩ.
OPEN_CIRCUIT_OHM = 10_000_000.0


class Hardware(Protocol):
    """The device's output stage, sensors and battery."""

    def read(self) -> Reading:
        """Measure everything now."""

    def start_output(self, output: Output) -> None:
        """Deliver ``output`` until :meth:`stop_output` (or change the running output)."""

    def stop_output(self) -> None:
        """Stop delivering current."""
