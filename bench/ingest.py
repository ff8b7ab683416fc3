"""``make bench-ingest``: telemetry ingest throughput and CPU, against COPY as the ceiling.

One run, everything on this machine and all of it started (and stopped, by pid) here:

1. a PostgreSQL cluster with production settings (durable, TimescaleDB preloaded), migrated;
   a Mosquitto broker with Galvani's generated configuration (TLS listeners) plus a plaintext
   service listener and a plaintext device listener; both servers on free loopback ports in
   a temporary directory;
2. ``--devices`` provisioned devices of one brand with real broker credentials for each
   phase (a device's seqs are used once);
3. two phases, one after the other, alike but for the broker connections of the devices and
   of the ingest workers: plaintext first, then TLS verifying the broker against the run's
   CA, as in production
   (``--tls-only``: the TLS phase alone). The TLS phase runs second, on the larger table, so
   any order effect counts against TLS. In each phase:
4. ``--workers`` ingest workers (``python -m services.ingest.main``), each checked end to
   end with a probe message before the clock starts, and stopped at the phase's end (the
   next phase's take their client ids, and with them the sessions);
5. a load generator (bench/mqtt_load.py) with one MQTT connection per device publishing
   pre-built v1 telemetry (10 samples a message) at QoS 1 for ``--seconds``; only
   PUBACKed messages count as sent. Each connection subscribes to its device's ``ack``
   topic, as a real device does, so the broker delivers the stored acks ingest publishes
   after every commit (``--no-acks``: no subscription, and the broker discards them). In the
   TLS phase the devices publish to the TLS device listener (one client context per load
   process), in the plaintext phase to the plaintext one;
6. when every sent sample is stored: ``ingest_samples_per_s`` = stored samples / (first
   publish to last commit), and the CPU of the ingest workers and of every PostgreSQL
   process over the same window per stored sample;

then the ceiling: the same rows (same devices, times and values) COPYed into ``samples``
from one process in transactions of 10,000 rows.

Each phase ends with its result line, the TLS one also the run's last line::

    plaintext: ingest_samples_per_s=N copy_samples_per_s=N ratio=R cpu_us_per_sample=N lost=0 ...
    tls: ingest_samples_per_s=N ... tls_cpu_ratio=R

``tls_cpu_ratio`` is the TLS phase's CPU per stored sample of the ingest workers and
Mosquitto together (the server ends of every connection TLS was added to) over the plaintext
phase's; the line before the last gives each part's ratio. The exit status is non-zero when
a sample was lost or stored twice. The line before each result counts the stored acks heard
and the stored seqs they covered by the phase's end.

The stored count is followed through the workers' ``galvani_ingest_samples_total`` counter
(incremented after each commit), not ``SELECT count(*)``: counting millions of rows four
times a second would cost PostgreSQL a good part of a core and be charged to ingest. The
database is counted once, at the end, and must agree.
"""

import argparse
import contextlib
import os
import queue
import struct
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Final

import psycopg

from bench.harness import (
    BenchStack,
    ServiceWorker,
    postgres_cpu_s,
    process_cpu_s,
    run_main,
    say,
    start_stack,
    workspace,
)
from bench.mqtt_load import (
    ACK_GRACE_S,
    SAMPLE_FIELDS,
    SAMPLE_SPACING_MS,
    SAMPLES_PER_MESSAGE,
    AckResult,
    DeviceLogin,
    LoadError,
    LoadPlan,
    LoadProcesses,
    LoadResult,
    messages_per_device,
    publish_once,
    run_event_loop,
    split,
)
from deploy.stack.ports import LOOPBACK, distinct_free_ports
from deploy.stack.postgres import PostgresServer
from services.common.protocol.limits import CLOCK_FUTURE_LIMIT, CLOCK_PAST_LIMIT
from services.common.protocol.topics import device_topic
from services.ingest.decode import SAMPLE_COLUMNS, SAMPLE_TYPES, SampleRow
from services.ingest.writer import COPY_SAMPLES

# Device time starts two hours back by default (inside protocol.md's plausible window of 30
# days back to 5 minutes ahead) and advances one second per message, so times are unique per
# device. Two hours back makes every sample "late" (older than an hour on arrival), which on
# plain PostgreSQL and TimescaleDB's Apache build also marks its hour for a rollup refresh;
# --device-time-ago 20 measures live data instead.
DEFAULT_DEVICE_TIME_AGO_MIN: Final = 120
# protocol.md: device time more than 5 minutes ahead of receipt is flagged suspect, and
# more than 30 days behind.
TS_FUTURE_LIMIT_S: Final = CLOCK_FUTURE_LIMIT.total_seconds()
TS_PAST_LIMIT_MIN: Final = CLOCK_PAST_LIMIT.total_seconds() / 60

POLL_S: Final = 0.25
PROGRESS_EVERY_S: Final = 10.0
PROBE_TIMEOUT_S: Final = 30.0
# After publishing stops: give up waiting for the last samples when the stored count has
# not moved for this long.
SETTLE_TIMEOUT_S: Final = 30.0
# Beyond ACK_GRACE_S, how long the load processes may take to count the acks they heard.
ACK_COUNT_TIMEOUT_S: Final = 10.0
COPY_TRANSACTION_ROWS: Final = 10_000
# The TLS phase may take at most this many times the plaintext phase's CPU per sample.
TLS_CPU_GOAL: Final = 1.15

STORED_SAMPLES: Final = 'galvani_ingest_samples_total{outcome="stored"}'
STORED_PRESENCE: Final = 'galvani_ingest_messages_total{channel="presence",outcome="stored"}'
BATCHES: Final = "galvani_ingest_batch_messages_count"
BATCHED_MESSAGES: Final = "galvani_ingest_batch_messages_sum"
COMMIT_SECONDS: Final = "galvani_ingest_commit_seconds_sum"
INFLIGHT: Final = "galvani_ingest_inflight_messages"


# --- CPU accounting ---------------------------------------------------------------------


@dataclass(frozen=True)
class CpuSnapshot:
    """Cumulative CPU seconds of everything the benchmark runs, at one moment."""

    at: float  # time.monotonic()
    ingest: tuple[float, ...]
    postgres: float
    mosquitto: float
    main: float

    def minus(self, earlier: "CpuSnapshot") -> "CpuSnapshot":
        """CPU spent between ``earlier`` and this snapshot."""
        return CpuSnapshot(
            at=self.at - earlier.at,
            ingest=tuple(a - b for a, b in zip(self.ingest, earlier.ingest, strict=True)),
            postgres=self.postgres - earlier.postgres,
            mosquitto=self.mosquitto - earlier.mosquitto,
            main=self.main - earlier.main,
        )


# --- The stack --------------------------------------------------------------------------


def probe_workers(workers: Sequence[ServiceWorker], device_port: int, login: DeviceLogin) -> None:
    """Publish presence messages until every worker has stored one.

    "connected to" is logged before the subscription is acknowledged; a message published
    to a shared subscription nobody holds yet is acknowledged by the broker and dropped.
    A message stored by each worker proves the whole path is up before the clock starts.
    """
    topic = device_topic(login.device_id, "presence")
    deadline = time.monotonic() + PROBE_TIMEOUT_S
    ts_ms = int(time.time() * 1000)
    while True:
        if all(worker.metric(STORED_PRESENCE) >= 1 for worker in workers):
            return
        if time.monotonic() > deadline:
            raise SystemExit("bench-ingest: the ingest workers did not store a probe message")
        payloads = []
        for _ in range(2 * len(workers)):
            ts_ms += 1  # presence is stored once per (device, ts, online)
            payloads.append(b'{"v": 1, "online": true, "ts": %d}' % ts_ms)
        run_event_loop(publish_once(LOOPBACK, device_port, login, topic, payloads))
        time.sleep(0.5)


# --- The measured run -------------------------------------------------------------------


def stored_samples(metrics: Sequence[dict[str, float]]) -> int:
    """Samples the workers have committed, from their counters."""
    return int(sum(values.get(STORED_SAMPLES, 0.0) for values in metrics))


@dataclass
class WorkerStats:
    """How one worker's batches went over the run, from its metrics."""

    name: str
    batches: int = 0
    messages: int = 0
    commit_s: float = 0.0
    max_inflight: int = 0  # highest "received, not yet acknowledged" seen by the poll

    def count(self, before: dict[str, float], after: dict[str, float]) -> None:
        """Set the totals from the metrics at the start and at the end of the run."""
        self.batches = int(after.get(BATCHES, 0) - before.get(BATCHES, 0))
        self.messages = int(after.get(BATCHED_MESSAGES, 0) - before.get(BATCHED_MESSAGES, 0))
        self.commit_s = after.get(COMMIT_SECONDS, 0) - before.get(COMMIT_SECONDS, 0)


@dataclass
class Measurement:
    """What the publishing phase produced."""

    results: list[LoadResult]
    workers: list[WorkerStats]
    start: CpuSnapshot
    last_stored: CpuSnapshot  # taken at the poll that first saw the final stored count
    stored_by_metrics: int
    first_publish: float
    publish_end: float
    acks: list[AckResult] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def acked_by_device(self) -> dict[str, int]:
        """PUBACKed messages of each device (its seqs 0..n-1)."""
        return {d: n for r in self.results for d, n in r.acked.items()}


class Run:
    """Load processes, the stored-count poll and CPU snapshots of one measured run."""

    def __init__(
        self,
        args: argparse.Namespace,
        logins: list[DeviceLogin],
        broker_cpu: Callable[[], float],
        device_ports: Sequence[int],
        postgres: PostgresServer,
        workers: list[ServiceWorker],
        ca_file: str | None,
    ):
        """Load process ``i`` connects its devices to ``device_ports[i mod len]`` (a cluster's
        nodes in turn; one broker's listener), with TLS verifying against ``ca_file`` if
        given; ``broker_cpu`` is the broker's cumulative CPU seconds (every node's)."""
        self.args = args
        self.logins = logins
        self.broker_cpu = broker_cpu
        self.device_ports = list(device_ports)
        self.ca_file = ca_file
        self.postgres = postgres
        self.workers = workers
        self.load = LoadProcesses(args.loadgen_procs)
        self.shared = self.load.shared

    def snapshot(self) -> CpuSnapshot:
        """Cumulative CPU of the workers, the cluster, the broker and this process."""
        assert self.postgres.child is not None
        return CpuSnapshot(
            at=time.monotonic(),
            ingest=tuple(process_cpu_s(w.child.pid) for w in self.workers),
            postgres=postgres_cpu_s(self.postgres.child.pid),
            mosquitto=self.broker_cpu(),
            main=time.process_time(),
        )

    def worker_metrics(self) -> list[dict[str, float]]:
        """Every worker's metrics, in worker order."""
        return [worker.metrics() for worker in self.workers]

    def start_load(self) -> None:
        """Start the load processes; return when all have built payloads and connected."""
        args = self.args
        max_msgs_per_s = args.max_rate / SAMPLES_PER_MESSAGE
        per_device = pre_built_messages(args)
        first_ts_ms = int((time.time() - args.device_time_ago * 60) * 1000)
        say(
            f"load: {args.devices} devices over {args.loadgen_procs} process(es), window "
            f"{args.window}, {per_device} pre-built messages a device "
            f"({per_device * args.devices * SAMPLES_PER_MESSAGE:,} samples), backlog "
            f"{args.backlog:,} messages, offered at most {args.max_rate:,} samples/s, "
            + ("not subscribed to acks" if args.no_acks else "each device subscribed to its acks")
        )
        plans = [
            LoadPlan(
                host=LOOPBACK,
                port=self.device_ports[i % len(self.device_ports)],
                devices=devices,
                total_devices=len(self.logins),
                messages_per_device=per_device,
                first_ts_ms=first_ts_ms,
                window=args.window,
                seconds=args.seconds,
                max_msgs_per_s=max_msgs_per_s,
                backlog_msgs=args.backlog,
                hear_acks=not args.no_acks,
                ca_file=self.ca_file,
            )
            for i, devices in enumerate(split(self.logins, args.loadgen_procs))
        ]
        try:
            self.load.start(plans)
        except LoadError as exc:
            raise SystemExit(f"bench-ingest: {exc}") from None

    def stop_load(self) -> None:
        """Stop the load processes (they exit on their own once done; abort otherwise)."""
        self.load.stop()

    def measure(self) -> Measurement:
        """Publish for ``--seconds`` and follow the stored count until it stops growing."""
        start_at = time.monotonic() + 0.5
        self.shared.start_at.value = start_at
        time.sleep(max(0.0, start_at - time.monotonic()))
        start = self.snapshot()
        publish_end = start_at + self.args.seconds
        first_metrics = metrics = self.worker_metrics()
        stats = [WorkerStats(w.name) for w in self.workers]
        stored = stored_samples(metrics)
        last = start
        last_change = start_at
        results: list[LoadResult] = []
        expected: int | None = None
        progress = Progress(start_at, hear_acks=not self.args.no_acks)
        while True:
            time.sleep(POLL_S)
            now = time.monotonic()
            for worker in self.workers:
                if not worker.child.alive():
                    raise SystemExit(
                        f"bench-ingest: {worker.name} exited:\n{worker.child.log_tail(20)}"
                    )
            metrics = self.worker_metrics()
            for stat, values in zip(stats, metrics, strict=True):
                stat.max_inflight = max(stat.max_inflight, int(values.get(INFLIGHT, 0)))
            count = stored_samples(metrics)
            if count != stored:
                stored, last_change, last = count, now, self.snapshot()
            self.shared.stored_msgs.value = stored // SAMPLES_PER_MESSAGE
            sent = sum(self.shared.sent)
            acked = sum(self.shared.acked)
            progress.maybe_print(now, sent, acked, stored, sum(self.shared.heard))
            while expected is None:
                try:
                    results.append(self.load.results.get_nowait())
                except queue.Empty:
                    break
                if len(results) == len(self.load.processes):
                    expected = sum(sum(r.acked.values()) for r in results) * SAMPLES_PER_MESSAGE
                    errors = [f"load process {r.index}: {r.error}" for r in results if r.error]
                    if errors:
                        raise SystemExit("bench-ingest: " + "; ".join(errors))
            if expected is None:
                if now > publish_end + 120 and not self.load.any_alive():
                    raise SystemExit("bench-ingest: the load processes exited without a result")
                continue
            if stored >= expected or now - last_change > SETTLE_TIMEOUT_S:
                break
        # The load processes wait for the acks of the last commits from here.
        self.shared.all_stored_at.value = last_change
        acks = self.load.collect_acks(ACK_GRACE_S + ACK_COUNT_TIMEOUT_S)
        first_publish = min(
            (r.first_publish for r in results if r.first_publish is not None), default=start_at
        )
        for stat, before, after in zip(stats, first_metrics, metrics, strict=True):
            stat.count(before, after)
        measurement = Measurement(
            results=results,
            workers=stats,
            start=start,
            last_stored=last,
            stored_by_metrics=stored,
            first_publish=first_publish,
            publish_end=max((r.last_ack or start_at for r in results), default=start_at),
            acks=acks,
        )
        if len(acks) < len(self.load.processes):
            measurement.warnings.append(
                f"{len(self.load.processes) - len(acks)} load process(es) did not count their acks"
            )
        if stored < expected:
            measurement.warnings.append(
                f"stored count stuck at {stored:,} of {expected:,} for {SETTLE_TIMEOUT_S:.0f} s"
            )
        exhausted = sum(r.exhausted_devices for r in results)
        if exhausted:
            measurement.warnings.append(
                f"{exhausted} devices ran out of pre-built messages: raise --max-rate"
            )
        return measurement


class Progress:
    """A line every ``PROGRESS_EVERY_S``: publish, acknowledgement, storage and ack rates."""

    def __init__(self, start: float, *, hear_acks: bool):
        self.start = start
        self.hear_acks = hear_acks
        self.next = start + PROGRESS_EVERY_S
        self.last = (start, 0, 0, 0, 0)

    def maybe_print(self, now: float, sent: int, acked: int, stored: int, heard: int) -> None:
        if now < self.next:
            return
        then, sent0, acked0, stored0, heard0 = self.last
        span = now - then
        line = (
            f"[{now - self.start:5.1f} s] published {(sent - sent0) / span:8,.0f} msg/s  "
            f"acked {(acked - acked0) / span:8,.0f} msg/s  "
            f"stored {(stored - stored0) / span:9,.0f} samples/s  "
            f"unstored {acked - stored // SAMPLES_PER_MESSAGE:7,} msgs"
        )
        if self.hear_acks:
            line += f"  stored acks heard {(heard - heard0) / span:8,.0f}/s"
        say(line)
        self.last = (now, sent, acked, stored, heard)
        self.next += PROGRESS_EVERY_S


# --- Verification and the ceiling -------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """What the database holds against what the broker acknowledged."""

    stored: int
    expected: int
    lost: int
    duplicates: int
    ledger: int
    ledger_expected: int


def verify(url: str, acked_by_device: dict[str, int], devices: Sequence[str]) -> Check:
    """Count rows per device of a phase's ``devices`` against PUBACKed messages (a loss
    cannot hide behind a surplus)."""
    ids = list(devices)
    with psycopg.connect(url) as conn:
        per_device = {
            str(device): int(str(n))
            for device, n in conn.execute(
                "SELECT device_id, count(*) FROM samples WHERE device_id = ANY(%s)"
                " GROUP BY device_id",
                [ids],
            ).fetchall()
        }
        row = conn.execute(
            "SELECT count(*), count(DISTINCT (device_id, ts)) FROM samples"
            " WHERE device_id = ANY(%s)",
            [ids],
        ).fetchone()
        assert row is not None
        stored, distinct = int(str(row[0])), int(str(row[1]))
        ledger_row = conn.execute(
            "SELECT count(*) FROM telemetry_messages WHERE device_id = ANY(%s)", [ids]
        ).fetchone()
        assert ledger_row is not None
        ledger = int(str(ledger_row[0]))
    lost = duplicates = 0
    for device in acked_by_device.keys() | per_device.keys():
        want = acked_by_device.get(device, 0) * SAMPLES_PER_MESSAGE
        got = per_device.get(device, 0)
        lost += max(0, want - got)
        duplicates += max(0, got - want)
    duplicates += stored - distinct  # zero by the primary key; checked all the same
    acked = sum(acked_by_device.values())
    return Check(stored, acked * SAMPLES_PER_MESSAGE, lost, duplicates, ledger, acked)


def ceiling_rows(url: str) -> list[SampleRow]:
    """The stored samples rebuilt from the message ledger, as ingest's decoder makes them.

    Cheaper than reading millions of rows back; checked against the table below.
    """
    fields = SAMPLE_FIELDS
    constant = (
        fields["mode"],
        fields["level"],
        fields["out"],
        float(fields["i_ua"]),  # type: ignore[arg-type]
        float(fields["i_set_ua"]),  # type: ignore[arg-type]
        float(fields["v_v"]),  # type: ignore[arg-type]
        float(fields["z_ohm"]),  # type: ignore[arg-type]
        float(fields["t_elec_c"]),  # type: ignore[arg-type]
        float(fields["t_batt_c"]),  # type: ignore[arg-type]
        fields["batt_pct"],
        fields["charging"],
    )
    offsets = [timedelta(milliseconds=SAMPLE_SPACING_MS * i) for i in range(SAMPLES_PER_MESSAGE)]
    rows: list[Any] = []
    append = rows.append
    with psycopg.connect(url) as conn:
        messages = conn.execute(
            "SELECT device_id, seq, ts, session, received_at, ts_suspect FROM telemetry_messages"
        ).fetchall()
    for device_id, seq, ts, session, received_at, suspect in messages:
        for offset in offsets:
            append((device_id, ts + offset, seq, session, *constant, received_at, suspect))
    return rows


def _float4(value: object) -> object:
    if isinstance(value, float):
        return struct.unpack("f", struct.pack("f", value))[0]
    return value


def check_ceiling_rows(url: str, rows: list[SampleRow]) -> None:
    """The rebuilt rows of one message must equal the stored ones, column for column."""
    device_id, seq = rows[0][0], rows[0][2]
    mine = sorted(row for row in rows[:SAMPLES_PER_MESSAGE])
    columns = ", ".join(SAMPLE_COLUMNS)
    with psycopg.connect(url) as conn:
        stored = conn.execute(
            f"SELECT {columns} FROM samples WHERE device_id = %s AND seq = %s ORDER BY ts",  # noqa: S608 - constants
            [device_id, seq],
        ).fetchall()
    if [tuple(map(_float4, r)) for r in mine] != [tuple(map(_float4, r)) for r in stored]:
        raise SystemExit(
            f"bench-ingest: rebuilt rows differ from the stored ones:\n{mine[0]}\n{stored[:1]}"
        )


@dataclass(frozen=True)
class Ceiling:
    """One process COPYing the same rows."""

    rows: int
    seconds: float
    postgres_cpu_s: float
    main_cpu_s: float


def copy_ceiling(url: str, postmaster: int) -> Ceiling:
    """TRUNCATE samples and COPY the same rows back, 10,000 rows a transaction."""
    rows = ceiling_rows(url)
    check_ceiling_rows(url, rows)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("TRUNCATE samples")
        pg0, main0, t0 = postgres_cpu_s(postmaster), time.process_time(), time.perf_counter()
        with conn.cursor() as cur:
            for first in range(0, len(rows), COPY_TRANSACTION_ROWS):
                with conn.transaction(), cur.copy(COPY_SAMPLES) as copy:
                    copy.set_types(SAMPLE_TYPES)
                    for row in rows[first : first + COPY_TRANSACTION_ROWS]:
                        copy.write_row(row)
        seconds = time.perf_counter() - t0
        pg1, main1 = postgres_cpu_s(postmaster), time.process_time()
        counted = conn.execute("SELECT count(*) FROM samples").fetchone()
    if counted is None or int(str(counted[0])) != len(rows):
        raise SystemExit(f"bench-ingest: COPY stored {counted} rows, not {len(rows)}")
    return Ceiling(len(rows), seconds, pg1 - pg0, main1 - main0)


# --- Report -----------------------------------------------------------------------------


def log_problems(workers: Sequence[ServiceWorker]) -> list[str]:
    """Warning and error lines (and tracebacks) the ingest workers logged."""
    lines: list[str] = []
    for worker in workers:
        for line in worker.log_text().splitlines():
            if any(word in line for word in (" WARNING ", " ERROR ", " CRITICAL ", "Traceback")):
                lines.append(f"{worker.name}: {line}")
    return lines


@dataclass(frozen=True)
class Phase:
    """One phase's workers on one service listener, and what it measured."""

    listener: str  # "plaintext" or "tls"
    measurement: Measurement
    check: Check
    problems: list[str]  # what its workers logged at WARNING and above
    broker: str = "mosquitto"  # what the report calls the broker's CPU ("nats": all nodes)


@dataclass(frozen=True)
class Figures:
    """A phase's result, for the side-by-side lines."""

    rate: float
    ingest_us: float  # CPU per stored sample
    postgres_us: float
    mosquitto_us: float
    result: str  # the result line, without the label
    failed: bool


def report(args: argparse.Namespace, phase: Phase, ceiling: Ceiling) -> Figures:
    """Print a phase's figures, each line labelled with its listener; its result line is
    the caller's to print."""
    m, check = phase.measurement, phase.check
    label = phase.listener

    def say_(line: str) -> None:
        say(f"[{label}] {line}")

    window = m.last_stored.at - m.first_publish
    cpu = m.last_stored.minus(m.start)
    ingest_cpu = sum(cpu.ingest)
    # Publishing, then hearing the acks of the last commits.
    loadgen_cpu = sum(r.cpu_publishing_s for r in m.results) + sum(a.cpu_s for a in m.acks)
    stored = check.stored
    ingest_rate = stored / window if window > 0 else 0.0
    copy_rate = ceiling.rows / ceiling.seconds if ceiling.seconds > 0 else 0.0
    per_sample = (ingest_cpu + cpu.postgres) / stored * 1e6 if stored else float("nan")
    cores = os.cpu_count() or 1

    def us(seconds: float) -> str:
        return f"{seconds / stored * 1e6:.1f}" if stored else "n/a"

    publishing = max(m.publish_end - m.first_publish, 1e-9)
    say_(
        f"messages: {check.ledger_expected:,} acknowledged by the broker "
        f"({check.ledger_expected / publishing:,.0f}/s over {publishing:.1f} s), "
        f"{check.ledger:,} in the ledger; samples: {stored:,} stored of {check.expected:,}"
    )
    say_(
        f"window: {window:.1f} s from first publish to last commit "
        f"({window - publishing:.1f} s after the last PUBACK)"
    )
    say_(
        f"cpu over the window (s): ingest {ingest_cpu:.1f} "
        f"({' + '.join(f'{c:.1f}' for c in cpu.ingest)}), postgres {cpu.postgres:.1f}, "
        f"{phase.broker} {cpu.mosquitto:.1f}, loadgen {loadgen_cpu:.1f}, bench {cpu.main:.1f}; "
        f"{(ingest_cpu + cpu.postgres + cpu.mosquitto + loadgen_cpu + cpu.main) / window:.2f}"
        f" of {cores} cores busy"
    )
    say_(
        f"cpu us/sample: ingest {us(ingest_cpu)}, postgres {us(cpu.postgres)}, "
        f"{phase.broker} {us(cpu.mosquitto)}, loadgen {us(loadgen_cpu)}"
    )
    for stat in m.workers:
        say_(
            f"{stat.name}: {stat.batches:,} batches of {stat.messages / max(stat.batches, 1):,.0f}"
            f" messages on average, {stat.commit_s:.1f} s writing and committing "
            f"({stat.commit_s / window:.0%} of the window), at most {stat.max_inflight:,} "
            "messages unacknowledged"
        )
    problems = phase.problems
    say_(f"ingest worker logs: {len(problems)} warning/error lines")
    for line in problems[:10]:
        say_(f"  {line}")
    for warning in m.warnings:
        say_(f"warning: {warning}")
    if m.stored_by_metrics != stored:
        say_(
            f"warning: the workers counted {m.stored_by_metrics:,} samples; "
            f"the table holds {stored:,}"
        )
    if check.ledger != check.ledger_expected:
        say_(f"warning: ledger holds {check.ledger:,} messages, {check.ledger_expected:,} acked")
    ack_errors = report_acks(args, m.acks, check, say_)
    ratio = ingest_rate / copy_rate if copy_rate else 0.0
    result = (
        f"ingest_samples_per_s={ingest_rate:.0f} copy_samples_per_s={copy_rate:.0f} "
        f"ratio={ratio:.2f} cpu_us_per_sample={per_sample:.1f} "
        f"lost={check.lost} duplicates={check.duplicates}"
    )
    failed = check.lost or check.duplicates or check.ledger != check.ledger_expected or ack_errors
    nan = float("nan")
    return Figures(
        rate=ingest_rate,
        ingest_us=ingest_cpu / stored * 1e6 if stored else nan,
        postgres_us=cpu.postgres / stored * 1e6 if stored else nan,
        mosquitto_us=cpu.mosquitto / stored * 1e6 if stored else nan,
        result=result,
        failed=bool(failed),
    )


def tls_ratios(plain: Figures, tls: Figures) -> dict[str, float]:
    """The TLS phase's CPU per sample over the plaintext phase's, by part."""
    return {
        "ingest": tls.ingest_us / plain.ingest_us,
        "mosquitto": tls.mosquitto_us / plain.mosquitto_us,
        "ingest+mosquitto": (tls.ingest_us + tls.mosquitto_us)
        / (plain.ingest_us + plain.mosquitto_us),
        "ingest+postgres": (tls.ingest_us + tls.postgres_us)
        / (plain.ingest_us + plain.postgres_us),
    }


def report_all(args: argparse.Namespace, phases: Sequence[Phase], ceiling: Ceiling) -> int:
    """Every phase's figures, the side by side, and the result; returns the exit status."""
    say(
        f"copy ceiling: {ceiling.rows:,} rows (both phases') in {ceiling.seconds:.1f} s, "
        f"cpu us/row: postgres {ceiling.postgres_cpu_s / ceiling.rows * 1e6:.1f}, "
        f"client {ceiling.main_cpu_s / ceiling.rows * 1e6:.1f}"
    )
    figures = []
    for phase in phases:
        figures.append(report(args, phase, ceiling))
        if phase is not phases[-1]:
            say(f"{phase.listener}: {figures[-1].result}")
    last = figures[-1]
    if len(phases) == 1:
        say(f"{phases[-1].listener}: {last.result}")
        return 1 if last.failed else 0
    plain, tls = figures
    ratios = tls_ratios(plain, tls)
    say(
        "tls/plaintext cpu per sample: "
        + ", ".join(f"{part} {value:.2f}" for part, value in ratios.items())
        + f"; samples/s {tls.rate / plain.rate:.2f} (goal: cpu per sample at most"
        f" {TLS_CPU_GOAL:.2f} times plaintext's)"
    )
    say(f"tls: {tls.result} tls_cpu_ratio={ratios['ingest+mosquitto']:.2f}")
    return 1 if tls.failed or plain.failed else 0


def report_acks(
    args: argparse.Namespace,
    acks: Sequence[AckResult],
    check: Check,
    line_out: Callable[[str], None] = say,
) -> bool:
    """The stored-ack line; True when a load process heard a malformed or impossible ack.

    A stored seq no ack named is reported but does not fail the run: acks are QoS 0, at most
    once by contract (protocol.md), and a device resends what was not acknowledged.
    """
    if args.no_acks:
        line_out("acks: not subscribed (--no-acks), the broker discarded them")
        return False
    messages = sum(a.messages for a in acks)
    covered = sum(a.covered for a in acks)
    stored_seqs = check.ledger_expected  # PUBACKed messages, each stored when lost=0
    line = f"acks: {messages:,} messages covering {covered:,} of {stored_seqs:,} stored seqs"
    if covered == stored_seqs:
        wait_s = max((a.wait_s for a in acks), default=0.0)
        line += f", the last heard {wait_s:.1f} s after the last PUBACK"
    else:
        short = sum(a.devices_short for a in acks)
        line += f"; {stored_seqs - covered:,} never acknowledged, on {short:,} devices"
    line_out(line)
    errors = [f"load process {a.index}: {a.error}" for a in acks if a.error]
    for error in errors:
        line_out(f"warning: {error}")
    return bool(errors)


# --- Main -------------------------------------------------------------------------------


def pre_built_messages(args: argparse.Namespace) -> int:
    """Messages pre-built per device: enough for ``--max-rate`` over ``--seconds``."""
    return messages_per_device(
        args.seconds, args.max_rate / SAMPLES_PER_MESSAGE, args.devices, args.window
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench.ingest",
        description="Telemetry ingest throughput and CPU, against COPY as the ceiling.",
    )
    parser.add_argument("--seconds", type=float, default=60.0, help="publishing time (60)")
    parser.add_argument(
        "--devices", type=int, default=1000, help="device connections in each phase (1000)"
    )
    parser.add_argument("--workers", type=int, default=2, help="ingest worker processes (2)")
    parser.add_argument("--loadgen-procs", type=int, default=1, help="load-generator processes (1)")
    parser.add_argument(
        "--window", type=int, default=20, help="unacknowledged publishes per connection (20)"
    )
    parser.add_argument(
        "--backlog",
        type=int,
        default=20_000,
        help="messages published but not yet stored, at most (20000): keeps the broker's "
        "queue short so the load generator does not outrun ingest",
    )
    parser.add_argument(
        "--max-rate",
        type=int,
        default=200_000,
        help="offered load ceiling in samples/s (200000); payloads are pre-built for it",
    )
    parser.add_argument(
        "--device-time-ago",
        type=float,
        default=DEFAULT_DEVICE_TIME_AGO_MIN,
        help="minutes before now that device time starts at (120)",
    )
    parser.add_argument(
        "--no-acks",
        action="store_true",
        help="devices do not subscribe to their ack topic, so the broker discards the stored "
        "acks ingest still publishes (GALVANI_INGEST_STORED_ACKS=false turns those off)",
    )
    parser.add_argument(
        "--tls-only",
        action="store_true",
        help="only the TLS phase (the ingest workers as in production), no plaintext one",
    )
    parser.add_argument("--keep", action="store_true", help="keep the data and logs directory")
    args = parser.parse_args(argv)
    if min(args.seconds, args.devices, args.workers, args.loadgen_procs, args.window) <= 0:
        parser.error("--seconds, --devices, --workers, --loadgen-procs and --window must be > 0")
    if args.loadgen_procs > args.devices:
        parser.error("--loadgen-procs cannot exceed --devices")
    if not 0 < args.device_time_ago < TS_PAST_LIMIT_MIN:
        parser.error("--device-time-ago must be within protocol.md's 30 days")
    # A device's last pre-built message must not be ahead of receipt, even if sent at once.
    if pre_built_messages(args) > args.device_time_ago * 60 + TS_FUTURE_LIMIT_S:
        parser.error(
            f"{pre_built_messages(args)} messages a device, one second apart, would run device "
            "time into the future: raise --device-time-ago or lower --max-rate"
        )
    return args


def run(args: argparse.Namespace) -> int:
    """Start everything, measure each phase, stop everything (in reverse order, by pid)."""
    listeners = ["tls"] if args.tls_only else ["plaintext", "tls"]
    with (
        workspace("galvani-bench-", args.keep, "data and logs kept in {}") as root,
        contextlib.ExitStack() as stack,
    ):
        bench = start_stack(
            root,
            stack,
            "bench-ingest",
            args.devices * len(listeners),
            plain_device=True,
            plain_service=not args.tls_only,
        )
        postgres, url, broker = bench.postgres, bench.url, bench.broker
        config = broker.config
        assert config.plain_device_port is not None
        with psycopg.connect(url) as conn:
            storage = conn.execute("SELECT value FROM galvani_meta WHERE key = 'storage'")
            storage_row = storage.fetchone()
        say(
            f"postgres {postgres.install.source} on port {postgres.config.port}, "
            f"storage {storage_row[0] if storage_row else '?'}, durable"
        )
        say(
            f"mosquitto: devices on TLS port {config.device_port}"
            + ("" if args.tls_only else f" and plaintext port {config.plain_device_port}")
            + f", ingest on TLS port {config.service_port}"
            + ("" if args.tls_only else f" and plaintext port {config.plain_service_port}")
            + f"; {len(bench.logins)} devices provisioned, {args.devices} a phase"
        )
        phases = []
        for index, listener in enumerate(listeners):
            logins = bench.logins[index * args.devices : (index + 1) * args.devices]
            phases.append(measure_phase(args, bench, listener, logins, stack))
        assert postgres.child is not None
        ceiling = copy_ceiling(url, postgres.child.pid)
        return report_all(args, phases, ceiling)


def measure_phase(
    args: argparse.Namespace,
    bench: BenchStack,
    listener: str,
    logins: list[DeviceLogin],
    stack: contextlib.ExitStack,
) -> Phase:
    """Start ingest workers on ``listener`` ("tls" or "plaintext"), publish from ``logins``,
    check what was stored, and stop the workers."""
    config = bench.broker.config
    assert config.plain_device_port is not None
    if listener == "tls":
        port, tls = config.service_port, 1
    else:
        assert config.plain_service_port is not None
        port, tls = config.plain_service_port, 0
    say(
        f"--- {listener}: devices and ingest workers on the {listener} device and service "
        f"listeners (service port {port})"
    )
    # "connected to" is how start-up is followed; probe_workers waits for the rest.
    workers = bench.start_workers(
        "ingest",
        distinct_free_ports(args.workers),
        ready="connected to",
        mqtt_port=port,
        mqtt_tls=tls,
    )
    probe_workers(workers, config.plain_device_port, logins[0])
    say(f"{len(workers)} ingest workers up and storing")

    # Devices as well as workers: the TLS phase's devices publish to the TLS device listener,
    # so Mosquitto's decryption of their traffic is in its CPU per sample.
    device_port, ca_file = (
        (config.device_port, str(config.pki.ca_file))
        if listener == "tls"
        else (config.plain_device_port, None)
    )
    broker = bench.broker.child
    assert broker is not None
    measured = Run(
        args,
        logins,
        lambda: process_cpu_s(broker.pid),
        [device_port],
        bench.postgres,
        workers,
        ca_file,
    )
    stack.callback(measured.stop_load)
    measured.start_load()
    say(f"publishing for {args.seconds:.0f} s")
    measurement = measured.measure()
    measured.stop_load()
    for worker in workers:
        worker.child.stop()  # the next phase's workers take over their client ids
    problems = log_problems(workers)
    for worker in workers:
        # The next phase's workers log to the same names, and start-up is followed by what
        # their log says: this phase's logs move aside (kept with --keep).
        log_path = worker.child.log_path
        log_path.rename(log_path.with_name(f"{listener}-{log_path.name}"))
    check = verify(bench.url, measurement.acked_by_device, [login.device_id for login in logins])
    return Phase(listener, measurement, check, problems)


def main(argv: Sequence[str] | None = None) -> int:
    """``make bench-ingest``; returns the exit status."""
    args = parse_args(argv)
    return run_main("bench-ingest", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
