"""A running session: what the agent keeps in memory while output runs, and its setpoint."""

from dataclasses import dataclass, field
from typing import Final

from device_agent.hardware import Output
from device_agent.modes import ModeSpec

# Levels scale the mode's i_target_ua: level 5 delivers it, each level is a fifth of it, and
# no level goes above i_max_ua.
REFERENCE_LEVEL: Final = 5
MAX_LEVEL: Final = 10


@dataclass
class Session:
    """A session from its start until its output has actually stopped."""

    id: str
    mode: str
    level: int
    spec: ModeSpec
    output: Output
    started_ms: int
    planned_ms: int
    user: str | None
    output_ms: int = 0
    last_sample_ms: int = 0
    stopping: str | None = None  # the end reason once output was asked to stop
    contact_lost_ms: int | None = None
    paused_ms: int | None = None
    over_limit_ms: int | None = None
    samples: list[dict[str, object]] = field(default_factory=list)
    batch_started_ms: int = 0


def output_for(mode: str, level: int, spec: ModeSpec) -> Output:
    """What the output stage is asked for: the mode's waveform at the level's current."""
    i_set = min(float(spec.i_max_ua), spec.i_target_ua * level / REFERENCE_LEVEL)
    return Output(
        mode=mode,
        waveform=spec.waveform,
        i_set_ua=i_set,
        v_max_v=float(spec.v_max_v),
        freq_hz=spec.freq_hz,
        pulse_ms=spec.pulse_ms,
    )
