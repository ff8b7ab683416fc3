"""Telemetry: store a device's new samples, re-read the window around them, run the checks.

Samples are keyed by ``(device_id, ts)``, so only samples not stored before are judged, and
every run they belong to is judged whole: the window read back reaches as far as the longest
run a new sample's conditions can be part of.
"""

from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timedelta

from services.common.protocol.models import Telemetry
from services.rules.alerts import open_alerts
from services.rules.conditions import MAX_GAP, Bit, SampleIn, battery_rises, sample_mask, window_s
from services.rules.context import DeviceContext
from services.rules.engine import checks, store
from services.rules.engine.batch import Batch
from services.rules.explain import iso
from services.rules.timeutil import from_ms


def telemetry(
    batch: Batch, context: DeviceContext, messages: Sequence[tuple[Telemetry, datetime]]
) -> None:
    """Evaluate a device's telemetry messages (each with its receipt time)."""
    samples: dict[datetime, SampleIn] = {}
    received: dict[datetime, datetime] = {}
    for message, received_at in messages:
        for raw in message.samples:
            sample = SampleIn(
                ts=from_ms(raw.ts),
                session=message.session,
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
            samples.setdefault(sample.ts, replace(sample, mask=mask))
            received.setdefault(sample.ts, received_at)
    candidates = list(samples.values())
    margin = timedelta(seconds=window_s(context.thresholds, _mask_of(candidates)))
    lo, hi = min(samples) - margin, max(samples) + margin
    sessions = sorted({s.session for s in candidates if s.session is not None})
    # One round trip: store (duplicates ignored), then read the window around the new samples
    # (this statement sees the insert) and what is known of their sessions.
    conn = batch.conn
    with conn.pipeline():
        stored = store.store_samples(conn, context.device_id, candidates, received)
        loaded = store.load_samples(conn, context.device_id, lo, hi)
        infos = {s: store.session_info(conn, context.device_id, s) for s in sessions}
    new = set(stored.fetchall())
    if not new:
        return
    fresh = [samples[ts] for ts in sorted(new)]
    window = loaded.fetchall()
    for finding in checks.run_findings(context, window, new, _mask_of(fresh)):
        batch.raise_(finding)
    limit = context.thresholds.value("battery_overtemp", "rise_c_per_s")
    for rise in battery_rises(window, limit, new):
        batch.raise_(checks.battery_rising(context, rise, limit))
    for session in sorted({s.session for s in fresh if s.session is not None}):
        mine = [s for s in fresh if s.session == session]
        if any(s.mask & Bit.NO_GEL for s in mine):
            total = store.no_gel_total(conn, context.device_id, session)
            batch.raise_(checks.no_gel(context, session, total))
        info = store.one(infos[session])
        outs = [s.ts for s in mine if s.out]
        if outs:
            batch.raise_(checks.session_overrun(context, session, info, max(outs)))
        batteries = [s.batt_pct for s in mine if s.batt_pct is not None and info.in_start(s.ts)]
        if batteries:
            batch.raise_(checks.low_battery_start(context, session, info, min(batteries)))
    maybe_open = context.open_no_contact or context.device_id in batch.raised_no_contact
    if maybe_open and any(s.out and not s.mask & Bit.NO_CONTACT for s in fresh):
        _resolve_no_contact(batch, context)


def session_so_far(batch: Batch, context: DeviceContext, session: str) -> None:
    """Judge the samples already stored for a session whose start event just arrived."""
    info = store.one(store.session_info(batch.conn, context.device_id, session))
    if info.event_start is None:
        return
    so_far = store.session_so_far(batch.conn, context.device_id, session, info.event_start)
    if so_far.last_out is not None:
        batch.raise_(checks.session_overrun(context, session, info, so_far.last_out))
    if so_far.low_batt is not None:
        batch.raise_(checks.low_battery_start(context, session, info, so_far.low_batt))


def _resolve_no_contact(batch: Batch, context: DeviceContext) -> None:
    """Resolve no_contact alerts once a later sample has output on and skin contact."""
    for alert_id, ended in open_alerts(batch.conn, context.device_id, "no_contact"):
        regained = store.first_contact_after(batch.conn, context.device_id, ended + MAX_GAP)
        if regained is not None:
            batch.resolve(alert_id, f"contact regained at {iso(regained)}")


def _mask_of(samples: Sequence[SampleIn]) -> int:
    mask = 0
    for sample in samples:
        mask |= sample.mask
    return mask
