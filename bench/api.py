"""``make bench-api``: API latency at 20 concurrent clients on a month of a 10,000-device fleet.

1. A PostgreSQL cluster with TimescaleDB, migrated and seeded by binary COPY
   (:mod:`bench.api_seed`: 10,000 devices of one brand and a few of a second, a month of
   sessions at 10 Hz, over 50 million samples, sessions, events, alerts; rollups by the
   maintenance job; VACUUM ANALYZE). Seeding takes minutes, so the cluster is kept under
   ``.galvani/bench-api/<key>`` (key: the seed parameters, the seed format and the migration
   head) and reused unless ``--reseed``. It is seeded with durability off and measured with
   production settings (durable), on a free loopback port.
2. The API as ``make run`` starts it (``python -m services.api.main``: uvicorn with
   ``--workers`` processes, default 2 as ``GALVANI_API_WORKERS``; loopback, free port), with
   an admin key of the brand issued by ``services.common.api_keys.issue_key``.
3. Per endpoint, ``--clients`` closed loops (each sends its next request when the previous
   answer arrives) for ``--warmup`` + ``--seconds``, a random device per request, every
   answer checked (status 200 and its body).

The result is one line per endpoint::

    endpoint=NAME p50_ms=N p95_ms=N requests_per_s=N errors=N
"""

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import psycopg
from alembic.script import ScriptDirectory

from bench.api_seed import BRAND, RIVAL, SeedParams, device_id, make_plan, seed
from bench.harness import (
    REPO_ROOT,
    postgres_cpu_s,
    process_cpu_s,
    require_timescaledb,
    run_main,
    say,
    workspace,
)
from bench.http_load import Check, percentile, run_load
from deploy.stack.ports import LOOPBACK, free_port, listeners
from deploy.stack.postgres import PostgresServer, local_server, new_password
from deploy.stack.processes import Child, child_pids, http_ok, service_env, spawn, wait_until
from services.common import api_keys
from services.common.migrate import alembic_config, upgrade

CACHE_ROOT: Final = REPO_ROOT / ".galvani" / "bench-api"
# Bumped whenever what the seed writes changes, so an old cache is not taken for a new one.
SEED_FORMAT: Final = 2
API_READY_TIMEOUT_S: Final = 60.0
MIN_FREE_GB: Final = 20


@dataclass(frozen=True)
class Endpoint:
    name: str
    paths: Callable[[random.Random], str]
    check: Check


def migration_head() -> str:
    """The newest migration revision (part of the cache key)."""
    script = ScriptDirectory.from_config(alembic_config("postgresql://unused"))
    return ",".join(sorted(script.get_heads()))


def cache_key(params: SeedParams) -> str:
    text = json.dumps(
        {"params": asdict(params), "format": SEED_FORMAT, "head": migration_head()},
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class SeedingPostgres(PostgresServer):
    """The bench cluster while it is being seeded: no fsync, no autovacuum.

    A clean shutdown writes everything out before the cluster is used, with production
    settings, for measuring.
    """

    def server_args(self) -> list[str]:
        extra = {
            # Not larger: WAL segments recycled for reuse stay on disk with the cluster (a
            # 32 GB setting left 9 GB behind). Without fsync, checkpoints cost little.
            "max_wal_size": "2GB",
            "maintenance_work_mem": "1GB",
            "autovacuum": "off",
        }
        args = super().server_args()
        for key, value in extra.items():
            args += ["-c", f"{key}={value}"]
        return args


def _server(directory: Path, *, seeding: bool) -> PostgresServer:
    password_file = directory / "pg-password"
    if not password_file.is_file():
        fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(new_password())
    return local_server(
        directory,
        durable=not seeding,
        install=require_timescaledb("bench-api"),
        password=password_file.read_text().strip(),
        log_name="postgres-seed.log" if seeding else "postgres.log",
        server_class=SeedingPostgres if seeding else PostgresServer,
    )


def seeded_cluster(params: SeedParams, reseed: bool, processes: int) -> tuple[Path, dict[str, Any]]:
    """The cache directory of a seeded cluster for ``params``, seeding it when needed."""
    directory = CACHE_ROOT / cache_key(params)
    marker = directory / "seeded.json"
    if marker.is_file() and not reseed:
        info: dict[str, Any] = json.loads(marker.read_text())
        say(f"reusing the seeded cluster in {directory.relative_to(REPO_ROOT)} (--reseed to redo)")
        return directory, info
    if CACHE_ROOT.is_dir():
        for old in CACHE_ROOT.iterdir():  # one data set at a time: each is ~10 GB
            say(f"removing the old bench cluster {old.relative_to(REPO_ROOT)}")
            shutil.rmtree(old)
    free_gb = shutil.disk_usage(REPO_ROOT).free / 2**30
    if free_gb < MIN_FREE_GB:
        raise SystemExit(f"bench-api: {free_gb:.0f} GB free, seeding needs about {MIN_FREE_GB}")
    directory.mkdir(parents=True)
    for path in (CACHE_ROOT, directory):
        os.chmod(path, 0o755)  # noqa: S103 - the server may run as another user (root runs)
    end = datetime.now(UTC).replace(second=0, microsecond=0)
    plan = make_plan(params, end)
    say(
        f"seeding {directory.relative_to(REPO_ROOT)}: {len(plan.devices):,} devices, "
        f"{len(plan.sessions):,} sessions, {plan.samples:,} samples ({free_gb:.0f} GB free)"
    )
    server = _server(directory, seeding=True)
    try:
        server.start()
        url = server.config.url()
        upgrade(url)
        t0 = time.monotonic()
        info = seed(url, plan, processes, say)
        info["seed_s"] = round(time.monotonic() - t0)
    finally:
        server.stop()
    os.sync()
    marker.write_text(json.dumps(info, indent=2) + "\n")
    say(f"seeded in {info['seed_s']} s, database {info['database_size']}")
    return directory, info


def start_api(url: str, workers: int, root: Path, stack: contextlib.ExitStack) -> tuple[Child, int]:
    """The API process on a free loopback port, as ``make run`` starts it."""
    port = free_port()
    env = service_env(
        "API",
        database_url=url,
        port=port,
        data_dir=str(root),
        mqtt_password=new_password(),
        log_level="WARNING",
        # One key drives all the load: its rate limit (50/s by default) is not measured.
        rate_limit_per_s=1_000_000,
        rate_limit_burst=1_000_000,
        workers=workers,
    )
    argv = [sys.executable, "-m", "services.api.main"]
    api = spawn("api", argv, root / "api.log", env=env, cwd=REPO_ROOT)
    stack.callback(api.stop)
    wait_until(
        lambda: http_ok(f"http://{LOOPBACK}:{port}/healthz") and listeners(port) == workers,
        child=api,
        timeout_s=API_READY_TIMEOUT_S,
        what="the API",
    )
    return api, port


def _get(port: int, path: str, key: str) -> tuple[int, Any]:
    request = urllib.request.Request(
        f"http://{LOOPBACK}:{port}{path}", headers={"Authorization": f"Bearer {key}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
            return int(response.status), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), json.loads(exc.read() or b"null")


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


def endpoints(conn: psycopg.Connection[tuple[object, ...]], info: dict[str, Any]) -> list[Endpoint]:
    """The five measured endpoints, each with its devices and its check of an answer."""
    end = datetime.fromisoformat(info["end"])
    end_ms = int(end.timestamp() * 1000)
    day_ms, month_ms = 86_400_000, int(info["params"]["days"]) * 86_400_000
    devices = [device_id(BRAND, n) for n in range(int(info["params"]["devices"]))]
    used = [
        str(r[0])
        for r in conn.execute(
            "SELECT DISTINCT device_id FROM sessions WHERE brand_id = %s ORDER BY 1", [BRAND]
        )
    ]
    recent = [
        str(r[0])
        for r in conn.execute(
            "SELECT DISTINCT device_id FROM sessions WHERE brand_id = %s AND ended_at > %s"
            " ORDER BY 1",
            [BRAND, end - timedelta(days=1)],
        )
    ]
    open_alerts = conn.execute(
        "SELECT count(*), count(*) FILTER (WHERE state = 'open') FROM alerts"
        " WHERE brand_id = %s AND state <> 'resolved'",
        [BRAND],
    ).fetchone()
    assert open_alerts is not None
    page = min(50, int(str(open_alerts[1])))
    say(
        f"devices: {len(devices):,} (detail), {len(recent):,} used in the last 24 h "
        f"(24 h telemetry), {len(used):,} used in the month (30-day telemetry)"
    )

    def device_check(path: str, status: int, body: bytes) -> str | None:
        doc = _json(body)
        if status != 200 or not isinstance(doc, dict):
            return f"status {status}"
        return None if doc.get("device_id") == path.rsplit("/", 1)[1] else "another device"

    def telemetry_check(bucket: str) -> Check:
        def check(path: str, status: int, body: bytes) -> str | None:
            doc = _json(body)
            if status != 200 or not isinstance(doc, dict):
                return f"status {status}"
            points = doc.get("points") or []
            if doc.get("bucket") != bucket or not points or points[0].get("n", 0) < 1:
                return "no points"
            return None

        return check

    def alerts_check(path: str, status: int, body: bytes) -> str | None:
        doc = _json(body)
        if status != 200 or not isinstance(doc, dict):
            return f"status {status}"
        items = doc.get("items") or []
        if len(items) != page or any(i.get("state") != "open" for i in items):
            return f"{len(items)} items"
        return None

    expected_open = int(str(open_alerts[0]))

    def summary_check(path: str, status: int, body: bytes) -> str | None:
        doc = _json(body)
        if status != 200 or not isinstance(doc, dict):
            return f"status {status}"
        if doc.get("devices") != len(devices) or doc["open_alerts"]["total"] != expected_open:
            return f"devices {doc.get('devices')}, open alerts {doc['open_alerts']['total']}"
        return None

    def telemetry_paths(pool: Sequence[str], span_ms: int, bucket: str) -> Callable[..., str]:
        query = f"/telemetry?from={end_ms - span_ms}&to={end_ms}&bucket={bucket}"
        return lambda rng: f"/v1/devices/{rng.choice(pool)}{query}"

    return [
        Endpoint("device_detail", lambda rng: f"/v1/devices/{rng.choice(devices)}", device_check),
        Endpoint("telemetry_24h_1m", telemetry_paths(recent, day_ms, "1m"), telemetry_check("1m")),
        Endpoint("telemetry_30d_1h", telemetry_paths(used, month_ms, "1h"), telemetry_check("1h")),
        Endpoint("alerts_open", lambda rng: "/v1/alerts?state=open", alerts_check),
        Endpoint("fleet_summary", lambda rng: "/v1/fleet/summary", summary_check),
    ]


def check_isolation(port: int, key: str) -> None:
    """The brand's key must not see the other brand's devices."""
    other = device_id(RIVAL, 0)
    for path in (
        f"/v1/devices/{other}",
        f"/v1/devices/{other}/telemetry?from=0&to=9999999999999&bucket=1d",
    ):
        status, _ = _get(port, path, key)
        if status != 404:
            raise SystemExit(f"bench-api: {path} answered {status} to another brand's key")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench-api", description=__doc__.split("\n")[0])
    seed_group = parser.add_argument_group("the data set (the cache is keyed by these)")
    seed_group.add_argument("--devices", type=int, default=10_000)
    seed_group.add_argument(
        "--active-devices", type=int, default=1_200, help="devices used in the month"
    )
    seed_group.add_argument("--sessions-min", type=int, default=5, help="per used device")
    seed_group.add_argument("--sessions-max", type=int, default=15, help="per used device")
    seed_group.add_argument("--days", type=int, default=30)
    seed_group.add_argument("--rival-devices", type=int, default=20, help="of a second brand")
    seed_group.add_argument("--open-alerts", type=int, default=300)
    seed_group.add_argument("--resolved-alerts", type=int, default=3_000)
    seed_group.add_argument("--seed", type=int, default=1)
    parser.add_argument("--reseed", action="store_true", help="seed again even if cached")
    parser.add_argument("--seed-processes", type=int, default=2, help="COPY streams")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds, not measured")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured, per endpoint")
    parser.add_argument(
        "--workers", type=int, default=2, help="API processes (GALVANI_API_WORKERS; as make run)"
    )
    parser.add_argument("--only", default=None, help="comma-separated endpoint names")
    parser.add_argument("--keep", action="store_true", help="keep the API's log")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    # The seed group's options are SeedParams' fields, one for one.
    params = SeedParams(**{f.name: getattr(args, f.name) for f in fields(SeedParams)})
    directory, info = seeded_cluster(params, args.reseed, args.seed_processes)
    say(
        f"data: {info['samples']:,} samples, {info['sessions']:,} sessions, "
        f"{info['devices']:,} devices, ending {info['end']} "
        f"(rollups refreshed to {info['refreshed_to']}), database {info['database_size']}"
    )
    with (
        workspace("galvani-bench-api-", args.keep, "the API's log is kept in {}") as root,
        contextlib.ExitStack() as stack,
    ):
        server = _server(directory, seeding=False)
        stack.callback(server.stop)
        server.start()
        url = server.config.url()
        upgrade(url)  # a no-op: the cache key holds the migration head
        with psycopg.connect(url, autocommit=True) as conn:
            # Dirty buffers from start-up written now, not by a checkpoint in mid-measurement.
            conn.execute("CHECKPOINT")
        with psycopg.connect(url) as conn:
            key = api_keys.issue_key(
                conn, role=api_keys.Role.ADMIN, name="bench-api", brand_id=BRAND
            ).key
            conn.commit()
            measured = endpoints(conn, info)
        api, port = start_api(url, args.workers, root, stack)
        check_isolation(port, key)
        assert server.child is not None
        postmaster = server.child.pid
        load = os.getloadavg()
        say(
            f"api: {args.workers} process(es) on port {port}; postgres on port "
            f"{server.config.port}, durable; load average {load[0]:.2f} {load[1]:.2f}"
        )
        if args.only:
            wanted = set(args.only.split(","))
            measured = [e for e in measured if e.name in wanted]
        lines = []
        failed = False
        workers = child_pids(api.pid)
        for n, endpoint in enumerate(measured):
            before = (postgres_cpu_s(api.pid), postgres_cpu_s(postmaster), _self_cpu())
            workers_before = [process_cpu_s(pid) for pid in workers]
            result = run_load(
                LOOPBACK,
                port,
                {"Authorization": f"Bearer {key}"},
                endpoint.paths,
                endpoint.check,
                clients=args.clients,
                warmup_s=args.warmup,
                seconds=args.seconds,
                seed=args.seed * 100 + n,
            )
            after = (postgres_cpu_s(api.pid), postgres_cpu_s(postmaster), _self_cpu())
            workers_after = [process_cpu_s(pid) for pid in workers]
            window = args.warmup + args.seconds
            # Each keep-alive connection stays with the process that accepted it.
            per_worker = "+".join(
                f"{100 * (a - b) / window:.0f}"
                for a, b in zip(workers_after, workers_before, strict=True)
            )
            api_cpu, pg_cpu, gen_cpu = (
                100 * (a - b) / window for a, b in zip(after, before, strict=True)
            )
            if not result.latencies:
                say(f"endpoint={endpoint.name}: no answer passed its check ({result.first_error})")
                failed = True
                continue
            count = len(result.latencies) + result.errors
            requests_per_s = count / result.window_s
            say(
                f"  {endpoint.name}: cpu_pct api={api_cpu:.0f} ({per_worker}) "
                f"postgres={pg_cpu:.0f} loadgen={gen_cpu:.0f}; cpu_ms_per_request api="
                f"{api_cpu * 10 / requests_per_s:.2f} postgres={pg_cpu * 10 / requests_per_s:.2f}"
                + (f"; first error: {result.first_error}" if result.errors else "")
            )
            p50 = 1000 * percentile(result.latencies, 0.50)
            p95 = 1000 * percentile(result.latencies, 0.95)
            lines.append(
                f"endpoint={endpoint.name} p50_ms={p50:.1f} p95_ms={p95:.1f} "
                f"requests_per_s={requests_per_s:.0f} errors={result.errors}"
            )
            failed = failed or result.errors > 0
        for line in lines:
            say(line)
        return 1 if failed else 0


def _self_cpu() -> float:
    return process_cpu_s(os.getpid())


def main(argv: Sequence[str] | None = None) -> int:
    """``make bench-api``; returns the exit status."""
    args = parse_args(argv)
    return run_main("bench-api", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
