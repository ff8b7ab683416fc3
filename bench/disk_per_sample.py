"""Bytes on disk per stored sample, and the CPU per sample of the ingest writer and the rules
engine at the batch sizes a loaded worker reaches; the figures docs/capacity.md rests on.

One run, all of it on this machine: a durable PostgreSQL with TimescaleDB (production
settings, as the other benchmarks start it) on a free loopback port in a temporary directory,
and two databases migrated by the real migrations, one per load shape:

* ``session``: ``--session-devices`` devices each in one LIFT session of ``--session-seconds``
  at 10 Hz, one telemetry message of 10 samples a second, with its ``session_start`` and
  ``session_end`` events: the shape of a device in use;
* ``idle``: ``--idle-devices`` devices each sending the idle heartbeat (protocol.md: one
  sample a minute, one message each) for ``--idle-minutes``.

Messages reach the database as a worker writes them, without the broker: each payload is
decoded by ingest's own ``decode_inbound`` and stored by its ``write_batch`` in transactions
of ``--batch`` messages (the ledger, samples by COPY, sessions, the device rows); then the same
messages are decoded by the rules worker's ``to_received`` and evaluated by ``evaluate`` in
batches of the same size; then one maintenance pass (``run_pass``) computes the rollups. After
each step: the CPU of this process (the client side) and of every PostgreSQL process, the WAL
written, and at the end each table's size with its indexes (``hypertable_size`` for the
hypertable, ``pg_total_relation_size`` for the rest) after a checkpoint.

What it does not measure: the broker, the subscriber's receive loop (``make bench-ingest-floor``:
about 0.4 µs a sample), acks. And TimescaleDB's native compression: Debian's build is the
Apache-licensed one, without compression, so every figure here is uncompressed.

    python -m bench.disk_per_sample [--session-devices 170 --session-seconds 600 ...]
"""

import argparse
import contextlib
import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Final

import psycopg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench.harness import postgres_cpu_s, run_main, say, start_postgres, workspace
from deploy.stack.postgres import PostgresServer
from services.common.db import connect, storage_of
from services.common.migrate import upgrade
from services.common.protocol.topics import device_topic
from services.common.subscriber import Inbound
from services.ingest.decode import decode_inbound
from services.ingest.writer import write_batch
from services.maintenance.jobs import run_pass
from services.rules.engine import Received, evaluate
from services.rules.main import to_received

BENCH: Final = "bench-disk"
BRAND: Final = "disk"
SESSION_ID_LEN: Final = 8
# The tables a sample, its message or its session leaves rows in, in the order reported.
HYPERTABLES: Final = ("samples",)
TABLES: Final = (
    "telemetry_messages",
    "events",
    "sessions",
    "samples_1m",
    "samples_1h",
    "rule_samples",
    "rule_sessions",
    "alert_triggers",
    "alerts",
    "devices",
)

Message = tuple[str, bytes]  # topic, payload


def session_messages(devices: int, seconds: int, end_ms: int) -> list[Message]:
    """Every device in one LIFT session of ``seconds`` that ends at ``end_ms``, interleaved
    by second as the broker would interleave them."""
    start_ms = end_ms - seconds * 1000
    out: list[Message] = []
    for d in range(devices):
        device = _device_id(d)
        out.append(
            _event(device, 1, start_ms, "session_start", mode="LIFT", level=3, user=None, d=d)
        )
    for t in range(seconds):
        for d in range(devices):
            device = _device_id(d)
            base = start_ms + t * 1000
            samples = [_session_sample(base + 100 * k, t * 10 + k, d) for k in range(10)]
            body = {"v": 1, "seq": 2 + t, "session": _session(d), "samples": samples}
            out.append((device_topic(device, "telemetry"), _json(body)))
    for d in range(devices):
        device = _device_id(d)
        out.append(
            _event(
                device,
                2 + seconds,
                end_ms,
                "session_end",
                duration_s=seconds,
                reason="completed",
                d=d,
            )
        )
    return out


def idle_messages(devices: int, minutes: int, end_ms: int) -> list[Message]:
    """Every device sending its idle heartbeat once a minute, the devices spread over it
    (protocol/vectors/telemetry.json, ``idle_heartbeat``)."""
    start_ms = end_ms - minutes * 60_000
    out: list[Message] = []
    for m in range(minutes):
        for d in range(devices):
            ts = start_ms + m * 60_000 + d * 60_000 // devices
            sample = {
                "ts": ts,
                "mode": None,
                "level": 0,
                "out": False,
                "i_ua": 0,
                "t_batt_c": round(24.5 + (d % 7) * 0.1 + m * 0.01, 2),
                "batt_pct": max(0, 64 - m // 10),
                "charging": m % 2 == 0,
            }
            body = {"v": 1, "seq": 1 + m, "session": None, "samples": [sample]}
            out.append((device_topic(_device_id(d), "telemetry"), _json(body)))
    return out


def _device_id(d: int) -> str:
    return f"disk-{d:07d}"


def _session(d: int) -> str:
    return f"s-{d:0{SESSION_ID_LEN - 2}x}"


def _session_sample(ts: int, i: int, d: int) -> dict[str, object]:
    """protocol.md's example sample (protocol/vectors/telemetry.json, ``spec_example``), its
    readings moved a little from sample to sample, as a real session's are."""
    wobble = ((i * 7 + d) % 13 - 6) / 10
    return {
        "ts": ts,
        "mode": "LIFT",
        "level": 3,
        "out": i % 600 >= 10,
        "i_ua": round(300.0 + wobble * 3, 1),
        "i_set_ua": 300.0,
        "v_v": round(6.1 + wobble / 10, 2),
        "z_ohm": 8200 + (i % 97) * 10,
        "t_elec_c": round(31.0 + i / 2000, 2),
        "t_batt_c": round(30.0 + i / 3000, 2),
        "batt_pct": max(0, 78 - i // 1200),
        "charging": False,
    }


def _event(device: str, seq: int, ts: int, type_: str, *, d: int, **fields: object) -> Message:
    body = {"v": 1, "seq": seq, "ts": ts, "type": type_, "session": _session(d), **fields}
    return device_topic(device, "events"), _json(body)


def _json(body: Mapping[str, object]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


# --- measuring -------------------------------------------------------------------------------


@dataclass
class Step:
    """One step's cost: this process's CPU, PostgreSQL's, the WAL it wrote, the wall time."""

    name: str
    client_s: float = 0.0
    postgres_s: float = 0.0
    wal_bytes: int = 0
    wall_s: float = 0.0
    parts: dict[str, float] = field(default_factory=dict)


@contextlib.contextmanager
def measured(
    name: str, postmaster: int, admin: psycopg.Connection[tuple[object, ...]]
) -> Iterator[Step]:
    """Time the block: CPU of this process and of the whole PostgreSQL cluster, WAL written."""
    step = Step(name)
    lsn0 = _lsn(admin)
    pg0, cpu0, t0 = postgres_cpu_s(postmaster), time.process_time(), time.perf_counter()
    yield step
    step.wall_s = time.perf_counter() - t0
    step.client_s = time.process_time() - cpu0
    step.postgres_s = postgres_cpu_s(postmaster) - pg0
    step.wal_bytes = _wal_since(admin, lsn0)


def _lsn(admin: psycopg.Connection[tuple[object, ...]]) -> str:
    row = admin.execute("SELECT pg_current_wal_lsn()::text").fetchone()
    assert row is not None
    return str(row[0])


def _wal_since(admin: psycopg.Connection[tuple[object, ...]], lsn: str) -> int:
    row = admin.execute(
        "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s::pg_lsn)", [lsn]
    ).fetchone()
    assert row is not None
    return _int(row[0])


def batches(messages: Sequence[Message], size: int) -> Iterator[Sequence[Message]]:
    for start in range(0, len(messages), size):
        yield messages[start : start + size]


def inbound(topic: str, payload: bytes, received_at: datetime) -> Inbound:
    return Inbound(topic, payload, 0, 1, received_at, 0)


def ingest_step(url: str, messages: Sequence[Message], size: int, step: Step) -> int:
    """Store every message as an ingest worker does; return the samples stored."""
    stored = 0
    decode_s = write_s = 0.0
    with connect(url) as conn:
        storage = storage_of(conn)
        conn.commit()
        for batch in batches(messages, size):
            now = datetime.now(UTC)
            c0 = time.process_time()
            decoded = [decode_inbound(inbound(t, p, now)) for t, p in batch]
            c1 = time.process_time()
            with conn.transaction():
                outcome = write_batch(conn, decoded, storage)
            write_s += time.process_time() - c1
            decode_s += c1 - c0
            stored += outcome.samples_stored
    step.parts = {"decode": decode_s, "write": write_s}
    return stored


def rules_step(url: str, messages: Sequence[Message], size: int, step: Step) -> None:
    """Evaluate every message as a rules worker does (its decode, then ``evaluate``)."""
    key = Ed25519PrivateKey.generate()
    decode_s = evaluate_s = 0.0
    with connect(url) as conn:
        for batch in batches(messages, size):
            now = datetime.now(UTC)
            c0 = time.process_time()
            received: list[Received] = [
                r for t, p in batch if (r := to_received(inbound(t, p, now))) is not None
            ]
            c1 = time.process_time()
            with conn.transaction():
                evaluate(conn, key, received)
            evaluate_s += time.process_time() - c1
            decode_s += c1 - c0
    step.parts = {"decode": decode_s, "evaluate": evaluate_s}


def sizes(admin: psycopg.Connection[tuple[object, ...]]) -> dict[str, tuple[int, int]]:
    """Each table's (bytes with indexes and TOAST, rows), after a checkpoint."""
    admin.execute("CHECKPOINT")
    out: dict[str, tuple[int, int]] = {}
    for table in HYPERTABLES:
        out[table] = (_one(admin, f"SELECT hypertable_size('{table}')"), _rows(admin, table))
    for table in TABLES:
        out[table] = (_one(admin, f"SELECT pg_total_relation_size('{table}')"), _rows(admin, table))
    return out


def _rows(admin: psycopg.Connection[tuple[object, ...]], table: str) -> int:
    return _one(admin, f"SELECT count(*) FROM {table}")  # noqa: S608 - constant table names


def _one(admin: psycopg.Connection[tuple[object, ...]], query: str) -> int:
    row = admin.execute(query).fetchone()
    return _int(row[0]) if row else 0


def _int(value: object) -> int:
    """An integer PostgreSQL sent as int or numeric (``pg_wal_lsn_diff``), None as 0."""
    return 0 if value is None else int(str(value))


def _detail(admin: psycopg.Connection[tuple[object, ...]]) -> str:
    row = admin.execute(
        "SELECT table_bytes, index_bytes, toast_bytes FROM hypertable_detailed_size('samples')"
    ).fetchone()
    assert row is not None
    return f"table {row[0]:,} B, indexes {row[1]:,} B, toast {row[2]:,} B"


# --- one load shape ----------------------------------------------------------------------------


def run_shape(
    postgres: PostgresServer,
    name: str,
    devices: int,
    build: Callable[[int], list[Message]],
    args: argparse.Namespace,
) -> None:
    url = postgres.create_database(f"disk_{name}")
    upgrade(url)
    postmaster = postgres.child.pid if postgres.child else 0
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute("INSERT INTO brands (id, name) VALUES (%s, %s)", [BRAND, BRAND])
        admin.execute(
            "INSERT INTO devices (id, brand_id, model)"
            " SELECT 'disk-' || lpad(i::text, 7, '0'), %s, 'm1' FROM generate_series(0, %s - 1) i",
            [BRAND, devices],
        )
        row = admin.execute(
            "SELECT extversion, current_setting('timescaledb.license')"
            " FROM pg_extension WHERE extname = 'timescaledb'"
        ).fetchone()
        say(f"[{name}] TimescaleDB {row[0] if row else 'none'} (license {row[1] if row else '-'})")
        end_ms = int(time.time() * 1000) - 60_000
        messages = build(end_ms)
        say(f"[{name}] {devices:,} devices, {len(messages):,} messages")
        admin.execute("CHECKPOINT")
        with measured("ingest", postmaster, admin) as ingest:
            samples = ingest_step(url, messages, args.batch, ingest)
        steps = [ingest]
        if not args.skip_rules:
            with measured("rules", postmaster, admin) as rules:
                rules_step(url, messages, args.batch, rules)
            steps.append(rules)
        with measured("rollups", postmaster, admin) as rollups, connect(url) as conn:
            run_pass(conn, datetime.now(UTC), timedelta(hours=args.rollup_lookback_h))
        steps.append(rollups)
        for step in steps:
            parts = ", ".join(f"{k} {v / samples * 1e6:.2f}" for k, v in step.parts.items())
            say(
                f"[{name}] {step.name}: {samples:,} samples in {step.wall_s:.1f} s;"
                f" cpu us/sample: client {step.client_s / samples * 1e6:.2f}"
                + (f" ({parts})" if parts else "")
                + f", postgres {step.postgres_s / samples * 1e6:.2f};"
                f" wal {step.wal_bytes / samples:.0f} B/sample"
            )
        table_sizes = sizes(admin)
        say(f"[{name}] samples: {_detail(admin)}")
        total = 0
        for table, (size, rows) in table_sizes.items():
            if not rows and not size:
                continue
            per_row = size / rows if rows else 0.0
            say(
                f"[{name}] {table}: {size:,} B, {rows:,} rows, {per_row:.1f} B/row,"
                f" {size / samples:.1f} B/sample"
            )
            if table != "devices" and rows:
                total += size
        raw = table_sizes["samples"][0]
        telemetry = raw + table_sizes["telemetry_messages"][0]
        say(
            f"{name}: samples={samples} bytes_per_sample_raw={raw / samples:.1f}"
            f" bytes_per_sample_raw_and_ledger={telemetry / samples:.1f}"
            f" bytes_per_sample_all={total / samples:.1f}"
            f" wal_bytes_per_sample={sum(s.wal_bytes for s in steps) / samples:.0f}"
        )


def run(args: argparse.Namespace) -> int:
    with (
        workspace("galvani-bench-disk-", args.keep, "kept: {}") as root,
        contextlib.ExitStack() as stack,
    ):
        postgres = start_postgres(root, stack, BENCH)
        say(f"PostgreSQL with TimescaleDB on port {postgres.config.port}, durable, in {root}")
        with psycopg.connect(postgres.config.url("postgres")) as conn:
            version = conn.execute("SHOW server_version").fetchone()
        say(f"PostgreSQL {version[0] if version else '?'}")
        if args.session_devices:
            run_shape(
                postgres,
                "session",
                args.session_devices,
                lambda end: session_messages(args.session_devices, args.session_seconds, end),
                args,
            )
        if args.idle_devices:
            run_shape(
                postgres,
                "idle",
                args.idle_devices,
                lambda end: idle_messages(args.idle_devices, args.idle_minutes, end),
                args,
            )
    return 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--session-devices", type=int, default=170)
    parser.add_argument("--session-seconds", type=int, default=600)
    parser.add_argument("--idle-devices", type=int, default=10_000)
    parser.add_argument("--idle-minutes", type=int, default=20)
    parser.add_argument("--batch", type=int, default=500, help="messages per transaction")
    parser.add_argument("--rollup-lookback-h", type=float, default=2.0)
    parser.add_argument("--skip-rules", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    raise SystemExit(run_main(BENCH, lambda: run(args)))


if __name__ == "__main__":
    main()
