"""The sentences alerts say: a rule's catalogue template filled in, and the phrases it uses.

A check gives the figures; :func:`say` renders the rule's template from
``services/rules/catalogue.toml`` with them. The phrases below (durations, ordinals, the limit a
run passed) are the pieces more than one template needs, worded the way a support agent would
say them.
"""

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from services.rules.catalogue import BY_ID


def say(rule: str, variant: str = "", **fields: Any) -> str:
    """The sentence of an occurrence of ``rule`` (``variant``) with the check's figures."""
    return BY_ID[rule].template(variant).format(**fields)


def explanation(
    rule: str,
    variant: str,
    threshold: Mapping[str, Any],
    observed: Mapping[str, Any],
    window: tuple[datetime, datetime],
    session: str | None,
    text: str,
    action_text: str,
) -> dict[str, Any]:
    """The ``explanation`` stored with an alert: what fired, on what figures, and what was done."""
    return {
        "rule": rule,
        "rule_version": BY_ID[rule].version,
        "variant": variant or None,
        "threshold": dict(threshold),
        "observed": dict(observed),
        "window": {"from": iso(window[0]), "to": iso(window[1])},
        "session": session,
        "action": action_text,
        "text": f"{text.rstrip('.')}; {action_text}.",
    }


def seconds_text(seconds: float) -> str:
    """``41 s``, ``2.5 s``, ``3 min 5 s``: how a support agent would say a short duration."""
    if seconds < 60:
        return f"{seconds:.1f} s".replace(".0 s", " s")
    whole = round(seconds)
    minutes, rest = divmod(whole, 60)
    return f"{minutes} min {rest} s" if rest else f"{minutes} min"


def minutes_text(seconds: float) -> str:
    """``20-minute``-style durations for limits: ``20 minutes``, ``4 hours``, ``90 s``."""
    if seconds < 60:
        return f"{round(seconds)} s"
    if seconds < 2 * 3600:
        minutes = round(seconds / 60)
        return f"{minutes} minute{'s' if minutes != 1 else ''}"
    hours = seconds / 3600
    return f"{hours:g} hours" if hours == int(hours) else f"{hours:.1f} hours"


def limit_text(seconds: float) -> str:
    """A limit as an adjective: ``20-minute``, ``90-second``."""
    whole = round(seconds)
    if whole % 60 == 0:
        return f"{whole // 60}-minute"
    return f"{whole}-second"


def for_duration(span_s: float) -> str:
    """`` for 2.1 s`` after a run's condition, nothing for a single sample."""
    return f" for {seconds_text(span_s)}" if span_s > 0 else ""


def above_current_limit(i_ua: float | None) -> str:
    """``, above the 480 µA limit``; nothing when the limit is unknown (mode not in the table)."""
    return f", above the {i_ua:.0f} µA limit" if i_ua is not None else ""


def ordinal(n: int) -> str:
    """``1st``, ``2nd``, ``11th``, ``23rd``."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def week_reasons(
    sessions: int, limit: float, output_min: float, max_output_min: float
) -> list[str]:
    """What a user passed in 7 days (empty when within both limits)."""
    reasons = []
    if sessions > limit:
        reasons.append(f"{sessions} sessions in 7 days (limit {limit:g})")
    if output_min > max_output_min:
        reasons.append(f"{output_min:.0f} output-minutes in 7 days (limit {max_output_min:g})")
    return reasons


def iso(moment: datetime) -> str:
    """A UTC time as ISO 8601 with ``Z``, as the API and the explanations write it."""
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")
