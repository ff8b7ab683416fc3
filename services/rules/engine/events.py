"""Events, state and presence: store what the windows need, re-judge what the message changes.

A session's start or end can arrive before or after the sessions around it, so each one
re-judges every start whose usage window (24 h, 7 days) or cooldown it falls in; the
occurrences are keyed by the judged start's session, so judging a start twice counts once.
"""

from datetime import datetime, timedelta
from typing import Final

from services.common.protocol.limits import CLOCK_PAST_LIMIT
from services.common.protocol.models import (
    Event,
    Fault,
    Presence,
    Reboot,
    SessionEnd,
    SessionStart,
    State,
    UserReport,
)
from services.rules.alerts import open_alerts
from services.rules.context import DeviceContext, load_user
from services.rules.engine import checks, store
from services.rules.engine.batch import Batch
from services.rules.engine.samples import session_so_far
from services.rules.timeutil import from_ms

DAY: Final = timedelta(days=1)
WEEK: Final = timedelta(days=7)
LONGEST_COOLDOWN: Final = timedelta(hours=24)


def event(batch: Batch, context: DeviceContext, message: Event) -> None:
    """Evaluate one event of a device."""
    if isinstance(message, SessionStart):
        _session_started(batch, context, message)
    elif isinstance(message, SessionEnd):
        _session_ended(batch, context, message)
    elif isinstance(message, Reboot):
        _reboot(batch, context, message)
    elif isinstance(message, UserReport):
        batch.raise_(checks.adverse_report(context, message))
    elif isinstance(message, Fault):
        batch.raise_(checks.device_fault(context, message))


def _session_started(batch: Batch, context: DeviceContext, message: SessionStart) -> None:
    user_key = context.user_key(message.user)
    started = from_ms(message.ts)
    ended = store.store_start(batch.conn, context, message, started, user_key)
    _check_usage(batch, context.brand_id, user_key, started, started + WEEK)
    _check_cooldown(batch, context.brand_id, user_key, started, started)
    if ended is not None:
        # Its end arrived first and was left unjudged: judge the starts that followed it.
        _check_cooldown(batch, context.brand_id, user_key, ended, ended + LONGEST_COOLDOWN)
    session_so_far(batch, context, message.session)
    user = load_user(batch.conn, context.brand_id, message.user) if message.user else context.user
    batch.raise_(checks.contraindicated_use(context, message, user, user_key))


def _session_ended(batch: Batch, context: DeviceContext, message: SessionEnd) -> None:
    ended = from_ms(message.ts)
    user_key, started = store.store_end(batch.conn, context, message, ended)
    start = started if started is not None else ended - timedelta(seconds=message.duration_s)
    _check_usage(batch, context.brand_id, user_key, start, start + WEEK)
    _check_cooldown(batch, context.brand_id, user_key, ended, ended + LONGEST_COOLDOWN)
    for alert_id, last in open_alerts(batch.conn, context.device_id, "no_contact"):
        if last <= ended:
            batch.resolve(alert_id, f"session {message.session} ended ({message.reason.value})")


def _check_usage(batch: Batch, brand_id: str, user_key: str, lo: datetime, hi: datetime) -> None:
    """Re-judge overuse for every start whose window can include something in [lo, hi]."""
    # One read: the starts to judge ([lo, hi]) and the week before each of them.
    history = store.starts(batch.conn, brand_id, user_key, lo - WEEK, hi)
    for start in (s for s in history if s.started_at >= lo):
        context = batch.context(start.device_id)
        if context is None:
            continue
        day = [s for s in history if start.started_at - DAY < s.started_at <= start.started_at]
        week = [s for s in history if start.started_at - WEEK < s.started_at <= start.started_at]
        batch.raise_(checks.overuse_24h(context, start, day, user_key))
        intro = batch.stage(context.brand_id, user_key) == "intro"
        batch.raise_(checks.overuse_7d(context, start, week, user_key, intro))


def _check_cooldown(batch: Batch, brand_id: str, user_key: str, lo: datetime, hi: datetime) -> None:
    """Re-judge cooldown for every start in [lo, hi] against the sessions that ended before."""
    for start in store.starts(batch.conn, brand_id, user_key, lo, hi):
        context = batch.context(start.device_id)
        if context is None:
            continue
        long_s = context.thresholds.value("cooldown", "long_session_s")
        since = start.started_at - LONGEST_COOLDOWN
        ended = store.long_sessions_before(batch.conn, brand_id, user_key, start, since, long_s)
        batch.raise_(checks.cooldown(context, start, ended, user_key))


def _reboot(batch: Batch, context: DeviceContext, message: Reboot) -> None:
    if message.reason not in checks.UNEXPECTED_REBOOTS:
        return
    ts = from_ms(message.ts)
    store.store_reboot(batch.conn, context.device_id, message.seq, ts, message.reason.value)
    window = timedelta(seconds=context.thresholds.value("reboot_loop", "window_s"))
    around = store.reboots(batch.conn, context.device_id, ts - window, ts + window)
    for finding in checks.reboot_loops(context, ts, around):
        batch.raise_(finding)


def state(batch: Batch, context: DeviceContext, message: State) -> None:
    """Evaluate a device's state: its answer to a pushed table."""
    config = message.config
    if config is None:
        return
    for alert_id, version in store.unacked_alerts(batch.conn, context.device_id):
        if version <= config.version:
            batch.resolve(alert_id, f"the device answered table v{config.version}")
    batch.raise_(checks.config_rejected(context, message))


def presence(
    batch: Batch, context: DeviceContext, message: Presence, received_at: datetime
) -> None:
    """Evaluate a device's presence: coming online ends the silence an offline alert is about."""
    if not message.online:
        return
    # A device's clock after a long power loss may read 1970: such a time says nothing about
    # the silence (ingest's rule: a device time before receipt - CLOCK_PAST_LIMIT is suspect).
    sent = from_ms(message.ts) if message.ts is not None else None
    if sent is not None and sent < received_at - CLOCK_PAST_LIMIT:
        sent = None
    for alert_id, silent_since in store.offline_alerts(batch.conn, context.device_id):
        # A device's own online message older than the silence (from a backlog) does not end it.
        if sent is not None and sent <= silent_since:
            continue
        batch.resolve(alert_id, "the device came back online")
