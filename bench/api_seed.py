"""The data set ``make bench-api`` measures against, written by binary COPY.

A plan (who uses which device when, with which mode and level) is drawn first from one seed,
so it is the same on every run with the same parameters. Then:

* brands, users and devices (``write_row`` with ``set_types``);
* samples: one process per core, each taking every other day, encodes rows straight into
  PostgreSQL's binary COPY format with ``struct`` (one ``pack`` per sample) and writes a
  session at a time, a day per transaction;
* sessions, ``session_start``/``session_end`` events and alerts (``write_row``);
* rollups by the maintenance job (``services.maintenance.jobs.run_pass``), one pass per day
  of data as the live job would have done it, the last one a few minutes before the end so
  the newest minutes are read raw, as in production between two passes;
* ``VACUUM (ANALYZE)``.
"""

import json
import multiprocessing
import random
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, cast

import psycopg

from services.maintenance.jobs import run_pass
from services.rules.catalogue import RULES, Rule

BRAND: Final = "bench"
RIVAL: Final = "rival"
MODES: Final = ("LIFT", "TIGHTEN", "INFUSE")
MODELS: Final = ("GV-1", "GV-2")
FIRMWARE: Final = ("1.4.2", "1.5.0", "1.5.1")
# Setpoint per level (µA) by mode: LIFT drives hardest, INFUSE softest.
SETPOINT_UA: Final = {"LIFT": (60.0, 45.0), "TIGHTEN": (50.0, 40.0), "INFUSE": (40.0, 30.0)}
SAMPLE_US: Final = 100_000  # 10 Hz
SAMPLES_PER_MESSAGE: Final = 10
PAUSE_EVERY: Final = 600  # output pauses 2 s every minute (the user moves the electrode)
PAUSE_SAMPLES: Final = 20
RAMP_SAMPLES: Final = 10  # output off for the first second
GEL_BAND_OHM: Final = (1_000.0, 20_000.0)
PG_EPOCH: Final = datetime(2000, 1, 1, tzinfo=UTC)
COPY_HEADER: Final = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0)
COPY_TRAILER: Final = struct.pack("!h", -1)
SAMPLE_COLUMNS: Final = (
    "device_id, ts, seq, session, mode, level, out, i_ua, i_set_ua, v_v, z_ohm, t_elec_c,"
    " t_batt_c, batt_pct, charging, received_at, ts_suspect"
)
# The last maintenance pass runs this long before the data ends: the newest minutes are
# read from raw samples, as they are live between two passes (interval 60 s by default).
LAST_PASS_BEFORE_END: Final = timedelta(minutes=3)
PROGRESS_EVERY_S: Final = 15.0

SayFn = Callable[[str], None]


@dataclass(frozen=True)
class SeedParams:
    """What the data set is made of; the cache is keyed by these."""

    devices: int
    active_devices: int
    sessions_min: int
    sessions_max: int
    days: int
    rival_devices: int
    open_alerts: int
    resolved_alerts: int
    seed: int


@dataclass(frozen=True)
class PlannedSession:
    """One session of one device, everything a worker needs to write its samples."""

    device: str
    brand: str
    user: str
    session: str
    mode: str
    level: int
    start_us: int  # since 2000-01-01 UTC (PostgreSQL's epoch)
    samples: int
    seq0: int  # session_start event; messages seq0+1..; session_end after them
    batt0: int
    z0: float
    dry_from: int  # a dry stretch (impedance above the gel band), -1 for none
    dry_len: int

    @property
    def messages(self) -> int:
        return -(-self.samples // SAMPLES_PER_MESSAGE)

    @property
    def end_us(self) -> int:
        return self.start_us + self.samples * SAMPLE_US

    def out(self, k: int) -> bool:
        """Whether output is on at sample ``k``."""
        return k >= RAMP_SAMPLES and k % PAUSE_EVERY >= PAUSE_SAMPLES

    def out_samples(self) -> int:
        return sum(1 for k in range(self.samples) if self.out(k))

    def gel_ok_samples(self) -> int:
        dry = range(self.dry_from, self.dry_from + self.dry_len) if self.dry_from >= 0 else ()
        return sum(1 for k in range(self.samples) if self.out(k) and k not in dry)


@dataclass(frozen=True)
class DeviceRow:
    device: str
    brand: str
    user: str
    model: str
    fw: str
    online: bool
    last_seen_us: int | None
    last_seq: int | None
    seq_count: int


@dataclass(frozen=True)
class Plan:
    params: SeedParams
    end: datetime
    devices: tuple[DeviceRow, ...]
    sessions: tuple[PlannedSession, ...]

    @property
    def start(self) -> datetime:
        return self.end - timedelta(days=self.params.days)

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.sessions)


def to_us(moment: datetime) -> int:
    return (moment - PG_EPOCH) // timedelta(microseconds=1)


def from_us(us: int) -> datetime:
    return PG_EPOCH + timedelta(microseconds=us)


def device_id(brand: str, n: int) -> str:
    return f"{brand}-{n:05d}"


def make_plan(params: SeedParams, end: datetime) -> Plan:
    """Who uses which device when: the same plan for the same parameters and end."""
    rng = random.Random(params.seed)
    devices: list[DeviceRow] = []
    sessions: list[PlannedSession] = []
    for brand, count, active in (
        (BRAND, params.devices, params.active_devices),
        (RIVAL, params.rival_devices, params.rival_devices // 2),
    ):
        users = set(rng.sample(range(count), active))
        for n in range(count):
            device = device_id(brand, n)
            planned = (
                _device_sessions(rng, params, brand, device, f"u-{n:05d}", end)
                if n in users
                else []
            )
            sessions += planned
            if planned:
                last = planned[-1]
                last_seq = last.seq0 + last.messages + 1 + rng.randint(0, 60)
                last_seen = min(to_us(end), last.end_us + rng.randint(0, 3600) * 10**6)
            else:
                last_seq = rng.randint(50, 5000)
                last_seen = to_us(end) - rng.randint(31, 200) * 86_400 * 10**6
            devices.append(
                DeviceRow(
                    device=device,
                    brand=brand,
                    user=f"u-{n:05d}",
                    model=rng.choice(MODELS),
                    fw=rng.choice(FIRMWARE),
                    online=bool(planned) and rng.random() < 0.3,
                    last_seen_us=last_seen,
                    last_seq=last_seq,
                    seq_count=last_seq,
                )
            )
    return Plan(params, end, tuple(devices), tuple(sessions))


def _device_sessions(
    rng: random.Random, params: SeedParams, brand: str, device: str, user: str, end: datetime
) -> list[PlannedSession]:
    """A user's sessions in the window: mornings or evenings, never overlapping."""
    count = rng.randint(params.sessions_min, params.sessions_max)
    window_start = end - timedelta(days=params.days)
    starts: list[datetime] = []
    for _ in range(count):
        day = window_start.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(
            days=rng.randrange(params.days + 1)
        )
        hour = rng.uniform(6.5, 9.0) if rng.random() < 0.45 else rng.uniform(18.0, 23.0)
        start = (day + timedelta(hours=hour)).replace(microsecond=0)
        if window_start <= start and start + timedelta(minutes=11) <= end:
            starts.append(start)
    starts.sort()
    planned: list[PlannedSession] = []
    seq = rng.randint(1, 500)
    batt = rng.randint(60, 100)
    previous_end: datetime | None = None
    for number, start in enumerate(starts):
        if previous_end is not None and start < previous_end + timedelta(minutes=30):
            continue
        samples = rng.randint(300, 600) * 10  # 5 to 10 minutes at 10 Hz
        dry = rng.random() < 0.1
        session = PlannedSession(
            device=device,
            brand=brand,
            user=user,
            session=f"s{number:06d}",
            mode=rng.choice(MODES),
            level=rng.randint(1, 10),
            start_us=to_us(start),
            samples=samples,
            seq0=seq,
            batt0=batt,
            z0=rng.uniform(3_000.0, 12_000.0),
            dry_from=rng.randrange(RAMP_SAMPLES, samples - 200) if dry else -1,
            dry_len=rng.randint(20, 150) if dry else 0,
        )
        planned.append(session)
        # Between sessions: heartbeats and state reports take sequence numbers too.
        seq += session.messages + 2 + rng.randint(20, 400)
        batt = max(5, batt - samples // 1200) if rng.random() < 0.7 else rng.randint(90, 100)
        previous_end = from_us(session.end_us)
    return planned


# --- samples ------------------------------------------------------------------------------


def session_rows(s: PlannedSession, rng: random.Random) -> bytes:
    """A session's samples in PostgreSQL's binary COPY row format."""
    mode = s.mode.encode()
    row = struct.Struct(f"!h i11s iq iq i7s i{len(mode)}s ih i? if if if if if if ih i? iq i?")
    device, session = s.device.encode(), s.session.encode()
    assert len(device) == 11, device
    assert len(session) == 7, session
    base, per_level = SETPOINT_UA[s.mode]
    i_set = base + per_level * s.level
    z = s.z0
    dry_end = s.dry_from + s.dry_len
    t_batt0 = 26.0 + rng.random() * 3
    out_parts: list[bytes] = []
    append = out_parts.append
    pack = row.pack
    lm = len(mode)
    rand = rng.random
    for k in range(s.samples):
        ts = s.start_us + k * SAMPLE_US
        message = k // SAMPLES_PER_MESSAGE
        received = s.start_us + (message + 1) * SAMPLES_PER_MESSAGE * SAMPLE_US + 40_000
        out = k >= RAMP_SAMPLES and k % PAUSE_EVERY >= PAUSE_SAMPLES
        z = min(18_000.0, max(1_500.0, z + (rand() - 0.5) * 60.0))
        z_now = 25_000.0 + rand() * 35_000.0 if s.dry_from <= k < dry_end else z
        if out:
            i_ua = i_set * (0.97 + rand() * 0.06) if z_now <= GEL_BAND_OHM[1] else i_set * 0.2
            v_v = min(12.0, i_ua * z_now * 1e-6)
        else:
            i_ua = v_v = 0.0
        append(
            pack(
                17,
                11,
                device,
                8,
                ts,
                8,
                s.seq0 + 1 + message,
                7,
                session,
                lm,
                mode,
                2,
                s.level,
                1,
                out,
                4,
                i_ua,
                4,
                i_set,
                4,
                v_v,
                4,
                z_now,
                4,
                31.0 + 3.0 * min(1.0, k / 3000) + rand() * 0.2,
                4,
                t_batt0 + k / 3000,
                2,
                max(1, s.batt0 - k // 1200),
                1,
                False,
                8,
                received,
                1,
                False,
            )
        )
    return b"".join(out_parts)


def copy_samples_worker(url: str, sessions: Sequence[PlannedSession], seed: int, done: Any) -> None:
    """Write ``sessions`` (one day's at a time, one transaction each) by binary COPY."""
    rng = random.Random(seed)
    by_day: dict[int, list[PlannedSession]] = {}
    for s in sessions:
        by_day.setdefault(s.start_us // (86_400 * 10**6), []).append(s)
    with psycopg.connect(url) as conn:
        for day in sorted(by_day):
            planned = sorted(by_day[day], key=lambda s: (s.device, s.start_us))
            with (
                conn.cursor() as cur,
                cur.copy(f"COPY samples ({SAMPLE_COLUMNS}) FROM STDIN (FORMAT BINARY)") as copy,
            ):
                copy.write(COPY_HEADER)
                for s in planned:
                    copy.write(session_rows(s, rng))
                    with done.get_lock():
                        done.value += s.samples
                copy.write(COPY_TRAILER)
            conn.commit()


def copy_samples(url: str, plan: Plan, processes: int, say: SayFn) -> None:
    """All samples of the plan, by ``processes`` COPY streams (each on its own days)."""
    days = sorted({s.start_us // (86_400 * 10**6) for s in plan.sessions})
    share = {day: n % processes for n, day in enumerate(days)}
    ctx = multiprocessing.get_context("fork")
    done = ctx.Value("q", 0)
    workers = [
        ctx.Process(
            target=copy_samples_worker,
            args=(
                url,
                [s for s in plan.sessions if share[s.start_us // (86_400 * 10**6)] == p],
                plan.params.seed + p,
                done,
            ),
        )
        for p in range(processes)
    ]
    total = plan.samples
    t0 = time.monotonic()
    for worker in workers:
        worker.start()
    try:
        while any(w.is_alive() for w in workers):
            for w in workers:
                w.join(PROGRESS_EVERY_S / len(workers))
            elapsed = time.monotonic() - t0
            written = int(done.value)
            say(
                f"  samples: {written:,} of {total:,} ({100 * written / total:.0f} %),"
                f" {written / elapsed:,.0f}/s"
            )
    finally:
        for w in workers:
            if w.is_alive():
                w.terminate()
            w.join()
    if any(w.exitcode != 0 for w in workers):
        raise SystemExit("bench-api: a sample COPY process failed")


# --- everything else --------------------------------------------------------------------


def copy_rows(
    conn: psycopg.Connection[tuple[object, ...]],
    table: str,
    columns: Sequence[str],
    types: Sequence[str],
    rows: Iterator[Sequence[object]],
) -> int:
    """``rows`` into ``table`` by binary COPY; returns how many."""
    count = 0
    with conn.cursor() as cur:
        sql = f"COPY {table} ({', '.join(columns)}) FROM STDIN (FORMAT BINARY)"
        with cur.copy(sql) as copy:
            copy.set_types(list(types))
            for row in rows:
                copy.write_row(row)
                count += 1
    return count


def copy_fleet(conn: psycopg.Connection[tuple[object, ...]], plan: Plan) -> None:
    """Brands, users and devices."""
    conn.execute(
        "INSERT INTO brands (id, name) VALUES (%s, 'Benchmark'), (%s, 'Rival')", [BRAND, RIVAL]
    )
    created = plan.start - timedelta(days=120)
    copy_rows(
        conn,
        "users",
        ("brand_id", "id", "stage", "created_at", "updated_at"),
        ("text", "text", "text", "timestamptz", "timestamptz"),
        (
            (d.brand, d.user, "maintenance" if n % 3 else "intro", created, created)
            for n, d in enumerate(plan.devices)
        ),
    )
    copy_rows(
        conn,
        "devices",
        (
            "id",
            "brand_id",
            "model",
            "user_id",
            "provisioned_at",
            "online",
            "presence_at",
            "last_seen",
            "last_received_at",
            "fw",
            "hw",
            "state_ts",
            "first_seq",
            "last_seq",
            "seq_count",
        ),
        (
            "text",
            "text",
            "text",
            "text",
            "timestamptz",
            "bool",
            "timestamptz",
            "timestamptz",
            "timestamptz",
            "text",
            "text",
            "timestamptz",
            "int8",
            "int8",
            "int8",
        ),
        (
            (
                d.device,
                d.brand,
                d.model,
                d.user,
                created,
                d.online,
                from_us(d.last_seen_us) if d.last_seen_us else None,
                from_us(d.last_seen_us) if d.last_seen_us else None,
                from_us(d.last_seen_us) if d.last_seen_us else None,
                d.fw,
                "rev-b",
                from_us(d.last_seen_us) if d.last_seen_us else None,
                1,
                d.last_seq,
                d.seq_count,
            )
            for d in plan.devices
        ),
    )


def copy_sessions_and_events(conn: psycopg.Connection[tuple[object, ...]], plan: Plan) -> None:
    """A sessions row and session_start/session_end events per planned session."""
    session_columns = (
        "device_id",
        "session",
        "brand_id",
        "user_id",
        "mode",
        "level",
        "started_at",
        "ended_at",
        "duration_s",
        "end_reason",
        "output_s",
        "samples",
        "gel_ok_samples",
        "start_batt_pct",
        "updated_at",
        "start_seq",
        "end_seq",
        "out_samples",
        "first_sample_at",
        "last_sample_at",
    )
    session_types = (
        "text",
        "text",
        "text",
        "text",
        "text",
        "int2",
        "timestamptz",
        "timestamptz",
        "float4",
        "text",
        "float4",
        "int4",
        "int4",
        "int2",
        "timestamptz",
        "int8",
        "int8",
        "int4",
        "timestamptz",
        "timestamptz",
    )

    def sessions() -> Iterator[Sequence[object]]:
        for s in plan.sessions:
            out = s.out_samples()
            started, ended = from_us(s.start_us), from_us(s.end_us)
            yield (
                s.device,
                s.session,
                s.brand,
                s.user,
                s.mode,
                s.level,
                started,
                ended,
                s.samples / 10,
                "completed",
                out / 10,
                s.samples,
                s.gel_ok_samples(),
                s.batt0,
                ended + timedelta(seconds=1),
                s.seq0,
                s.seq0 + s.messages + 1,
                out,
                started,
                ended - timedelta(microseconds=SAMPLE_US),
            )

    def events() -> Iterator[Sequence[object]]:
        for s in plan.sessions:
            started, ended = from_us(s.start_us), from_us(s.end_us)
            start_body = {
                "v": 1,
                "seq": s.seq0,
                "ts": s.start_us // 1000,
                "type": "session_start",
                "session": s.session,
                "mode": s.mode,
                "level": s.level,
            }
            end_seq = s.seq0 + s.messages + 1
            end_body = {
                "v": 1,
                "seq": end_seq,
                "ts": s.end_us // 1000,
                "type": "session_end",
                "session": s.session,
                "reason": "completed",
                "duration_s": s.samples / 10,
            }
            yield (s.device, s.seq0, started, "session_start", s.session, start_body, started)
            yield (s.device, end_seq, ended, "session_end", s.session, end_body, ended)

    copy_rows(conn, "sessions", session_columns, session_types, sessions())
    copy_rows(
        conn,
        "events",
        ("device_id", "seq", "ts", "type", "session", "body", "received_at"),
        ("text", "int8", "timestamptz", "text", "text", "jsonb", "timestamptz"),
        events(),
    )


def copy_alerts(conn: psycopg.Connection[tuple[object, ...]], plan: Plan) -> tuple[int, int]:
    """Open, acknowledged and resolved alerts on devices that were used; (open, resolved)."""
    rng = random.Random(plan.params.seed + 1000)
    used = {b: sorted({s.device for s in plan.sessions if s.brand == b}) for b in (BRAND, RIVAL)}
    rules: tuple[Rule, ...] = RULES
    rows: list[Sequence[object]] = []
    for brand, open_count, resolved_count in (
        (BRAND, plan.params.open_alerts, plan.params.resolved_alerts),
        (RIVAL, 5, 20),
    ):
        pairs = rng.sample([(d, r) for d in used[brand] for r in rules], open_count)
        for n, (device, rule) in enumerate(pairs):
            state = "acknowledged" if n % 6 == 0 else "open"
            rows.append(_alert(rng, plan, brand, device, rule, state))
        for _ in range(resolved_count):
            rows.append(
                _alert(rng, plan, brand, rng.choice(used[brand]), rng.choice(rules), "resolved")
            )
    rows.sort(key=lambda r: cast(datetime, r[7]))  # ids grow with first_seen, as live
    copy_rows(
        conn,
        "alerts",
        (
            "brand_id",
            "device_id",
            "rule",
            "rule_version",
            "severity",
            "state",
            "count",
            "first_seen",
            "last_seen",
            "explanation",
            "acknowledged_at",
            "acknowledged_by",
            "resolved_at",
            "resolved_by",
            "resolution",
            "created_at",
            "updated_at",
        ),
        (
            "text",
            "text",
            "text",
            "int4",
            "text",
            "text",
            "int4",
            "timestamptz",
            "timestamptz",
            "jsonb",
            "timestamptz",
            "text",
            "timestamptz",
            "text",
            "text",
            "timestamptz",
            "timestamptz",
        ),
        iter(rows),
    )
    return plan.params.open_alerts, plan.params.resolved_alerts


def _alert(
    rng: random.Random, plan: Plan, brand: str, device: str, rule: Rule, state: str
) -> Sequence[object]:
    first = plan.start + timedelta(seconds=rng.uniform(0, plan.params.days * 86_400 - 7200))
    last = first + timedelta(seconds=rng.uniform(0, 3600))
    explanation = {
        "rule": rule.id,
        "rule_version": rule.version,
        "threshold": {p.name: p.default for p in rule.params},
        "observed": {"value": round(rng.uniform(20_000, 60_000))},
        "window": {"from": first.isoformat(), "to": last.isoformat()},
        "action": rule.action.value,
        "text": f"{rule.summary}; {rule.action.value}.",
    }
    acked = last + timedelta(minutes=5) if state != "open" else None
    resolved = last + timedelta(minutes=30) if state == "resolved" else None
    return (
        brand,
        device,
        rule.id,
        rule.version,
        rule.severity.value,
        state,
        rng.randint(1, 4),
        first,
        last,
        explanation,
        acked,
        "api-key:bench" if acked else None,
        resolved,
        "api-key:bench" if resolved else None,
        "fixed by the user" if resolved else None,
        first,
        resolved or acked or last,
    )


def refresh_rollups(url: str, plan: Plan, processes: int, say: SayFn) -> datetime:
    """The maintenance job's pass (``run_pass``) over the window; returns ``refreshed_to``.

    One pass per whole day, ``processes`` at a time: a pass at ``now`` recomputes whole hours
    from ``now - lookback`` to the end of ``now``'s hour, so passes just before midnight
    with a lookback of a day touch disjoint hours and may run side by side. The last pass,
    alone, runs :data:`LAST_PASS_BEFORE_END` before the end of the data and sets
    ``galvani_meta.rollups_refreshed_to`` as the live job would.
    """
    last = plan.end - LAST_PASS_BEFORE_END
    last_day = last.replace(hour=0, minute=0, second=0, microsecond=0)
    day = plan.start.replace(hour=0, minute=0, second=0, microsecond=0)
    days: list[datetime] = []
    while day < last_day:
        days.append(day)
        day += timedelta(days=1)
    just_before = timedelta(microseconds=1)
    t0 = time.monotonic()
    connections = [psycopg.connect(url, autocommit=True) for _ in range(processes)]
    free = list(connections)
    lock = threading.Lock()

    def one_day(start: datetime) -> int:
        with lock:
            conn = free.pop()
        try:
            end = start + timedelta(days=1) - just_before
            return run_pass(conn, end, timedelta(days=1) - just_before).rollup_rows
        finally:
            with lock:
                free.append(conn)

    rows = 0
    try:
        with ThreadPoolExecutor(processes) as pool:
            for done, count in enumerate(pool.map(one_day, days), start=1):
                rows += count
                if done % 5 == 0:
                    say(f"  rollups: {done} of {len(days) + 1} passes, {rows:,} rows")
        rows += run_pass(connections[0], last, last - last_day).rollup_rows
    finally:
        for conn in connections:
            conn.close()
    say(f"  rollups: {rows:,} rows written in {time.monotonic() - t0:.0f} s")
    return last


def seed(url: str, plan: Plan, processes: int, say: SayFn) -> dict[str, object]:
    """Write the whole plan; returns figures for the cache's description."""
    t0 = time.monotonic()
    with psycopg.connect(url) as conn:
        copy_fleet(conn, plan)
        copy_sessions_and_events(conn, plan)
        opened, resolved = copy_alerts(conn, plan)
        conn.commit()
    say(
        f"  {len(plan.devices):,} devices, {len(plan.sessions):,} sessions, "
        f"{2 * len(plan.sessions):,} events, {opened} open and {resolved} resolved alerts"
    )
    copy_samples(url, plan, processes, say)
    copy_s = time.monotonic() - t0
    refreshed_to = refresh_rollups(url, plan, processes, say)
    with psycopg.connect(url, autocommit=True) as conn:
        t1 = time.monotonic()
        conn.execute("VACUUM (ANALYZE)")
        say(f"  vacuum and analyze: {time.monotonic() - t1:.0f} s")
        size = conn.execute("SELECT pg_size_pretty(pg_database_size(current_database()))")
        size_row = size.fetchone()
    return {
        "end": plan.end.isoformat(),
        "refreshed_to": refreshed_to.isoformat(),
        "samples": plan.samples,
        "sessions": len(plan.sessions),
        "devices": len(plan.devices),
        "copy_s": round(copy_s),
        "database_size": str(size_row[0]) if size_row else "?",
        "params": json.loads(json.dumps(plan.params.__dict__)),
    }
