"""Evaluating a batch of device messages against the catalogue, in one transaction.

The caller owns the transaction. For each device in the batch the engine takes a
transaction-scoped advisory lock (and one per user whose usage windows a session touches), so
two workers never evaluate the same device or user at once and each sees what the other
committed. It then stores what the windows need (samples, sessions, reboots: duplicates are
ignored by key) and re-evaluates every window the new data can change, including windows of
data that arrived earlier and lie later in event time. Occurrences are counted once by
:mod:`services.rules.alerts`, so the alerts depend on the messages, not on their order.
"""

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from psycopg import Cursor

from services.common.db import Conn
from services.common.protocol.enums import Channel, FaultCode, RebootReason, ReportKind
from services.common.protocol.models import (
    Event,
    Fault,
    Presence,
    Reboot,
    SessionEnd,
    SessionStart,
    State,
    Telemetry,
    UserReport,
)
from services.rules.alerts import Finding, Outcome, apply_finding, open_alerts, resolve
from services.rules.catalogue import Action, Severity
from services.rules.conditions import (
    MAX_GAP,
    SAMPLE_PERIOD_S,
    Bit,
    SampleIn,
    battery_rises,
    qualifying_runs,
    run_checks,
    sample_mask,
    window_s,
)
from services.rules.context import DeviceContext, load_contexts, load_user
from services.rules.timeutil import from_ms, limit_text, minutes_text, seconds_text

log = logging.getLogger(__name__)

DAY: Final = timedelta(days=1)
WEEK: Final = timedelta(days=7)
# How long after a session's start its battery reading counts as "at the start".
START_BATTERY_WINDOW: Final = timedelta(seconds=2)
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
LONGEST_COOLDOWN: Final = timedelta(hours=24)
SUSPECT_CLOCK: Final = timedelta(days=30)

DeviceMessage = Telemetry | Event | State | Presence


@dataclass(frozen=True)
class Received:
    """A valid message and where it came from."""

    device_id: str
    channel: Channel
    message: DeviceMessage
    received_at: datetime


@dataclass
class Batch:
    """One evaluation: the transaction's connection, the signing key, what was found."""

    conn: Conn
    key: Ed25519PrivateKey
    contexts: dict[str, DeviceContext]
    outcome: Outcome = field(default_factory=Outcome)
    # Devices whose no_contact alert this batch raised (it may clear within the batch).
    raised_no_contact: set[str] = field(default_factory=set)
    stages: dict[tuple[str, str], str] = field(default_factory=dict)

    def context(self, device_id: str) -> DeviceContext | None:
        """A device's context, loaded on first use (other devices of a user)."""
        if device_id not in self.contexts:
            self.contexts.update(load_contexts(self.conn, [device_id]))
        return self.contexts.get(device_id)

    def stage(self, brand_id: str, user_key: str) -> str:
        """The stage of the user a session counts for (``intro`` without a known user)."""
        kind, _, name = user_key.partition(":")
        if kind != "user":
            return "intro"
        if (brand_id, name) not in self.stages:
            self.stages[(brand_id, name)] = load_user(self.conn, brand_id, name).stage
        return self.stages[(brand_id, name)]

    def resolve(self, alert_id: int, resolution: str) -> None:
        """Resolve an alert whose condition cleared."""
        if resolve(self.conn, alert_id, resolution):
            self.outcome.resolved += 1

    def raise_(self, finding: Finding) -> None:
        context = self.context(finding.device_id)
        if context is None:
            return
        if finding.rule == "no_contact":
            self.raised_no_contact.add(finding.device_id)
        apply_finding(self.conn, self.key, context, finding, self.outcome)


def evaluate(conn: Conn, key: Ed25519PrivateKey, messages: Sequence[Received]) -> Outcome:
    """Evaluate ``messages`` in the caller's transaction; return what was raised and pushed."""
    device_ids = sorted({m.device_id for m in messages})
    with conn.pipeline():  # one round trip: the locks, then what the rules know of each device
        _lock(conn, [f"d:{device_id}" for device_id in device_ids])
        contexts = load_contexts(conn, device_ids)
    batch = Batch(conn, key, contexts)
    user_keys = set()
    ends = []
    for m in messages:
        context = batch.contexts.get(m.device_id)
        if context is None:
            continue
        if isinstance(m.message, SessionStart):
            user_keys.add(f"u:{context.brand_id}:{context.user_key(m.message.user)}")
        elif isinstance(m.message, SessionEnd):
            ends.append((m.device_id, m.message.session))
    if ends:
        # An end is judged under the user its start named (stored with the start).
        rows = conn.execute(
            "SELECT brand_id, user_key FROM rule_sessions"
            " WHERE (device_id, session) IN (SELECT * FROM unnest(%s::text[], %s::text[]))"
            " AND started_at IS NOT NULL",
            [[d for d, _ in ends], [s for _, s in ends]],
        ).fetchall()
        user_keys.update(f"u:{brand}:{user_key}" for brand, user_key in rows)
    # Users after devices, each set sorted: every worker locks in the same order.
    _lock(conn, sorted(user_keys))
    for device_id in device_ids:
        context = batch.contexts.get(device_id)
        mine = [m for m in messages if m.device_id == device_id]
        if context is None:
            log.debug("%d messages from unknown device %s", len(mine), device_id)
            continue
        for m in mine:
            if isinstance(m.message, State):
                _state(batch, context, m.message)
            elif isinstance(m.message, Presence):
                _presence(batch, context, m.message, m.received_at)
            elif not isinstance(m.message, Telemetry):
                _event(batch, context, m.message)
        telemetry = [m for m in mine if isinstance(m.message, Telemetry)]
        if telemetry:
            _telemetry(batch, context, telemetry)
    return batch.outcome


def _lock(conn: Conn, names: Sequence[str]) -> None:
    if names:
        conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended('galvani-rules:' || name, 0))"
            " FROM unnest(%s::text[]) WITH ORDINALITY AS n(name, i) ORDER BY i",
            [list(names)],
        )


# --- telemetry -----------------------------------------------------------------------------

SAMPLE_COLUMNS: Final = (
    "device_id, ts, session, mode, out, i_ua, i_set_ua, z_ohm, t_elec_c, t_batt_c, batt_pct,"
    " charging, mask"
)


def _telemetry(batch: Batch, context: DeviceContext, messages: Sequence[Received]) -> None:
    samples: dict[datetime, SampleIn] = {}
    received: dict[datetime, datetime] = {}
    for m in messages:
        assert isinstance(m.message, Telemetry)
        for raw in m.message.samples:
            sample = SampleIn(
                ts=from_ms(raw.ts),
                session=m.message.session,
                mode=raw.mode.value if raw.mode is not None else None,
                out=bool(raw.out),
                i_ua=raw.i_ua,
                i_set_ua=raw.i_set_ua,
                z_ohm=raw.z_ohm,
                t_elec_c=raw.t_elec_c,
                t_batt_c=raw.t_batt_c,
                batt_pct=raw.batt_pct,
                charging=bool(raw.charging),
            )
            mask = sample_mask(sample, context.modes, context.thresholds)
            samples.setdefault(sample.ts, _with_mask(sample, mask))
            received.setdefault(sample.ts, m.received_at)
    candidates = list(samples.values())
    mask = 0
    for sample in candidates:
        mask |= sample.mask
    margin = timedelta(seconds=window_s(context.thresholds, mask))
    lo, hi = min(samples) - margin, max(samples) + margin
    sessions = sorted({s.session for s in candidates if s.session is not None})
    # One round trip: store (duplicates ignored), then read the window around the new samples
    # (this statement sees the insert) and what is known of their sessions.
    with batch.conn.pipeline():
        stored = _store_samples(batch.conn, context.device_id, candidates, received)
        loaded = _load_samples(batch.conn, context.device_id, lo, hi)
        infos = {s: _session_info(batch.conn, context.device_id, s) for s in sessions}
    new = {row[0] for row in stored.fetchall()}
    if not new:
        return
    fresh = [samples[ts] for ts in sorted(new)]
    mask = 0
    for sample in fresh:
        mask |= sample.mask
    window = [SampleIn(*row[1:]) for row in loaded.fetchall()]
    for check in run_checks(context.thresholds):
        if not mask & check.bit:
            continue
        for run in qualifying_runs(window, check, new):
            batch.raise_(_run_finding(context, check.rule, check.variant, run, check))
    limit = context.thresholds.value("battery_overtemp", "rise_c_per_s")
    for rise in battery_rises(window, limit, new):
        batch.raise_(
            Finding(
                rule="battery_overtemp",
                variant="rising",
                device_id=context.device_id,
                severity=Severity.CRITICAL,
                action=Action.LOCK_DEVICE,
                started_at=rise.before.ts,
                ended_at=rise.after.ts,
                threshold={"rise_c_per_s": limit},
                observed={
                    "rise_c_per_s": round(rise.rate_c_per_s, 2),
                    "t_batt_c": rise.after.t_batt_c,
                },
                text=(
                    f"The battery warmed {rise.rate_c_per_s:.1f} °C per second "
                    f"(to {rise.after.t_batt_c:.1f} °C), faster than the {limit:g} °C/s limit."
                ),
                session=rise.after.session,
            )
        )
    for session in sorted({s.session for s in fresh if s.session is not None}):
        mine = [s for s in fresh if s.session == session]
        if any(s.mask & Bit.NO_GEL for s in mine):
            _check_no_gel(batch, context, session)
        info = _info(infos[session])
        outs = [s.ts for s in mine if s.out]
        if outs:
            _check_overrun(batch, context, session, info, max(outs))
        batteries = [s.batt_pct for s in mine if s.batt_pct is not None and info.in_start(s.ts)]
        if batteries:
            _check_low_battery_start(batch, context, session, info, min(batteries))
    maybe_open = context.open_no_contact or context.device_id in batch.raised_no_contact
    if maybe_open and any(s.out and not s.mask & Bit.NO_CONTACT for s in fresh):
        _resolve_no_contact_by_samples(batch, context)


def _with_mask(sample: SampleIn, mask: int) -> SampleIn:
    return SampleIn(
        sample.ts,
        sample.session,
        sample.mode,
        sample.out,
        sample.i_ua,
        sample.i_set_ua,
        sample.z_ohm,
        sample.t_elec_c,
        sample.t_batt_c,
        sample.batt_pct,
        sample.charging,
        mask,
    )


def _store_samples(
    conn: Conn, device_id: str, samples: Sequence[SampleIn], received: Mapping[datetime, datetime]
) -> Cursor:
    """Insert the samples not stored yet; the cursor returns the times of those that were new."""
    return conn.execute(
        f"INSERT INTO rule_samples ({SAMPLE_COLUMNS}, received_at)"  # noqa: S608 - constant
        " SELECT %s, * FROM unnest(%s::timestamptz[], %s::text[], %s::text[], %s::boolean[],"
        " %s::real[], %s::real[], %s::real[], %s::real[], %s::real[], %s::smallint[],"
        " %s::boolean[], %s::integer[], %s::timestamptz[])"
        " ON CONFLICT (device_id, ts) DO NOTHING RETURNING ts",
        [
            device_id,
            [s.ts for s in samples],
            [s.session for s in samples],
            [s.mode for s in samples],
            [s.out for s in samples],
            [s.i_ua for s in samples],
            [s.i_set_ua for s in samples],
            [s.z_ohm for s in samples],
            [s.t_elec_c for s in samples],
            [s.t_batt_c for s in samples],
            [s.batt_pct for s in samples],
            [s.charging for s in samples],
            [s.mask for s in samples],
            [received[s.ts] for s in samples],
        ],
    )


def _load_samples(conn: Conn, device_id: str, lo: datetime, hi: datetime) -> Cursor:
    """The stored samples of a device between ``lo`` and ``hi``, in time order."""
    return conn.execute(
        f"SELECT {SAMPLE_COLUMNS} FROM rule_samples"  # noqa: S608 - constant columns
        " WHERE device_id = %s AND ts BETWEEN %s AND %s ORDER BY ts",
        [device_id, lo, hi],
    )


RUN_TEXT: Final = {
    "overcurrent": "The output current reached {peak_i:.0f} µA",
    "short_circuit": "The electrodes read {low_z:.0f} Ω, a short circuit,",
    "no_contact": "The device lost skin contact with output on",
    "regulation_drift": "The output current drifted from its setpoint",
    "electrode_overtemp": "The electrode reached {peak_t_elec:.1f} °C",
    "battery_overtemp": "The battery reached {peak_t_batt:.1f} °C",
    "output_while_charging": "The device delivered output while charging",
}


def _run_finding(context: DeviceContext, rule: str, variant: str, run: Any, check: Any) -> Finding:
    samples: Sequence[SampleIn] = run.samples
    currents = [s.i_ua for s in samples if s.i_ua is not None]
    impedances = [s.z_ohm for s in samples if s.z_ohm is not None]
    t_elec = [s.t_elec_c for s in samples if s.t_elec_c is not None]
    t_batt = [s.t_batt_c for s in samples if s.t_batt_c is not None]
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
    mode = samples[0].mode
    threshold = _run_threshold(context, rule, variant, mode)
    if check.duration_s is not None:
        threshold["more_than_s"] = check.duration_s
    text = RUN_TEXT[rule].format(
        peak_i=max(currents, default=0.0),
        low_z=min(impedances, default=0.0),
        peak_t_elec=max(t_elec, default=0.0),
        peak_t_batt=max(t_batt, default=0.0),
    )
    limit = _limit_text(rule, variant, threshold)
    duration = f" for {seconds_text(run.span_s)}" if run.span_s > 0 else ""
    return Finding(
        rule=rule,
        variant=variant,
        device_id=context.device_id,
        severity=check.severity,
        action=check.action,
        started_at=run.start,
        ended_at=run.end,
        threshold=threshold,
        observed=observed,
        text=f"{text}{duration}{limit}.",
        session=samples[0].session,
    )


def _run_threshold(
    context: DeviceContext, rule: str, variant: str, mode: str | None
) -> dict[str, Any]:
    t = context.thresholds
    spec = context.modes.get(mode) if mode is not None else None
    if rule == "overcurrent":
        if variant == "absolute":
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
        name = "critical_c" if variant == "critical" else "warning_c"
        return {"t_elec_above_c": t.value(rule, name)}
    if rule == "battery_overtemp":
        return {"t_batt_above_c": t.value(rule, "max_c")}
    return {}


def _limit_text(rule: str, variant: str, threshold: Mapping[str, Any]) -> str:
    if rule == "overcurrent" and threshold.get("i_ua") is not None:
        return f", above the {threshold['i_ua']:.0f} µA limit"
    if rule == "short_circuit":
        return f" (limit: below {threshold['z_below_ohm']:.0f} Ω for over 1 s)"
    if rule == "electrode_overtemp":
        return f", above the {threshold['t_elec_above_c']:g} °C limit"
    if rule == "battery_overtemp":
        return f", above the {threshold['t_batt_above_c']:g} °C limit"
    if rule == "regulation_drift":
        return f" by more than {threshold['off_setpoint_fraction']:.0%}"
    return ""


def _check_no_gel(batch: Batch, context: DeviceContext, session: str) -> None:
    row = batch.conn.execute(
        "SELECT count(*), min(ts), max(ts), max(z_ohm) FROM rule_samples"
        " WHERE device_id = %s AND session = %s AND mask & %s <> 0",
        [context.device_id, session, int(Bit.NO_GEL)],
    ).fetchone()
    assert row is not None
    count, first, last, z_high = row
    total_s = int(str(count)) * SAMPLE_PERIOD_S
    limit = context.thresholds.value("no_gel", "total_s")
    if total_s <= limit + 1e-9:
        return
    z_low = context.thresholds.value("no_gel", "z_low_ohm")
    batch.raise_(
        Finding(
            rule="no_gel",
            device_id=context.device_id,
            severity=Severity.WARNING,
            action=Action.ALERT,
            started_at=first,  # type: ignore[arg-type]
            ended_at=last,  # type: ignore[arg-type]
            threshold={"z_ohm": [z_low, context.thresholds.value("no_contact", "z_ohm")]},
            observed={"seconds": round(total_s, 1), "samples": count, "high_z_ohm": z_high},
            text=(
                f"The electrodes read {z_low / 1000:g} to 200 kΩ, dry skin with no gel, for "
                f"{seconds_text(total_s)} of this session (limit {seconds_text(limit)})."
            ),
            key=session,
            session=session,
        )
    )


@dataclass(frozen=True)
class SessionInfo:
    """What the rules know of a session's start: its event (if seen) and its first sample."""

    event_start: datetime | None
    event_mode: str | None
    first_sample: datetime | None
    sample_mode: str | None

    @property
    def started_at(self) -> datetime | None:
        """The start event's time, else the first sample's."""
        return self.event_start or self.first_sample

    @property
    def mode(self) -> str | None:
        return self.event_mode or self.sample_mode

    def in_start(self, ts: datetime) -> bool:
        """Whether ``ts`` is within the first moments after the start event."""
        start = self.event_start
        return start is not None and start <= ts <= start + START_BATTERY_WINDOW


def _session_info(conn: Conn, device_id: str, session: str) -> Cursor:
    """A cursor with one row: the fields of :class:`SessionInfo`."""
    return conn.execute(
        "SELECT s.started_at, s.mode, first.ts, first.mode"
        " FROM (SELECT 1) one"
        " LEFT JOIN rule_sessions s ON s.device_id = %s AND s.session = %s"
        " LEFT JOIN LATERAL (SELECT ts, mode FROM rule_samples r"
        "   WHERE r.device_id = %s AND r.session = %s ORDER BY ts LIMIT 1) first ON true",
        [device_id, session, device_id, session],
    )


def _info(cursor: Cursor) -> SessionInfo:
    row = cursor.fetchone()
    assert row is not None  # one row whatever is known
    return SessionInfo(*row)


def _check_overrun(
    batch: Batch, context: DeviceContext, session: str, info: SessionInfo, last_out: datetime
) -> None:
    """Raise session_overrun if output at ``last_out`` was on past the cap and grace."""
    started, mode = info.started_at, info.mode
    if started is None or mode is None or mode not in context.modes:
        return
    cap = int(context.modes[mode]["session_cap_s"])
    grace = context.thresholds.value("session_overrun", "grace_s")
    past_cap = (last_out - started).total_seconds() - cap
    if past_cap <= grace:
        return
    batch.raise_(
        Finding(
            rule="session_overrun",
            device_id=context.device_id,
            severity=Severity.CRITICAL,
            action=Action.PUSH_SAFE,
            started_at=started,
            ended_at=last_out,
            threshold={"session_cap_s": cap, "grace_s": grace, "mode": mode},
            observed={"output_s_past_cap": round(past_cap, 1)},
            text=(
                f"The device ran {seconds_text(past_cap)} past its {limit_text(cap)} limit "
                f"for {mode}."
            ),
            key=session,
            session=session,
        )
    )


def _check_low_battery_start(
    batch: Batch, context: DeviceContext, session: str, info: SessionInfo, batt_pct: int
) -> None:
    """Raise low_battery_start if the battery read ``batt_pct`` as the session started."""
    if info.event_start is None or info.mode is None:
        return
    spec = context.modes.get(info.mode)
    override = context.thresholds.get("low_battery_start", "min_batt_pct")
    minimum = override if override is not None else spec["min_batt_pct"] if spec else None
    if minimum is None or batt_pct >= minimum:
        return
    batch.raise_(
        Finding(
            rule="low_battery_start",
            device_id=context.device_id,
            severity=Severity.WARNING,
            action=Action.ALERT,
            started_at=info.event_start,
            ended_at=info.event_start,
            threshold={"min_batt_pct": minimum, "mode": info.mode},
            observed={"batt_pct": batt_pct},
            text=(
                f"A {info.mode} session started with the battery at {batt_pct} %, below the "
                f"{minimum:g} % minimum."
            ),
            key=session,
            session=session,
        )
    )


def _check_session_so_far(batch: Batch, context: DeviceContext, session: str) -> None:
    """Judge the samples already stored for a session whose start event just arrived."""
    info = _info(_session_info(batch.conn, context.device_id, session))
    if info.event_start is None:
        return
    row = batch.conn.execute(
        "SELECT max(ts) FILTER (WHERE out),"
        " min(batt_pct) FILTER (WHERE ts BETWEEN %s AND %s)"
        " FROM rule_samples WHERE device_id = %s AND session = %s",
        [info.event_start, info.event_start + START_BATTERY_WINDOW, context.device_id, session],
    ).fetchone()
    assert row is not None
    last_out, low_batt = row
    if isinstance(last_out, datetime):
        _check_overrun(batch, context, session, info, last_out)
    if low_batt is not None:
        _check_low_battery_start(batch, context, session, info, int(str(low_batt)))


def _resolve_no_contact_by_samples(batch: Batch, context: DeviceContext) -> None:
    for alert_id, ended in open_alerts(batch.conn, context.device_id, "no_contact"):
        row = batch.conn.execute(
            "SELECT min(ts) FROM rule_samples WHERE device_id = %s AND ts > %s AND out"
            " AND mask & %s = 0",
            [context.device_id, ended + MAX_GAP, int(Bit.NO_CONTACT)],
        ).fetchone()
        if row is not None and row[0] is not None:
            batch.resolve(alert_id, f"contact regained at {_iso(row[0])}")  # type: ignore[arg-type]


# --- events --------------------------------------------------------------------------------


def _event(batch: Batch, context: DeviceContext, event: Event) -> None:
    if isinstance(event, SessionStart):
        _session_started(batch, context, event)
    elif isinstance(event, SessionEnd):
        _session_ended(batch, context, event)
    elif isinstance(event, Reboot):
        _reboot(batch, context, event)
    elif isinstance(event, UserReport):
        _user_report(batch, context, event)
    elif isinstance(event, Fault):
        _fault(batch, context, event)


@dataclass(frozen=True)
class StartRow:
    device_id: str
    session: str
    mode: str | None
    started_at: datetime
    duration_s: int | None  # from the session's end, when it has arrived


def _session_started(batch: Batch, context: DeviceContext, event: SessionStart) -> None:
    user_key = context.user_key(event.user)
    started = from_ms(event.ts)
    row = batch.conn.execute(
        "INSERT INTO rule_sessions (device_id, session, brand_id, user_key, mode, level,"
        " started_at) VALUES (%s, %s, %s, %s, %s, %s, %s)"
        " ON CONFLICT (device_id, session) DO UPDATE SET user_key = EXCLUDED.user_key,"
        " mode = EXCLUDED.mode, level = EXCLUDED.level, started_at = EXCLUDED.started_at"
        " RETURNING ended_at",
        [
            context.device_id,
            event.session,
            context.brand_id,
            user_key,
            event.mode.value,
            event.level,
            started,
        ],
    ).fetchone()
    assert row is not None
    _check_usage(batch, context.brand_id, user_key, started, started + WEEK)
    _check_cooldown(batch, context.brand_id, user_key, started, started)
    ended = row[0]
    if isinstance(ended, datetime):
        # Its end arrived first and was left unjudged: judge the starts that followed it.
        _check_cooldown(batch, context.brand_id, user_key, ended, ended + LONGEST_COOLDOWN)
    _check_session_so_far(batch, context, event.session)
    user = load_user(batch.conn, context.brand_id, event.user) if event.user else context.user
    if user.contraindications:
        flags = ", ".join(user.contraindications)
        batch.raise_(
            Finding(
                rule="contraindicated_use",
                device_id=context.device_id,
                severity=Severity.CRITICAL,
                action=Action.LOCK_USER_DEVICES,
                started_at=started,
                ended_at=started,
                threshold={"contraindications": list(user.contraindications)},
                observed={"user": event.user or context.user_id, "mode": event.mode.value},
                text=(
                    f"A {event.mode.value} session started for a user flagged with "
                    f"{flags}, who must not use the device."
                ),
                key=event.session,
                session=event.session,
                user_key=user_key,
            )
        )


def _session_ended(batch: Batch, context: DeviceContext, event: SessionEnd) -> None:
    ended = from_ms(event.ts)
    row = batch.conn.execute(
        "INSERT INTO rule_sessions (device_id, session, brand_id, user_key, ended_at,"
        " duration_s, end_reason) VALUES (%s, %s, %s, %s, %s, %s, %s)"
        " ON CONFLICT (device_id, session) DO UPDATE SET ended_at = EXCLUDED.ended_at,"
        " duration_s = EXCLUDED.duration_s, end_reason = EXCLUDED.end_reason"
        " RETURNING user_key, started_at",
        [
            context.device_id,
            event.session,
            context.brand_id,
            context.user_key(),
            ended,
            event.duration_s,
            event.reason.value,
        ],
    ).fetchone()
    assert row is not None
    user_key, started = str(row[0]), row[1]
    start = (
        started if isinstance(started, datetime) else ended - timedelta(seconds=event.duration_s)
    )
    _check_usage(batch, context.brand_id, user_key, start, start + WEEK)
    _check_cooldown(batch, context.brand_id, user_key, ended, ended + LONGEST_COOLDOWN)
    for alert_id, last in open_alerts(batch.conn, context.device_id, "no_contact"):
        if last <= ended:
            batch.resolve(alert_id, f"session {event.session} ended ({event.reason.value})")


def _starts(conn: Conn, brand_id: str, user_key: str, lo: datetime, hi: datetime) -> list[StartRow]:
    rows = conn.execute(
        "SELECT device_id, session, mode, started_at, duration_s FROM rule_sessions"
        " WHERE brand_id = %s AND user_key = %s AND started_at BETWEEN %s AND %s"
        " ORDER BY started_at, device_id, session",
        [brand_id, user_key, lo, hi],
    ).fetchall()
    return [StartRow(str(r[0]), str(r[1]), r[2], r[3], r[4]) for r in rows]  # type: ignore[arg-type]


def _check_usage(batch: Batch, brand_id: str, user_key: str, lo: datetime, hi: datetime) -> None:
    """Re-judge overuse for every start whose window can include something in [lo, hi]."""
    # One read: the starts to judge ([lo, hi]) and the week before each of them.
    history = _starts(batch.conn, brand_id, user_key, lo - WEEK, hi)
    for start in (s for s in history if s.started_at >= lo):
        context = batch.context(start.device_id)
        if context is None:
            continue
        day = [s for s in history if start.started_at - DAY < s.started_at <= start.started_at]
        week = [s for s in history if start.started_at - WEEK < s.started_at <= start.started_at]
        _judge_24h(batch, context, start, day, user_key)
        _judge_7d(batch, context, start, week, user_key)


def _judge_24h(
    batch: Batch, context: DeviceContext, start: StartRow, day: list[StartRow], user_key: str
) -> None:
    override = context.thresholds.get("overuse_24h", "max_sessions")
    spec = context.modes.get(start.mode) if start.mode is not None else None
    limit = override if override is not None else spec["max_sessions_24h"] if spec else None
    if limit is None or len(day) <= limit:
        return
    batch.raise_(
        Finding(
            rule="overuse_24h",
            device_id=start.device_id,
            severity=Severity.WARNING,
            action=Action.ALERT,
            started_at=day[0].started_at,
            ended_at=start.started_at,
            threshold={"max_sessions_24h": limit},
            observed={"sessions": len(day), "sessions_in_window": [s.session for s in day]},
            text=(
                f"This is the {_ordinal(len(day))} session in 24 hours; the limit is "
                f"{limit:g} a day."
            ),
            key=start.session,
            session=start.session,
            user_key=user_key,
        )
    )


def _judge_7d(
    batch: Batch,
    context: DeviceContext,
    start: StartRow,
    week: list[StartRow],
    user_key: str,
) -> None:
    t = context.thresholds
    intro = batch.stage(context.brand_id, user_key) == "intro"
    limit = t.value("overuse_7d", "max_sessions_intro" if intro else "max_sessions")
    minutes = sum(s.duration_s or 0 for s in week) / 60
    max_minutes = t.value("overuse_7d", "max_output_min")
    reasons = []
    if len(week) > limit:
        reasons.append(f"{len(week)} sessions in 7 days (limit {limit:g})")
    if minutes > max_minutes:
        reasons.append(f"{minutes:.0f} output-minutes in 7 days (limit {max_minutes:g})")
    if not reasons:
        return
    batch.raise_(
        Finding(
            rule="overuse_7d",
            device_id=start.device_id,
            severity=Severity.WARNING,
            action=Action.ALERT,
            started_at=week[0].started_at,
            ended_at=start.started_at,
            threshold={"max_sessions_7d": limit, "max_output_min": max_minutes, "intro": intro},
            observed={"sessions": len(week), "output_min": round(minutes, 1)},
            text=f"The user reached {' and '.join(reasons)}.",
            key=start.session,
            session=start.session,
            user_key=user_key,
        )
    )


def _check_cooldown(batch: Batch, brand_id: str, user_key: str, lo: datetime, hi: datetime) -> None:
    """Re-judge cooldown for every start in [lo, hi] against the sessions that ended before."""
    for start in _starts(batch.conn, brand_id, user_key, lo, hi):
        context = batch.context(start.device_id)
        if context is None:
            continue
        long_s = context.thresholds.value("cooldown", "long_session_s")
        rows = batch.conn.execute(
            "SELECT session, mode, ended_at, duration_s FROM rule_sessions"
            " WHERE brand_id = %s AND user_key = %s AND ended_at <= %s AND ended_at > %s"
            " AND duration_s > %s AND started_at IS NOT NULL"
            " AND NOT (device_id = %s AND session = %s)"
            " ORDER BY ended_at DESC",
            [
                brand_id,
                user_key,
                start.started_at,
                start.started_at - LONGEST_COOLDOWN,
                long_s,
                start.device_id,
                start.session,
            ],
        ).fetchall()
        for session, mode, ended, duration in rows:
            spec = context.modes.get(str(mode)) if mode is not None else None
            cooldown = int(spec["cooldown_s"]) if spec is not None else 0
            assert isinstance(ended, datetime)
            gap = (start.started_at - ended).total_seconds()
            if gap >= cooldown:
                continue
            batch.raise_(
                Finding(
                    rule="cooldown",
                    device_id=start.device_id,
                    severity=Severity.INFO,
                    action=Action.ALERT,
                    started_at=ended,
                    ended_at=start.started_at,
                    threshold={"cooldown_s": cooldown, "long_session_s": long_s},
                    observed={
                        "gap_s": round(gap),
                        "previous_session": session,
                        "previous_duration_s": duration,
                    },
                    text=(
                        f"A session started {minutes_text(gap)} after a "
                        f"{minutes_text(float(str(duration)))} session ended; the {mode} "
                        f"cooldown is {minutes_text(cooldown)}."
                    ),
                    key=start.session,
                    session=start.session,
                    user_key=user_key,
                )
            )
            break


def _reboot(batch: Batch, context: DeviceContext, event: Reboot) -> None:
    if event.reason not in UNEXPECTED_REBOOTS:
        return
    ts = from_ms(event.ts)
    batch.conn.execute(
        "INSERT INTO rule_reboots (device_id, seq, ts, reason) VALUES (%s, %s, %s, %s)"
        " ON CONFLICT DO NOTHING",
        [context.device_id, event.seq, ts, event.reason.value],
    )
    t = context.thresholds
    needed = int(t.value("reboot_loop", "count"))
    window = timedelta(seconds=t.value("reboot_loop", "window_s"))
    rows = batch.conn.execute(
        "SELECT seq, ts, reason FROM rule_reboots WHERE device_id = %s AND ts BETWEEN %s AND %s"
        " ORDER BY ts, seq",
        [context.device_id, ts - window, ts + window],
    ).fetchall()
    reboots = [(int(str(r[0])), r[1], str(r[2])) for r in rows]
    for seq, at, _ in reboots:
        if not ts <= at <= ts + window:  # type: ignore[operator]
            continue
        recent = [r for r in reboots if at - window <= r[1] <= at]  # type: ignore[operator]
        if len(recent) < needed:
            continue
        reasons = ", ".join(r[2] for r in recent)
        batch.raise_(
            Finding(
                rule="reboot_loop",
                device_id=context.device_id,
                severity=Severity.CRITICAL,
                action=Action.PUSH_SAFE,
                started_at=recent[0][1],  # type: ignore[arg-type]
                ended_at=at,  # type: ignore[arg-type]
                threshold={"count": needed, "window_s": window.total_seconds()},
                observed={"reboots": len(recent), "reasons": [r[2] for r in recent]},
                text=(
                    f"The device rebooted unexpectedly {len(recent)} times in "
                    f"{minutes_text(window.total_seconds())} ({reasons})."
                ),
                key=f"reboot:{seq}",
            )
        )


def _user_report(batch: Batch, context: DeviceContext, event: UserReport) -> None:
    if event.kind not in (ReportKind.BURN, ReportKind.REDNESS):
        return
    burn = event.kind is ReportKind.BURN
    ts = from_ms(event.ts)
    batch.raise_(
        Finding(
            rule="adverse_report",
            variant=event.kind.value,
            device_id=context.device_id,
            severity=Severity.CRITICAL if burn else Severity.WARNING,
            action=Action.LOCK_DEVICE if burn else Action.ALERT,
            started_at=ts,
            ended_at=ts,
            threshold={"kinds": ["burn", "redness"]},
            observed={"kind": event.kind.value, "note": event.note},
            text=f"The user reported {'a burn' if burn else 'redness'} after using the device.",
            key=f"report:{event.seq}",
        )
    )


def _fault(batch: Batch, context: DeviceContext, event: Fault) -> None:
    critical = event.code in CRITICAL_FAULTS
    ts = from_ms(event.ts)
    batch.raise_(
        Finding(
            rule="device_fault",
            variant=event.code.value,
            device_id=context.device_id,
            severity=Severity.CRITICAL if critical else Severity.WARNING,
            action=Action.PUSH_SAFE if critical else Action.ALERT,
            started_at=ts,
            ended_at=ts,
            threshold={"critical_codes": sorted(c.value for c in CRITICAL_FAULTS)},
            observed={"code": event.code.value, "detail": event.detail},
            text=f"The device reported a {event.code.value.replace('_', ' ')} fault.",
            key=f"fault:{event.seq}",
        )
    )


# --- state and presence --------------------------------------------------------------------


def _state(batch: Batch, context: DeviceContext, state: State) -> None:
    config = state.config
    if config is None:
        return
    for alert_id, version in _unacked_alerts(batch.conn, context.device_id):
        if version <= config.version:
            batch.resolve(alert_id, f"the device answered table v{config.version}")
    if config.reason is None or config.status.value != "rejected":
        return
    ts = from_ms(state.ts)
    batch.raise_(
        Finding(
            rule="config_rejected",
            device_id=context.device_id,
            severity=Severity.WARNING,
            action=Action.ALERT,
            started_at=ts,
            ended_at=ts,
            threshold={},
            observed={"version": config.version, "reason": config.reason.value},
            text=(
                f"The device rejected mode table v{config.version} "
                f"({config.reason.value.replace('_', ' ')})."
            ),
            key=f"v{config.version}",
        )
    )


def _unacked_alerts(conn: Conn, device_id: str) -> list[tuple[int, int]]:
    rows = conn.execute(
        "SELECT a.id, max(substr(t.key, 2)::bigint) FROM alerts a"
        " JOIN alert_triggers t ON t.alert_id = a.id"
        " WHERE a.device_id = %s AND a.rule = 'config_unacked' AND a.state <> 'resolved'"
        " GROUP BY a.id",
        [device_id],
    ).fetchall()
    return [(int(str(r[0])), int(str(r[1]))) for r in rows]


def _presence(
    batch: Batch, context: DeviceContext, presence: Presence, received_at: datetime
) -> None:
    if not presence.online:
        return
    # A device's clock after a long power loss may read 1970: such a time says nothing about
    # the silence (ingest's rule: more than 30 days before receipt is suspect).
    sent = from_ms(presence.ts) if presence.ts is not None else None
    if sent is not None and sent < received_at - SUSPECT_CLOCK:
        sent = None
    rows = batch.conn.execute(
        "SELECT id, first_seen FROM alerts WHERE device_id = %s AND rule = 'offline'"
        " AND state <> 'resolved'",
        [context.device_id],
    ).fetchall()
    for alert_id, silent_since in rows:
        # A device's own online message older than the silence (from a backlog) does not end it.
        if sent is not None and sent <= silent_since:  # type: ignore[operator]
            continue
        batch.resolve(int(str(alert_id)), "the device came back online")


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")
