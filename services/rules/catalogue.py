"""The rule catalogue of ``safety.md``: ids, versions, severities, actions, wording, thresholds.

A rule's severity and action (and those of its minor variant, where it has one) and the
sentence an occurrence explains itself with are stated here once; the checks in
``services/rules/engine/checks.py`` only decide whether a rule fired and with what figures.

Each threshold is a :class:`Param` with its default, which way is tighter, and the loosest
value a brand may set (the envelope's figure where the envelope has one, else the default:
such a threshold can only be tightened). A threshold whose default is ``None`` comes from the
mode table the device runs (``max_sessions_24h``, ``min_batt_pct``) unless the brand sets it.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final


class Severity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


SEVERITY_RANK: Final = {Severity.INFO: 0, Severity.WARNING: 1, Severity.CRITICAL: 2}


class Action(StrEnum):
    """What a rule does besides raising its alert."""

    ALERT = "alert"
    PUSH_SAFE = "push_safe"
    LOCK_DEVICE = "lock_device"
    LOCK_USER_DEVICES = "lock_user_devices"


@dataclass(frozen=True)
class Grade:
    """How an occurrence is raised: its severity and what the rule does besides alerting."""

    severity: Severity
    action: Action


# The grade of a rule's minor variant (an electrode only warm, redness, a minor fault code).
MINOR: Final = Grade(Severity.WARNING, Action.ALERT)


class Tighter(StrEnum):
    LOWER = "lower"
    HIGHER = "higher"


@dataclass(frozen=True)
class Param:
    """One threshold: its default, which way tightens it, the loosest value a brand may set,
    and the tightest that still means something (0 for a lower-is-tighter threshold)."""

    name: str
    default: float | None
    tighter: Tighter
    limit: float
    unit: str
    tightest: float = 0.0

    def loosens_past_limit(self, value: float) -> bool:
        """Whether ``value`` is looser than the limit a brand may go to."""
        return value > self.limit if self.tighter is Tighter.LOWER else value < self.limit

    def past_tightest(self, value: float) -> bool:
        """Whether ``value`` is beyond the tightest meaningful value."""
        return value < self.tightest if self.tighter is Tighter.LOWER else value > self.tightest


@dataclass(frozen=True)
class Rule:
    id: str
    version: int
    severity: Severity
    action: Action
    summary: str
    # The sentence of an occurrence: a str.format template over the fields its check gives
    # (``services/rules/explain.py`` renders it); ``says_for`` words a variant differently.
    says: str
    params: tuple[Param, ...] = field(default_factory=tuple)
    # Rules whose condition can clear resolve their own alerts (actor galvani-rules).
    self_resolving: bool = False
    # The grade of the rule's minor variant, for rules whose check can find one.
    minor: Grade | None = None
    says_for: Mapping[str, str] = field(default_factory=dict)

    def grade(self, minor: bool = False) -> Grade:
        """The severity and action of an occurrence (of the minor variant if ``minor``)."""
        if minor:
            if self.minor is None:
                raise ValueError(f"rule {self.id} has no minor variant")
            return self.minor
        return Grade(self.severity, self.action)

    def template(self, variant: str = "") -> str:
        """The sentence template of an occurrence of ``variant``."""
        return self.says_for.get(variant, self.says)

    def param(self, name: str) -> Param:
        """The threshold called ``name``."""
        for param in self.params:
            if param.name == name:
                return param
        raise KeyError(f"rule {self.id} has no threshold {name!r}")


def _p(
    name: str,
    default: float | None,
    tighter: Tighter,
    limit: float,
    unit: str,
    tightest: float = 0.0,
) -> Param:
    return Param(name, default, tighter, limit, unit, tightest)


LO, HI = Tighter.LOWER, Tighter.HIGHER
W, C, INFO = Severity.WARNING, Severity.CRITICAL, Severity.INFO

RULES: Final[tuple[Rule, ...]] = (
    Rule(
        "overuse_24h",
        1,
        W,
        Action.ALERT,
        "more than max_sessions_24h sessions by one user in a rolling 24 h",
        "This is the {nth} session in 24 hours; the limit is {limit:g} a day.",
        (_p("max_sessions", None, LO, 3, "sessions"),),
    ),
    Rule(
        "overuse_7d",
        1,
        W,
        Action.ALERT,
        "more than 5 sessions (7 in the intro stage) or 120 output-minutes in a rolling 7 days",
        "The user reached {reasons}.",
        (
            _p("max_sessions", 5, LO, 10, "sessions"),
            _p("max_sessions_intro", 7, LO, 10, "sessions"),
            _p("max_output_min", 120, LO, 120, "min"),
        ),
    ),
    Rule(
        "cooldown",
        1,
        INFO,
        Action.ALERT,
        "a session starts within cooldown_s of the end of a session that lasted over 5 minutes",
        "A session started {gap} after a {previous} session ended; the {mode} cooldown is"
        " {cooldown}.",
        (_p("long_session_s", 300, LO, 300, "s"),),
    ),
    Rule(
        "session_overrun",
        1,
        C,
        Action.PUSH_SAFE,
        "output still on 30 s past the mode's session_cap_s",
        "The device ran {past_cap} past its {cap} limit for {mode}.",
        (_p("grace_s", 30, LO, 30, "s"),),
    ),
    Rule(
        "no_gel",
        1,
        W,
        Action.ALERT,
        "impedance 20-200 kOhm with output on for more than 10 s in total in one session",
        "The electrodes read {z_low_kohm:g} to 200 kΩ, dry skin with no gel, for {total} of"
        " this session (limit {limit}).",
        (_p("z_low_ohm", 20_000, LO, 20_000, "Ohm"), _p("total_s", 10, LO, 10, "s")),
    ),
    Rule(
        "no_contact",
        1,
        INFO,
        Action.ALERT,
        "impedance above 200 kOhm, or current below 10 % of setpoint, with output on for > 2 s",
        "The device lost skin contact with output on{for_duration}.",
        (
            _p("z_ohm", 200_000, LO, 200_000, "Ohm"),
            _p("current_fraction", 0.1, HI, 0.1, "of setpoint", tightest=1.0),
            _p("duration_s", 2, LO, 2, "s"),
        ),
        self_resolving=True,
    ),
    Rule(
        "short_circuit",
        1,
        C,
        Action.PUSH_SAFE,
        "impedance below 300 Ohm with output on for more than 1 s",
        "The electrodes read {low_z:.0f} Ω, a short circuit,{for_duration}"
        " (limit: below {z_below_ohm:.0f} Ω for over 1 s).",
        # Tightest: the low end of the gel band; above it a short circuit is contact.
        (_p("z_ohm", 300, HI, 300, "Ohm", tightest=1000), _p("duration_s", 1, LO, 1, "s")),
    ),
    Rule(
        "overcurrent",
        1,
        C,
        Action.PUSH_SAFE,
        "current above 1.2 x i_max_ua for more than 200 ms, or any sample above 1000 uA",
        # above_limit: empty when the mode the run ran in is not in the device's table.
        "The output current reached {peak_i:.0f} µA{for_duration}{above_limit}.",
        (
            _p("factor", 1.2, LO, 1.2, "x i_max_ua"),
            _p("duration_ms", 200, LO, 200, "ms"),
            _p("absolute_ua", 1000, LO, 1000, "uA"),
        ),
    ),
    Rule(
        "regulation_drift",
        1,
        W,
        Action.ALERT,
        "current off setpoint by more than 20 % for more than 2 s while impedance is in range",
        "The output current drifted from its setpoint{for_duration} by more than"
        " {off_setpoint_fraction:.0%}.",
        (_p("fraction", 0.2, LO, 0.2, "of setpoint"), _p("duration_s", 2, LO, 2, "s")),
    ),
    Rule(
        "electrode_overtemp",
        1,
        C,
        Action.PUSH_SAFE,
        "electrode above 41 C (critical), or above 39 C for more than 60 s (warning)",
        "The electrode reached {peak_t_elec:.1f} °C{for_duration}, above the"
        " {t_elec_above_c:g} °C limit.",
        (
            _p("critical_c", 41, LO, 41, "C"),
            _p("warning_c", 39, LO, 41, "C"),
            _p("warning_s", 60, LO, 60, "s"),
        ),
        minor=MINOR,
    ),
    Rule(
        "battery_overtemp",
        1,
        C,
        Action.LOCK_DEVICE,
        "battery above 60 C, or rising faster than 1 C/s",
        "The battery reached {peak_t_batt:.1f} °C{for_duration}, above the {t_batt_above_c:g}"
        " °C limit.",
        (_p("max_c", 60, LO, 60, "C"), _p("rise_c_per_s", 1.0, LO, 1.0, "C/s")),
        says_for={
            "rising": "The battery warmed {rise_c_per_s:.1f} °C per second (to {t_batt_c:.1f}"
            " °C), faster than the {limit:g} °C/s limit."
        },
    ),
    Rule(
        "output_while_charging",
        1,
        C,
        Action.LOCK_DEVICE,
        "any sample with output on while charging",
        "The device delivered output while charging{for_duration}.",
    ),
    Rule(
        "low_battery_start",
        1,
        W,
        Action.ALERT,
        "a session starts below the mode's min_batt_pct",
        "A {mode} session started with the battery at {batt_pct} %, below the {minimum:g} %"
        " minimum.",
        (_p("min_batt_pct", None, HI, 15, "%", tightest=100),),
    ),
    Rule(
        "reboot_loop",
        1,
        C,
        Action.PUSH_SAFE,
        "3 or more unexpected reboots (watchdog, brownout, panic) in 10 minutes",
        "The device rebooted unexpectedly {count} times in {window} ({reasons}).",
        # Tightest window: a day, as long as the rules keep reboots.
        (_p("count", 3, LO, 3, "reboots"), _p("window_s", 600, HI, 600, "s", tightest=86_400)),
    ),
    Rule(
        "contraindicated_use",
        1,
        C,
        Action.LOCK_USER_DEVICES,
        "a session starts for a user flagged with a contraindication",
        "A {mode} session started for a user flagged with {flags}, who must not use the device.",
    ),
    Rule(
        "adverse_report",
        1,
        C,
        Action.LOCK_DEVICE,
        "a user_report of burn (critical, lock the device) or redness (warning)",
        "The user reported a burn after using the device.",
        minor=MINOR,
        says_for={"redness": "The user reported redness after using the device."},
    ),
    Rule(
        "device_fault",
        1,
        C,
        Action.PUSH_SAFE,
        "any fault event; critical codes push SAFE",
        "The device reported a {code} fault.",
        minor=MINOR,
    ),
    Rule(
        "config_unacked",
        1,
        W,
        Action.ALERT,
        "a pushed mode table not answered within 24 h of the device being online",
        "The device has not answered mode table v{version} after {online_h:.0f} hours online.",
        (_p("online_hours", 24, LO, 24, "h"),),
        self_resolving=True,
    ),
    Rule(
        "config_rejected",
        1,
        W,
        Action.ALERT,
        "a device rejected a pushed mode table",
        "The device rejected mode table v{version} ({reason}).",
    ),
    Rule(
        "offline",
        1,
        INFO,
        Action.ALERT,
        "a device with a session in the last 7 days offline for more than 72 h",
        "The device has been offline for {offline_for}, after a session in the last {days} days.",
        # Tightest: 8 days, as long as the rules keep sessions.
        (_p("hours", 72, LO, 72, "h"), _p("recent_days", 7, HI, 7, "days", tightest=8)),
        self_resolving=True,
    ),
)

BY_ID: Final[Mapping[str, Rule]] = {rule.id: rule for rule in RULES}


class ThresholdError(ValueError):
    """A brand override that names no threshold or loosens one past its limit."""

    def __init__(self, rule: str, param: str, limit: float | None, value: object, message: str):
        super().__init__(f"{rule}.{param}: {message}")
        self.rule = rule
        self.param = param
        self.limit = limit
        self.value = value
        self.message = message


def check_overrides(rule_id: str, params: Mapping[str, object]) -> dict[str, float]:
    """Validate a brand's overrides of one rule; return them as numbers."""
    rule = BY_ID.get(rule_id)
    if rule is None:
        raise ThresholdError(rule_id, "", None, None, "no such rule")
    checked: dict[str, float] = {}
    for name, value in params.items():
        try:
            param = rule.param(name)
        except KeyError:
            raise ThresholdError(rule_id, name, None, value, "no such threshold") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ThresholdError(rule_id, name, param.limit, value, "must be a number")
        if not math.isfinite(value):
            raise ThresholdError(rule_id, name, param.limit, value, "must be a finite number")
        if param.past_tightest(value):
            way = "below" if param.tighter is Tighter.LOWER else "above"
            raise ThresholdError(
                rule_id,
                name,
                param.tightest,
                value,
                f"{value:g} is {way} {param.tightest:g} {param.unit}, the tightest that means "
                "something",
            )
        if param.loosens_past_limit(value):
            way = "above" if param.tighter is Tighter.LOWER else "below"
            raise ThresholdError(
                rule_id,
                name,
                param.limit,
                value,
                f"{value:g} is {way} the limit {param.limit:g} {param.unit}: a brand may "
                "tighten a threshold, never loosen it past the envelope",
            )
        checked[name] = float(value)
    return checked


@dataclass(frozen=True)
class Thresholds:
    """A brand's effective thresholds: its overrides over the catalogue's defaults."""

    overrides: Mapping[str, Mapping[str, float]] = field(default_factory=dict)

    def get(self, rule_id: str, name: str) -> float | None:
        """The threshold ``rule_id.name``: the brand's override, else the default."""
        override = self.overrides.get(rule_id, {}).get(name)
        return override if override is not None else BY_ID[rule_id].param(name).default

    def value(self, rule_id: str, name: str) -> float:
        """Like :meth:`get`, for thresholds that always have a default."""
        found = self.get(rule_id, name)
        if found is None:
            raise KeyError(f"{rule_id}.{name} comes from the mode table")
        return found


DEFAULT_THRESHOLDS: Final = Thresholds()
