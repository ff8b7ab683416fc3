"""The rule catalogue of ``safety.md``: ids, versions, severities, actions, wording, thresholds.

The rules themselves are data, in ``catalogue.toml`` next to this module, read once at import
into :data:`RULES`. A rule's severity and action (and those of its minor variant, where it
has one) and the sentence an occurrence explains itself with are stated there once; the
checks in ``services/rules/engine/checks/`` only decide whether a rule fired and with what
figures.

Each threshold is a :class:`Param` with its default, which way is tighter, and the loosest
value a brand may set (the envelope's figure where the envelope has one, else the default:
such a threshold can only be tightened). A threshold whose default is ``None`` comes from the
mode table the device runs (``max_sessions_24h``, ``min_batt_pct``) unless the brand sets it.
"""

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any, Final, TypeVar

T = TypeVar("T")


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

    def refusal(self, value: float) -> tuple[float, str] | None:
        """Why a brand may not set ``value`` (the bound it passes, a sentence), or None."""
        lower = self.tighter is Tighter.LOWER
        if self.past_tightest(value):
            return self.tightest, (
                f"{value:g} is {'below' if lower else 'above'} {self.tightest:g} {self.unit}, "
                "the tightest that means something"
            )
        if self.loosens_past_limit(value):
            return self.limit, (
                f"{value:g} is {'above' if lower else 'below'} the limit {self.limit:g} "
                f"{self.unit}: a brand may tighten a threshold, never loosen it past the envelope"
            )
        return None


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


# A rule's table holds the fields of Rule (its id is the table's name), a param those of Param.
RULE_KEYS: Final = frozenset(f.name for f in fields(Rule)) - {"id"}
PARAM_KEYS: Final = frozenset(f.name for f in fields(Param))


def load_rules(text: str) -> tuple[Rule, ...]:
    """The rules of a catalogue in TOML (``catalogue.toml``), in the order written; raises
    ``ValueError`` for a key it does not know, ``TypeError`` for a value of the wrong kind."""
    return tuple(_rule(rule_id, entry) for rule_id, entry in tomllib.loads(text).items())


def _rule(rule_id: str, entry: Mapping[str, Any]) -> Rule:
    _known(rule_id, entry, RULE_KEYS)
    minor = entry.get("minor")
    return Rule(
        id=rule_id,
        version=_of(int, entry["version"], rule_id),
        severity=Severity(entry["severity"]),
        action=Action(entry["action"]),
        summary=_of(str, entry["summary"], rule_id),
        says=_of(str, entry["says"], rule_id),
        params=tuple(_param(rule_id, spec) for spec in entry.get("params", [])),
        self_resolving=_of(bool, entry.get("self_resolving", False), rule_id),
        minor=Grade(Severity(minor["severity"]), Action(minor["action"])) if minor else None,
        says_for={str(k): _of(str, v, rule_id) for k, v in entry.get("says_for", {}).items()},
    )


def _param(rule_id: str, spec: Mapping[str, Any]) -> Param:
    where = f"{rule_id}.{spec.get('name')}"
    _known(where, spec, PARAM_KEYS)
    default = spec.get("default")
    return Param(
        name=_of(str, spec["name"], where),
        default=None if default is None else _number(default, where),
        tighter=Tighter(spec["tighter"]),
        limit=_number(spec["limit"], where),
        unit=_of(str, spec["unit"], where),
        tightest=_number(spec.get("tightest", 0.0), where),
    )


def _known(where: str, entry: Mapping[str, Any], keys: frozenset[str]) -> None:
    unknown = set(entry) - keys
    if unknown:
        raise ValueError(f"catalogue {where}: unknown {sorted(unknown)}")


def _of(kind: type[T], value: object, where: str) -> T:
    if not isinstance(value, kind):
        raise TypeError(f"catalogue {where}: {value!r} is not {kind.__name__}")
    return value


def _number(value: object, where: str) -> float:
    # TOML keeps 5 and 5.0 apart; a threshold keeps the kind written (explanations show it).
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"catalogue {where}: {value!r} is not a number")
    return value


RULES: Final[tuple[Rule, ...]] = load_rules(
    (Path(__file__).parent / "catalogue.toml").read_text(encoding="utf-8")
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
        refused = param.refusal(value)
        if refused is not None:
            bound, message = refused
            raise ThresholdError(rule_id, name, bound, value, message)
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
