"""What the benchmarks share: a stack of their own (PostgreSQL, Mosquitto, provisioned devices,
service workers) on free loopback ports, CPU accounting from /proc, a work directory, and the
report's lines.

Everything a benchmark starts is registered on its ``contextlib.ExitStack`` and stopped by
pid, in reverse order, however the run ends.
"""

import contextlib
import functools
import os
import shutil
import signal
import sys
import tempfile
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Final

import psycopg

from bench.mqtt_load import DeviceLogin
from deploy.stack.mosquitto import MosquittoBroker, local_broker
from deploy.stack.pki import DevelopmentPKI
from deploy.stack.ports import LOOPBACK
from deploy.stack.postgres import (
    PostgresInstall,
    PostgresServer,
    local_server,
    new_password,
    require_postgres,
)
from deploy.stack.processes import Child, child_pids, service_env, spawn, wait_until
from services.common.broker_auth import BrokerFiles, ServiceAccount, sync_device_credentials
from services.common.migrate import upgrade
from services.common.provisioning import provision_device

REPO_ROOT: Final = Path(__file__).resolve().parents[1]
BRAND: Final = "bench"
DEVICE_MODEL: Final = "bench-1"
WORKER_READY_TIMEOUT_S: Final = 30.0
CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")


def say(line: str) -> None:
    """One line of the report, flushed at once (make pipes stdout)."""
    print(line, flush=True)


# --- CPU accounting ---------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as stat:
        text = stat.read()
    # The command name is in parentheses and may contain spaces: split after the last ')'.
    return text[text.rindex(")") + 2 :].split()


def process_cpu_s(pid: int, *, reaped_children: bool = False) -> float:
    """utime + stime of ``pid`` (all its threads), plus its reaped children's when asked."""
    fields = _stat_fields(pid)  # fields[0] is field 3 of proc(5): utime is 14, stime 15
    ticks = int(fields[11]) + int(fields[12])
    if reaped_children:
        ticks += int(fields[13]) + int(fields[14])  # cutime, cstime
    return ticks / CLOCK_TICKS


def postgres_cpu_s(postmaster: int) -> float:
    """CPU of a whole process tree: the parent and every process it started.

    Named for a PostgreSQL cluster, whose backends, autovacuum and TimescaleDB workers come
    and go. A live child's CPU is read from its own stat; a child that exited has been reaped
    by the parent, which adds its CPU to the parent's cutime/cstime. So live children + the
    parent's own and reaped time covers every process the tree ran, whenever it started or
    ended.
    """
    total = process_cpu_s(postmaster, reaped_children=True)
    for pid in child_pids(postmaster):
        with contextlib.suppress(OSError, ValueError):  # exited since the listing
            total += process_cpu_s(pid)
    return total


# --- The stack --------------------------------------------------------------------------


def require_timescaledb(bench: str) -> PostgresInstall:
    """This machine's PostgreSQL, which must have TimescaleDB (measured as in production)."""
    install = require_postgres()
    if not install.has_timescaledb:
        raise SystemExit(
            f"{bench}: TimescaleDB is not installed for this PostgreSQL; run it through "
            f"`make {bench}`, which installs it"
        )
    return install


def start_postgres(root: Path, stack: contextlib.ExitStack, bench: str) -> PostgresServer:
    """A durable (production-settings) cluster with TimescaleDB preloaded, or a clear error."""
    server = local_server(root, durable=True, install=require_timescaledb(bench))
    stack.callback(server.stop)  # registered first: stopped even if start() is interrupted
    server.start()
    return server


def start_broker(
    root: Path,
    passwords: dict[ServiceAccount, str],
    stack: contextlib.ExitStack,
    *,
    plain_device: bool = False,
    plain_service: bool = False,
) -> MosquittoBroker:
    """Mosquitto with Galvani's generated configuration (every listener TLS, with a PKI of
    the run's own, plus the plaintext listeners asked for) and no devices yet."""
    broker = local_broker(
        root / "mosquitto",
        passwords,
        DevelopmentPKI.ensure(root / "pki"),
        plain_device=plain_device,
        plain_service=plain_service,
    )
    stack.callback(broker.stop)
    broker.start([])
    return broker


def provision(url: str, count: int, broker: MosquittoBroker | None) -> list[DeviceLogin]:
    """``count`` devices of one brand in one transaction, then Mosquitto's credentials (a
    NATS cluster, ``broker`` None, asks the database at each CONNECT)."""
    with psycopg.connect(url) as conn:
        conn.execute("INSERT INTO brands (id, name) VALUES (%s, %s)", [BRAND, "Benchmark"])
        devices = [
            provision_device(conn, device_id=f"bench-{i:05d}", brand_id=BRAND, model=DEVICE_MODEL)
            for i in range(count)
        ]
        conn.commit()
        if broker is not None:
            sync_device_credentials(conn, BrokerFiles(broker.config.directory))
    return [DeviceLogin(d.device_id, d.password) for d in devices]


@dataclass
class ServiceWorker:
    """One ingest or rules worker process and its metrics endpoint."""

    name: str
    child: Child
    metrics_port: int

    def metrics(self) -> dict[str, float]:
        """The worker's Prometheus samples by series name (labels included)."""
        url = f"http://{LOOPBACK}:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        values: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                series, _, value = line.rpartition(" ")
                values[series] = float(value)
        return values

    def metric(self, series: str) -> float:
        """One series of the worker's metrics, 0 when it has not been touched yet."""
        return self.metrics().get(series, 0.0)

    def log_text(self) -> str:
        """Everything the worker logged."""
        return self.child.log_path.read_text(errors="replace")

    def logged(self, text: str) -> bool:
        """Whether the worker has logged ``text`` yet."""
        return text in self.log_text()


@dataclass
class BenchStack:
    """The servers of one benchmark run and its provisioned devices."""

    root: Path
    cleanup: contextlib.ExitStack  # stops everything started here, in reverse order
    postgres: PostgresServer
    url: str
    broker: MosquittoBroker
    passwords: dict[ServiceAccount, str]
    logins: list[DeviceLogin]

    def start_workers(
        self, service: str, metrics_ports: Sequence[int], *, ready: str, **settings: str | int
    ) -> list[ServiceWorker]:
        """Start one ``service`` worker per metrics port, as ``make run`` does, and wait until
        each has logged ``ready`` (at INFO, which logs nothing per message). ``settings``
        override the defaults (``mqtt_port``, say, for another listener)."""
        workers: list[ServiceWorker] = []
        for number, metrics_port in enumerate(metrics_ports, start=1):
            defaults: dict[str, str | int] = {
                "database_url": self.url,
                "mqtt_port": self.broker.config.service_port,
                "mqtt_password": self.passwords[ServiceAccount(f"galvani-{service}")],
                "mqtt_ca_file": str(self.broker.config.pki.ca_file),
                "worker_id": number,
                "metrics_port": metrics_port,
                "log_level": "INFO",
            }
            env = service_env(service.upper(), **(defaults | settings))
            child = spawn(
                f"{service}-{number}",
                [sys.executable, "-m", f"services.{service}.main"],
                self.root / f"{service}-{number}.log",
                env=env,
                cwd=REPO_ROOT,
            )
            self.cleanup.callback(child.stop)
            workers.append(ServiceWorker(child.name, child, metrics_port))
        for worker in workers:
            wait_until(
                functools.partial(worker.logged, ready),
                child=worker.child,
                timeout_s=WORKER_READY_TIMEOUT_S,
                what=worker.name,
            )
        return workers


def start_stack(
    root: Path,
    cleanup: contextlib.ExitStack,
    bench: str,
    devices: int,
    *,
    database: str = "",
    plain_device: bool = False,
    plain_service: bool = False,
) -> BenchStack:
    """A migrated durable cluster (``database`` in it, else the default one), a broker (with
    the plaintext listeners asked for) and ``devices`` provisioned devices of one brand."""
    postgres = start_postgres(root, cleanup, bench)
    url = postgres.create_database(database) if database else postgres.config.url()
    upgrade(url)
    passwords = {account: new_password() for account in ServiceAccount}
    broker = start_broker(
        root, passwords, cleanup, plain_device=plain_device, plain_service=plain_service
    )
    logins = provision(url, devices, broker)
    return BenchStack(root, cleanup, postgres, url, broker, passwords, logins)


# --- The run ----------------------------------------------------------------------------


@contextlib.contextmanager
def workspace(prefix: str, keep: bool, kept: str) -> Iterator[Path]:
    """A directory the servers (running as an unprivileged user when root) can enter;
    removed at the end unless ``keep``, else ``kept`` (with ``{}`` for its path) is said."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(root, 0o755)  # noqa: S103 - servers run as another user under root
    try:
        yield root
    finally:
        if keep:
            say(kept.format(root))
        else:
            shutil.rmtree(root, ignore_errors=True)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run_main(bench: str, run: Callable[[], int]) -> int:
    """Run a benchmark; SIGTERM and Ctrl-C stop it (everything it started stops with it)."""
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return run()
    except KeyboardInterrupt:
        say(f"{bench}: interrupted; everything it started has been stopped")
        return 130
