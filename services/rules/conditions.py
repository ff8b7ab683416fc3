"""Per-sample conditions and runs of them in event time (pure functions, no I/O).

Each sample gets a bitmask of the conditions it meets, computed once against the mode table
the device runs and the brand's thresholds, and stored with the sample. A rule that needs a
condition "for more than D" looks for a *run*: consecutive samples (in ``ts`` order, no more
than :data:`MAX_GAP_S` apart) that all meet it, spanning more than D from the first to the
last. A missing message leaves a gap and so breaks a run; when it arrives, the run is found
whole. Because samples are keyed by ``(device_id, ts)``, the runs depend on the set of
samples, not on the order they arrived in.
"""

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import IntFlag
from typing import Any, Final

from services.rules.catalogue import Thresholds

# Protocol v1 samples at 10 Hz (limits.SAMPLE_PERIOD_S); a gap of more than 2.5 periods is a
# break.
MAX_GAP_S: Final = 0.25
MAX_GAP: Final = timedelta(seconds=MAX_GAP_S)
# The battery's rate of rise is measured over 1 to 2 s (samples further apart do not say how
# fast it rose), with a tolerance for float32 storage of the readings.
RISE_MIN_SPAN_S: Final = 1.0
RISE_MAX_GAP_S: Final = 2.0
RISE_TOLERANCE_C_PER_S: Final = 1e-3


class Bit(IntFlag):
    NONE = 0
    NO_GEL = 1
    NO_CONTACT = 2
    SHORT = 4
    OVERCURRENT = 8
    OVERCURRENT_ABS = 16
    DRIFT = 32
    ELEC_WARN = 64
    ELEC_CRIT = 128
    BATT_HOT = 256
    CHARGING_OUT = 512


@dataclass(frozen=True, slots=True)
class SampleIn:
    """The fields of a sample the rules look at."""

    ts: datetime
    session: str | None
    mode: str | None
    out: bool
    i_ua: float | None
    i_set_ua: float | None
    z_ohm: float | None
    t_elec_c: float | None
    t_batt_c: float | None
    batt_pct: int | None
    charging: bool
    mask: int = 0


def sample_mask(
    sample: SampleIn, modes: Mapping[str, Mapping[str, Any]], thresholds: Thresholds
) -> int:
    """The conditions ``sample`` meets under the device's mode table and brand thresholds."""
    t = thresholds
    mask = Bit.NONE
    spec = modes.get(sample.mode) if sample.mode is not None else None
    z, i, i_set = sample.z_ohm, sample.i_ua, sample.i_set_ua
    if sample.out:
        if z is not None:
            if t.value("no_gel", "z_low_ohm") <= z <= t.value("no_contact", "z_ohm"):
                mask |= Bit.NO_GEL
            if z > t.value("no_contact", "z_ohm"):
                mask |= Bit.NO_CONTACT
            if z < t.value("short_circuit", "z_ohm"):
                mask |= Bit.SHORT
        if i is not None and i_set is not None and i_set > 0:
            if i < t.value("no_contact", "current_fraction") * i_set:
                mask |= Bit.NO_CONTACT
            z_ok = spec["z_ok_ohm"] if spec is not None else None
            in_range = z is not None and z_ok is not None and z_ok[0] <= z <= z_ok[1]
            if in_range and abs(i - i_set) > t.value("regulation_drift", "fraction") * i_set:
                mask |= Bit.DRIFT
        if sample.charging:
            mask |= Bit.CHARGING_OUT
    if i is not None:
        if spec is not None and i > t.value("overcurrent", "factor") * spec["i_max_ua"]:
            mask |= Bit.OVERCURRENT
        if i > t.value("overcurrent", "absolute_ua"):
            mask |= Bit.OVERCURRENT_ABS
    if sample.t_elec_c is not None:
        if sample.t_elec_c > t.value("electrode_overtemp", "warning_c"):
            mask |= Bit.ELEC_WARN
        if sample.t_elec_c > t.value("electrode_overtemp", "critical_c"):
            mask |= Bit.ELEC_CRIT
    if sample.t_batt_c is not None and sample.t_batt_c > t.value("battery_overtemp", "max_c"):
        mask |= Bit.BATT_HOT
    return int(mask)


@dataclass(frozen=True)
class RunCheck:
    """A rule (or one variant of it) that fires on a run of samples meeting ``bit``; its
    severity and action are the catalogue's (the minor grade if ``minor``)."""

    rule: str
    variant: str
    bit: Bit
    # More than this many seconds from first to last sample; None: any single sample.
    duration_s: float | None
    minor: bool = False


def run_checks(thresholds: Thresholds) -> tuple[RunCheck, ...]:
    """The run-based rule variants under ``thresholds``."""
    t = thresholds
    return (
        RunCheck(
            "overcurrent",
            "sustained",
            Bit.OVERCURRENT,
            t.value("overcurrent", "duration_ms") / 1000,
        ),
        RunCheck("overcurrent", "absolute", Bit.OVERCURRENT_ABS, None),
        RunCheck("short_circuit", "", Bit.SHORT, t.value("short_circuit", "duration_s")),
        RunCheck("no_contact", "", Bit.NO_CONTACT, t.value("no_contact", "duration_s")),
        RunCheck("regulation_drift", "", Bit.DRIFT, t.value("regulation_drift", "duration_s")),
        RunCheck("electrode_overtemp", "critical", Bit.ELEC_CRIT, None),
        RunCheck(
            "electrode_overtemp",
            "warning",
            Bit.ELEC_WARN,
            t.value("electrode_overtemp", "warning_s"),
            minor=True,
        ),
        RunCheck("battery_overtemp", "hot", Bit.BATT_HOT, None),
        RunCheck("output_while_charging", "", Bit.CHARGING_OUT, None),
    )


@dataclass(frozen=True)
class Run:
    """Consecutive samples meeting one condition."""

    samples: tuple[SampleIn, ...]

    @property
    def start(self) -> datetime:
        return self.samples[0].ts

    @property
    def end(self) -> datetime:
        return self.samples[-1].ts

    @property
    def span_s(self) -> float:
        return (self.end - self.start).total_seconds()


def runs_of(samples: Sequence[SampleIn], bit: int) -> list[Run]:
    """The runs of ``bit`` in ``samples`` (sorted by ``ts``)."""
    runs: list[Run] = []
    current: list[SampleIn] = []
    for sample in samples:
        meets = bool(sample.mask & bit)
        if meets and current and sample.ts - current[-1].ts > MAX_GAP:
            runs.append(Run(tuple(current)))
            current = []
        if meets:
            current.append(sample)
        elif current:
            runs.append(Run(tuple(current)))
            current = []
    if current:
        runs.append(Run(tuple(current)))
    return runs


def qualifying_runs(
    samples: Sequence[SampleIn], check: RunCheck, new: Iterable[datetime]
) -> list[Run]:
    """Runs of ``check`` that contain one of the ``new`` sample times and are long enough."""
    fresh = set(new)
    found = []
    for run in runs_of(samples, check.bit):
        if check.duration_s is not None and run.span_s <= check.duration_s:
            continue
        if any(sample.ts in fresh for sample in run.samples):
            found.append(run)
    return found


@dataclass(frozen=True)
class Rise:
    """Two samples between which the battery warmed too fast."""

    before: SampleIn
    after: SampleIn
    rate_c_per_s: float


def battery_rises(
    samples: Sequence[SampleIn], limit_c_per_s: float, new: Iterable[datetime]
) -> list[Rise]:
    """Samples whose battery warmed faster than the limit since a sample 1 to 2 s before
    (a 0.1 °C sensor step between two 10 Hz samples is noise, not 1 °C/s).

    Every such pair with a new member is looked at, and each later sample reports its earliest
    partner, so the occurrences found depend on the samples, not on their arrival order.
    """
    fresh = set(new)
    rises: list[Rise] = []
    with_temp = [s for s in samples if s.t_batt_c is not None]
    temps = [_temp(s) for s in with_temp]
    # A rise needs more than limit x 1 s between two samples: usually the whole window is
    # flatter than that, and no pair needs looking at.
    if not temps or max(temps) - min(temps) <= limit_c_per_s * RISE_MIN_SPAN_S:
        return rises
    for index, after in enumerate(with_temp):
        earliest: SampleIn | None = None
        fastest = 0.0
        for before in reversed(with_temp[:index]):
            gap = (after.ts - before.ts).total_seconds()
            if gap > RISE_MAX_GAP_S:
                break
            if gap < RISE_MIN_SPAN_S or (before.ts not in fresh and after.ts not in fresh):
                continue
            rate = (_temp(after) - _temp(before)) / gap
            if rate > limit_c_per_s + RISE_TOLERANCE_C_PER_S:
                earliest, fastest = before, max(fastest, rate)
        if earliest is not None:
            rises.append(Rise(earliest, after, fastest))
    return rises


def _temp(sample: SampleIn) -> float:
    assert sample.t_batt_c is not None
    return sample.t_batt_c


def window_s(thresholds: Thresholds, mask: int) -> float:
    """How far around new samples to look so every run containing them is judged whole."""
    longest = RISE_MAX_GAP_S
    for check in run_checks(thresholds):
        if mask & check.bit and check.duration_s is not None:
            longest = max(longest, check.duration_s)
    return longest + MAX_GAP_S
