"""Checks on samples: runs of a condition, a battery warming too fast, a session's samples."""

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from services.common.protocol.limits import SAMPLE_PERIOD_S
from services.rules.alerts import Finding
from services.rules.conditions import (
    Rise,
    Run,
    RunCheck,
    SampleIn,
    qualifying_runs,
    run_checks,
)
from services.rules.context import DeviceContext
from services.rules.engine.store import NoGelTotal, SessionInfo
from services.rules.explain import above_current_limit, for_duration, limit_text, say, seconds_text


def run_findings(
    context: DeviceContext, window: Sequence[SampleIn], new: Iterable[datetime], mask: int
) -> list[Finding]:
    """The run-based rules whose condition (in ``mask``) holds over a run with a new sample."""
    fresh = set(new)
    return [
        run_finding(context, check, run)
        for check in run_checks(context.thresholds)
        if mask & check.bit
        for run in qualifying_runs(window, check, fresh)
    ]


def run_finding(context: DeviceContext, check: RunCheck, run: Run) -> Finding:
    """The occurrence of ``check`` over ``run``."""
    samples = run.samples
    currents, impedances, t_elec, t_batt = (
        [value for s in samples if (value := getattr(s, name)) is not None]
        for name in ("i_ua", "z_ohm", "t_elec_c", "t_batt_c")
    )
    observed: dict[str, Any] = {"samples": len(samples), "duration_s": round(run.span_s, 3)}
    if currents:
        observed["peak_i_ua"] = max(currents)
    if impedances:
        observed["low_z_ohm"] = min(impedances)
        observed["high_z_ohm"] = max(impedances)
    if t_elec:
        observed["peak_t_elec_c"] = max(t_elec)
    if t_batt:
        observed["peak_t_batt_c"] = max(t_batt)
    threshold = run_threshold(context, check, samples[0].mode)
    if check.duration_s is not None:
        threshold["more_than_s"] = check.duration_s
    return Finding(
        rule=check.rule,
        variant=check.variant,
        minor=check.minor,
        device_id=context.device_id,
        started_at=run.start,
        ended_at=run.end,
        threshold=threshold,
        observed=observed,
        text=say(
            check.rule,
            check.variant,
            **threshold,
            peak_i=max(currents, default=0.0),
            low_z=min(impedances, default=0.0),
            peak_t_elec=max(t_elec, default=0.0),
            peak_t_batt=max(t_batt, default=0.0),
            for_duration=for_duration(run.span_s),
            above_limit=above_current_limit(threshold.get("i_ua")),
        ),
        session=samples[0].session,
    )


def run_threshold(context: DeviceContext, check: RunCheck, mode: str | None) -> dict[str, Any]:
    """The limits a run of ``check`` passed, for the explanation."""
    t, rule = context.thresholds, check.rule
    spec = context.modes.get(mode) if mode is not None else None
    if rule == "overcurrent":
        if check.variant == "absolute":
            return {"i_ua": t.value(rule, "absolute_ua")}
        i_max = spec["i_max_ua"] if spec is not None else None
        return {"i_ua": t.value(rule, "factor") * i_max if i_max else None, "i_max_ua": i_max}
    if rule == "short_circuit":
        return {"z_below_ohm": t.value(rule, "z_ohm")}
    if rule == "no_contact":
        return {
            "z_above_ohm": t.value(rule, "z_ohm"),
            "current_below_fraction": t.value(rule, "current_fraction"),
        }
    if rule == "regulation_drift":
        return {"off_setpoint_fraction": t.value(rule, "fraction")}
    if rule == "electrode_overtemp":
        name = "critical_c" if check.variant == "critical" else "warning_c"
        return {"t_elec_above_c": t.value(rule, name)}
    if rule == "battery_overtemp":
        return {"t_batt_above_c": t.value(rule, "max_c")}
    return {}


def battery_rising(context: DeviceContext, rise: Rise, limit: float) -> Finding:
    """battery_overtemp (rising): the battery warmed faster than ``limit`` °C/s."""
    rate, after = round(rise.rate_c_per_s, 2), rise.after
    return Finding(
        rule="battery_overtemp",
        variant="rising",
        device_id=context.device_id,
        started_at=rise.before.ts,
        ended_at=after.ts,
        threshold={"rise_c_per_s": limit},
        observed={"rise_c_per_s": rate, "t_batt_c": after.t_batt_c},
        text=say(
            "battery_overtemp",
            "rising",
            rise_c_per_s=rise.rate_c_per_s,
            t_batt_c=after.t_batt_c,
            limit=limit,
        ),
        session=after.session,
    )


def no_gel(context: DeviceContext, session: str, total: NoGelTotal) -> Finding | None:
    """no_gel: more than ``total_s`` of dry-skin samples in one session."""
    total_s = total.samples * SAMPLE_PERIOD_S
    limit = context.thresholds.value("no_gel", "total_s")
    if total_s <= limit + 1e-9 or total.first is None or total.last is None:
        return None
    z_low = context.thresholds.value("no_gel", "z_low_ohm")
    return Finding(
        rule="no_gel",
        device_id=context.device_id,
        started_at=total.first,
        ended_at=total.last,
        threshold={"z_ohm": [z_low, context.thresholds.value("no_contact", "z_ohm")]},
        observed={
            "seconds": round(total_s, 1),
            "samples": total.samples,
            "high_z_ohm": total.high_z_ohm,
        },
        text=say(
            "no_gel",
            z_low_kohm=z_low / 1000,
            total=seconds_text(total_s),
            limit=seconds_text(limit),
        ),
        key=session,
        session=session,
    )


def session_overrun(
    context: DeviceContext, session: str, info: SessionInfo, last_out: datetime
) -> Finding | None:
    """session_overrun: output at ``last_out`` was on past the mode's cap and the grace."""
    started, mode = info.started_at, info.mode
    if started is None or mode is None or mode not in context.modes:
        return None
    cap = int(context.modes[mode]["session_cap_s"])
    grace = context.thresholds.value("session_overrun", "grace_s")
    past_cap = (last_out - started).total_seconds() - cap
    if past_cap <= grace:
        return None
    return Finding(
        rule="session_overrun",
        device_id=context.device_id,
        started_at=started,
        ended_at=last_out,
        threshold={"session_cap_s": cap, "grace_s": grace, "mode": mode},
        observed={"output_s_past_cap": round(past_cap, 1)},
        text=say(
            "session_overrun", past_cap=seconds_text(past_cap), cap=limit_text(cap), mode=mode
        ),
        key=session,
        session=session,
    )


def low_battery_start(
    context: DeviceContext, session: str, info: SessionInfo, batt_pct: int
) -> Finding | None:
    """low_battery_start: the battery read ``batt_pct`` as the session started."""
    if info.event_start is None or info.mode is None:
        return None
    spec = context.modes.get(info.mode)
    override = context.thresholds.get("low_battery_start", "min_batt_pct")
    minimum = override if override is not None else spec["min_batt_pct"] if spec else None
    if minimum is None or batt_pct >= minimum:
        return None
    return Finding(
        rule="low_battery_start",
        device_id=context.device_id,
        started_at=info.event_start,
        ended_at=info.event_start,
        threshold={"min_batt_pct": minimum, "mode": info.mode},
        observed={"batt_pct": batt_pct},
        text=say("low_battery_start", mode=info.mode, batt_pct=batt_pct, minimum=minimum),
        key=session,
        session=session,
    )
