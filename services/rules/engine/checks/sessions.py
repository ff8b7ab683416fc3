"""Checks on session starts: a contraindicated user, the usage windows, the cooldown.

Each occurrence is keyed by the start it judges, so a start judged again (its window changed
when a late message arrived) counts once.
"""

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from services.common.protocol.models import SessionStart
from services.rules.alerts import Finding, event_finding
from services.rules.context import DeviceContext, UserInfo
from services.rules.engine.store import EndedRow, StartRow
from services.rules.explain import minutes_text, ordinal, say, week_reasons


def contraindicated_use(
    context: DeviceContext, event: SessionStart, user: UserInfo, user_key: str
) -> Finding | None:
    """contraindicated_use: a session started for a user flagged with a contraindication."""
    if not user.contraindications:
        return None
    flags, mode = user.contraindications, event.mode.value
    return event_finding(
        context.device_id,
        event.ts,
        "contraindicated_use",
        event.session,
        {"contraindications": list(flags)},
        {"user": event.user or context.user_id, "mode": mode},
        say("contraindicated_use", mode=mode, flags=", ".join(flags)),
        session=event.session,
        user_key=user_key,
    )


def overuse_24h(
    context: DeviceContext, start: StartRow, day: Sequence[StartRow], user_key: str
) -> Finding | None:
    """overuse_24h: ``start`` is one session too many in the 24 hours ending at it."""
    override = context.thresholds.get("overuse_24h", "max_sessions")
    spec = context.modes.get(start.mode) if start.mode is not None else None
    limit = override if override is not None else spec["max_sessions_24h"] if spec else None
    if limit is None or len(day) <= limit:
        return None
    return _at_start(
        "overuse_24h",
        start,
        day[0].started_at,
        user_key,
        {"max_sessions_24h": limit},
        {"sessions": len(day), "sessions_in_window": [s.session for s in day]},
        say("overuse_24h", nth=ordinal(len(day)), limit=limit),
    )


def overuse_7d(
    context: DeviceContext, start: StartRow, week: Sequence[StartRow], user_key: str, intro: bool
) -> Finding | None:
    """overuse_7d: too many sessions or output-minutes in the 7 days ending at ``start``."""
    t = context.thresholds
    limit = t.value("overuse_7d", "max_sessions_intro" if intro else "max_sessions")
    minutes = sum(s.duration_s or 0 for s in week) / 60
    max_minutes = t.value("overuse_7d", "max_output_min")
    reasons = week_reasons(len(week), limit, minutes, max_minutes)
    if not reasons:
        return None
    return _at_start(
        "overuse_7d",
        start,
        week[0].started_at,
        user_key,
        {"max_sessions_7d": limit, "max_output_min": max_minutes, "intro": intro},
        {"sessions": len(week), "output_min": round(minutes, 1)},
        say("overuse_7d", reasons=" and ".join(reasons)),
    )


def cooldown(
    context: DeviceContext, start: StartRow, ended: Iterable[EndedRow], user_key: str
) -> Finding | None:
    """cooldown: ``start`` came within the cooldown of the latest long session that ended
    before it (``ended``, latest first, all longer than ``long_session_s``)."""
    long_s = context.thresholds.value("cooldown", "long_session_s")
    for previous in ended:
        spec = context.modes.get(previous.mode) if previous.mode is not None else None
        limit = int(spec["cooldown_s"]) if spec is not None else 0
        gap = (start.started_at - previous.ended_at).total_seconds()
        if gap >= limit:
            continue
        return _at_start(
            "cooldown",
            start,
            previous.ended_at,
            user_key,
            {"cooldown_s": limit, "long_session_s": long_s},
            {
                "gap_s": round(gap),
                "previous_session": previous.session,
                "previous_duration_s": previous.duration_s,
            },
            say(
                "cooldown",
                gap=minutes_text(gap),
                previous=minutes_text(previous.duration_s),
                mode=previous.mode,
                cooldown=minutes_text(limit),
            ),
        )
    return None


def _at_start(
    rule: str,
    start: StartRow,
    since: datetime,
    user_key: str,
    threshold: Mapping[str, Any],
    observed: Mapping[str, Any],
    text: str,
) -> Finding:
    """An occurrence judged at a session's start, over [``since``, the start], keyed by it."""
    return Finding(
        rule,
        start.device_id,
        since,
        start.started_at,
        threshold,
        observed,
        text,
        key=start.session,
        session=start.session,
        user_key=user_key,
    )
