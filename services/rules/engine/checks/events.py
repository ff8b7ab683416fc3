"""Checks on events, state answers and silence (the last two run by the periodic sweep)."""

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Final

from services.common.protocol.enums import FaultCode, RebootReason, ReportKind
from services.common.protocol.models import Fault, State, UserReport
from services.rules.alerts import Finding, event_finding
from services.rules.context import DeviceContext
from services.rules.engine.store import BanRow, RebootRow
from services.rules.explain import minutes_text, say, seconds_text

UNEXPECTED_REBOOTS: Final = frozenset(
    {RebootReason.WATCHDOG, RebootReason.BROWNOUT, RebootReason.PANIC}
)
CRITICAL_FAULTS: Final = frozenset(
    {
        FaultCode.OVERCURRENT,
        FaultCode.SHORT_CIRCUIT,
        FaultCode.OVERTEMP_ELECTRODE,
        FaultCode.OVERTEMP_BATTERY,
        FaultCode.OUTPUT_WHILE_CHARGING,
    }
)
ADVERSE_KINDS: Final = (ReportKind.BURN, ReportKind.REDNESS)


def reboot_loops(
    context: DeviceContext, ts: datetime, reboots: Sequence[RebootRow]
) -> list[Finding]:
    """reboot_loop: every reboot in the window after ``ts`` that ends ``count`` reboots within
    ``window_s`` (``reboots``: the device's unexpected reboots around ``ts``, in time order)."""
    t = context.thresholds
    needed = int(t.value("reboot_loop", "count"))
    window = timedelta(seconds=t.value("reboot_loop", "window_s"))
    found = []
    for reboot in reboots:
        if not ts <= reboot.ts <= ts + window:
            continue
        recent = [r for r in reboots if reboot.ts - window <= r.ts <= reboot.ts]
        if len(recent) < needed:
            continue
        reasons = [r.reason for r in recent]
        found.append(
            Finding(
                rule="reboot_loop",
                device_id=context.device_id,
                started_at=recent[0].ts,
                ended_at=reboot.ts,
                threshold={"count": needed, "window_s": window.total_seconds()},
                observed={"reboots": len(recent), "reasons": reasons},
                text=say(
                    "reboot_loop",
                    count=len(recent),
                    window=minutes_text(window.total_seconds()),
                    reasons=", ".join(reasons),
                ),
                key=f"reboot:{reboot.seq}",
            )
        )
    return found


def adverse_report(context: DeviceContext, event: UserReport) -> Finding | None:
    """adverse_report: the user reported a burn, or (minor) redness."""
    if event.kind not in ADVERSE_KINDS:
        return None
    return event_finding(
        context.device_id,
        event.ts,
        "adverse_report",
        f"report:{event.seq}",
        {"kinds": [kind.value for kind in ADVERSE_KINDS]},
        {"kind": event.kind.value, "note": event.note},
        say("adverse_report", event.kind.value),
        variant=event.kind.value,
        minor=event.kind is not ReportKind.BURN,
    )


def device_fault(context: DeviceContext, event: Fault) -> Finding:
    """device_fault: any fault; a code outside :data:`CRITICAL_FAULTS` is minor."""
    return event_finding(
        context.device_id,
        event.ts,
        "device_fault",
        f"fault:{event.seq}",
        {"critical_codes": sorted(c.value for c in CRITICAL_FAULTS)},
        {"code": event.code.value, "detail": event.detail},
        say("device_fault", code=event.code.value.replace("_", " ")),
        variant=event.code.value,
        minor=event.code not in CRITICAL_FAULTS,
    )


def config_rejected(context: DeviceContext, state: State) -> Finding | None:
    """config_rejected: the device answered a pushed table with a rejection."""
    config = state.config
    if config is None or config.reason is None or config.status.value != "rejected":
        return None
    reason = config.reason.value
    return event_finding(
        context.device_id,
        state.ts,
        "config_rejected",
        f"v{config.version}",
        {},
        {"version": config.version, "reason": reason},
        say("config_rejected", version=config.version, reason=reason.replace("_", " ")),
    )


def offline(
    context: DeviceContext, silent_since: datetime, last_session: datetime, now: datetime
) -> Finding | None:
    """offline: silent for more than ``hours`` after a session in the last ``recent_days``."""
    t = context.thresholds
    hours = t.value("offline", "hours")
    recent = timedelta(days=t.value("offline", "recent_days"))
    offline_for = now - silent_since
    if offline_for <= timedelta(hours=hours) or last_session < now - recent:
        return None
    return Finding(
        rule="offline",
        device_id=context.device_id,
        started_at=silent_since,
        ended_at=now,
        threshold={"offline_hours": hours, "recent_session_days": recent.days},
        observed={
            "offline_hours": round(offline_for.total_seconds() / 3600, 1),
            "last_session": last_session.isoformat(),
        },
        text=say(
            "offline", offline_for=minutes_text(offline_for.total_seconds()), days=recent.days
        ),
        key=f"offline:{silent_since.isoformat()}",
    )


def config_unacked(
    context: DeviceContext, version: int, published_at: datetime, online_s: float, now: datetime
) -> Finding | None:
    """config_unacked: the newest pushed table unanswered after ``online_hours`` online."""
    hours = context.thresholds.value("config_unacked", "online_hours")
    online_h = online_s / 3600
    if online_h <= hours:
        return None
    return Finding(
        rule="config_unacked",
        device_id=context.device_id,
        started_at=published_at,
        ended_at=now,
        threshold={"online_hours": hours},
        observed={"version": version, "online_hours": round(online_h, 1)},
        text=say("config_unacked", version=version, online_h=online_h),
        key=f"v{version}",
    )


def device_flooding(context: DeviceContext, ban: BanRow) -> Finding:
    """device_flooding: ingest banned the device from the broker for sending past its message
    budget. Every ban is an occurrence (keyed by the ban), so bans while the alert is open
    raise its count."""
    ban_s = (ban.until - ban.banned_at).total_seconds()
    return Finding(
        rule="device_flooding",
        device_id=context.device_id,
        started_at=ban.banned_at,
        ended_at=ban.until,
        threshold={"budget_messages": ban.budget, "window_s": ban.window_s},
        observed={"messages_over_budget": ban.messages_over_budget, "ban_s": ban_s},
        text=say(
            "device_flooding",
            over=ban.messages_over_budget,
            budget=ban.budget,
            window=seconds_text(ban.window_s),
            ban=seconds_text(ban_s),
        ),
        key=f"ban:{ban.id}",
    )
