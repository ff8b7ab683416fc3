"""``make bench-cluster``: ingest through a three-node NATS cluster, beside one Mosquitto, and
the cluster's faults on a simulated fleet.

Three parts, one after another on this machine, each with servers of its own (started and
stopped by pid):

1. **single broker**: ``make bench-ingest --tls-only`` with the same load options (one
   Mosquitto, TLS), run as a subprocess; its ``ingest_samples_per_s`` is the figure the
   cluster's stands beside;
2. **cluster throughput**: a durable PostgreSQL with TimescaleDB, a 3-node NATS cluster
   (deploy/stack/nats_cluster.py: JetStream, MQTT gateway, TLS, auth callout) with two
   responders (services/broker_access), ``--workers`` ingest workers on JetStream, each
   first connected to another node; bench-ingest's load generator (bench/mqtt_load.py, MQTT
   3.1.1 QoS 1, 10 samples a message, every device subscribed to its stored-acks) with its
   ``--loadgen-procs`` processes on the nodes in turn. Measured as bench-ingest measures:
   stored samples / (first publish to last commit), CPU per sample of ingest, PostgreSQL and
   every node, and the ledger (every PUBACKed message stored once). Also the nodes' memory
   per connection and CPU per TLS connect (docs/capacity.md's broker figures);
3. **cluster faults** (tests/cluster_faults.py, the fault suite's stack on a larger fleet):
   the busiest node killed -9 and started again, an ingest worker killed -9, the busiest node
   paused (SIGSTOP) for ``--pause`` seconds; after each the ledger of every message a device
   deleted from its outbox (0 lost, 0 duplicated) and, for the node faults, how long its
   devices took to be on a survivor.

The last line::

    nodes=3 node_kills=1 lost=0 duplicates=0 cluster_samples_per_s=… reconnect_p99_s=… \
        single_broker_samples_per_s=…

(one line; broken here).

``lost`` and ``duplicates`` add up the throughput ledger and every fault's; ``reconnect_p99_s``
is the node kill's. The exit status is non-zero when anything was lost or stored twice.
"""

import argparse
import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from bench import ingest
from bench.harness import (
    REPO_ROOT,
    ServiceWorker,
    process_cpu_s,
    provision,
    run_main,
    say,
    start_postgres,
    workspace,
)
from bench.mqtt_load import DeviceLogin
from deploy.stack.nats_cluster import NatsCluster
from deploy.stack.pki import DevelopmentPKI
from deploy.stack.ports import distinct_free_ports
from deploy.stack.postgres import new_password
from deploy.stack.processes import service_env, spawn, wait_until
from services.common.broker_auth import ServiceAccount
from services.common.migrate import upgrade
from tests.cluster_faults import ClusterFaultStack, Reconnects
from tests.faults import FaultResult
from tests.nats import ResponderProcess, callout_setup, cluster_tls
from tests.roles import create_logins

NODES: Final = 3
WORKER_READY_TIMEOUT_S: Final = 30.0
SINGLE_RESULT: Final = re.compile(r"^tls: ingest_samples_per_s=(\d+)")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line (through ``BENCH_ARGS``)."""
    parser = argparse.ArgumentParser(prog="bench.cluster", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="publishing time (60)")
    parser.add_argument("--devices", type=int, default=1000, help="load connections (1000)")
    parser.add_argument("--workers", type=int, default=3, help="ingest workers (3)")
    parser.add_argument(
        "--loadgen-procs", type=int, default=3, help="load processes, on the nodes in turn (3)"
    )
    parser.add_argument("--window", type=int, default=20, help="publishes in flight a device")
    parser.add_argument("--backlog", type=int, default=20_000, help="published, not stored")
    parser.add_argument("--max-rate", type=int, default=200_000, help="samples/s offered")
    parser.add_argument("--fleet-devices", type=int, default=200, help="fault fleet (200)")
    parser.add_argument("--activity", type=float, default=2000.0, help="session rate x (2000)")
    parser.add_argument("--settle", type=float, default=10.0, help="running around each fault")
    parser.add_argument("--node-down", type=float, default=10.0, help="killed node down (s)")
    parser.add_argument("--pause", type=float, default=30.0, help="SIGSTOP of a node (s)")
    parser.add_argument(
        "--skip-single", action="store_true", help="leave out the single-broker run"
    )
    parser.add_argument(
        "--skip-faults", action="store_true", help="leave out the faults (no line at the end)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the data and logs directory")
    return parser.parse_args(argv)


def load_argv(args: argparse.Namespace) -> list[str]:
    """bench-ingest's command line for the same load (its TLS phase only)."""
    return [
        f"--seconds={args.seconds}",
        f"--devices={args.devices}",
        f"--workers={args.workers}",
        f"--loadgen-procs={args.loadgen_procs}",
        f"--window={args.window}",
        f"--backlog={args.backlog}",
        f"--max-rate={args.max_rate}",
        "--tls-only",
    ]


def single_broker(args: argparse.Namespace) -> float | None:
    """Run bench-ingest's TLS phase (one Mosquitto) with the same load; its samples/s."""
    command = [sys.executable, "-m", "bench.ingest", *load_argv(args)]
    say(f"--- single broker: {' '.join(command[1:])}")
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    rate = None
    for line in done.stdout.splitlines():
        say(f"[single] {line}")
        found = SINGLE_RESULT.match(line)
        if found:
            rate = float(found.group(1))
    if done.returncode != 0:
        say(f"[single] bench-ingest exited {done.returncode}: {done.stderr.strip()[-500:]}")
    return rate


def rss_kb(pid: int) -> int:
    """A process's resident memory in KiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def start_nats_workers(
    root: Path,
    cleanup: contextlib.ExitStack,
    cluster: NatsCluster,
    url: str,
    password: str,
    ca_file: Path,
    count: int,
) -> list[ServiceWorker]:
    """``count`` ingest workers on JetStream as ``make run-cluster`` starts them: worker n
    first connects to node n mod 3."""
    urls = cluster.nats_urls().split(",")
    workers = []
    for number, metrics_port in enumerate(distinct_free_ports(count), start=1):
        env = service_env(
            "INGEST",
            database_url=url,
            mqtt_password=password,
            mqtt_ca_file=str(ca_file),
            worker_id=number,
            metrics_port=metrics_port,
            log_level="INFO",
        )
        first = (number - 1) % len(urls)
        env["GALVANI_BROKER"] = "nats"
        env["GALVANI_NATS_URLS"] = ",".join(urls[first:] + urls[:first])
        child = spawn(
            f"ingest-{number}",
            [sys.executable, "-m", "services.ingest.main"],
            root / f"ingest-{number}.log",
            env=env,
            cwd=REPO_ROOT,
        )
        cleanup.callback(child.stop)
        workers.append(ServiceWorker(child.name, child, metrics_port))
    for worker in workers:
        wait_until(
            lambda worker=worker: worker.logged("subscribed to"),  # type: ignore[misc]
            child=worker.child,
            timeout_s=WORKER_READY_TIMEOUT_S,
            what=worker.name,
        )
    return workers


def cluster_throughput(args: argparse.Namespace, root: Path) -> ingest.Figures:
    """Part 2: the load through the cluster into the database; bench-ingest's figures."""
    load = ingest.parse_args(load_argv(args))
    with contextlib.ExitStack() as cleanup:
        postgres = start_postgres(root, cleanup, "bench-cluster")
        url = postgres.config.url()
        upgrade(url)
        create_logins(url)
        logins: list[DeviceLogin] = provision(url, args.devices, None)
        passwords = {account: new_password() for account in ServiceAccount}
        pki = DevelopmentPKI.ensure(root / "pki")
        setup, callout = callout_setup(root / "callout", pki, passwords)
        cluster = NatsCluster(root / "nats", tls=cluster_tls(pki), callout=callout)
        cleanup.callback(cluster.stop)
        cluster.start()
        for responder in ("1", "2"):
            process = ResponderProcess(
                cluster, setup, url, root / f"broker-access-{responder}.log", responder
            )
            cleanup.callback(process.stop)
        say(
            f"nats: {NODES} nodes, MQTT (TLS) on ports "
            f"{', '.join(str(n.mqtt_port) for n in cluster.nodes)}; "
            f"{args.devices} devices provisioned"
        )
        workers = start_nats_workers(
            root,
            cleanup,
            cluster,
            url,
            passwords[ServiceAccount.INGEST],
            pki.ca_file,
            args.workers,
        )
        say(f"{len(workers)} ingest workers subscribed (JetStream consumer ingest)")
        pids = [cluster.pid(i) for i in range(NODES)]
        run = ingest.Run(
            load,
            logins,
            lambda: sum(process_cpu_s(pid) for pid in pids),
            [node.mqtt_port for node in cluster.nodes],
            postgres,
            workers,
            str(pki.ca_file),
        )
        cleanup.callback(run.stop_load)
        rss_before = sum(rss_kb(pid) for pid in pids)
        cpu_before = sum(process_cpu_s(pid) for pid in pids)
        connecting = time.monotonic()
        run.start_load()
        connect_s = time.monotonic() - connecting
        connect_cpu = sum(process_cpu_s(pid) for pid in pids) - cpu_before
        rss_after = sum(rss_kb(pid) for pid in pids)
        say(
            f"nats connections: {args.devices} MQTT 3.1.1 TLS connects in {connect_s:.1f} s,"
            f" nodes' cpu {connect_cpu / args.devices * 1e3:.2f} ms a connect (with its"
            f" subscription), rss {(rss_after - rss_before) / args.devices:.1f} KiB a"
            " connection"
        )
        say(f"publishing for {args.seconds:.0f} s")
        measurement = run.measure()
        run.stop_load()
        check = ingest.verify(url, measurement.acked_by_device, [d.device_id for d in logins])
        phase = ingest.Phase("tls", measurement, check, ingest.log_problems(workers), "nats")
        assert postgres.child is not None
        ceiling = ingest.copy_ceiling(url, postgres.child.pid)
        figures = ingest.report(load, phase, ceiling)
        say(f"cluster: {figures.result}")
        return figures


def cluster_faults(
    args: argparse.Namespace, root: Path
) -> tuple[list[FaultResult], list[Reconnects]]:
    """Part 3: the node and worker faults on a simulated fleet."""
    stack = ClusterFaultStack(root=root, devices=args.fleet_devices, activity=args.activity)
    try:
        say(f"--- cluster faults: {args.fleet_devices} devices on MQTT 3.1.1 over {NODES} nodes")
        stack.start()
        node = stack.busiest_node()
        stack.run_fault("node_kill9", lambda: stack.kill_node(node, args.node_down), args.settle)
        stack.run_fault("ingest_kill9", lambda: stack.kill_ingest(args.node_down), args.settle)
        node = stack.busiest_node()
        stack.run_fault("node_pause", lambda: stack.pause_node(node, args.pause), args.settle)
        return stack.results, stack.reconnects
    finally:
        stack.stop()


def run(args: argparse.Namespace) -> int:
    """The three parts, then the line."""
    single = None if args.skip_single else single_broker(args)
    with workspace("galvani-bench-cluster-", args.keep, "data and logs kept in {}") as root:
        say("--- cluster throughput")
        figures = cluster_throughput(args, root / "throughput")
        if args.skip_faults:
            return 1 if figures.failed else 0
        faults, reconnects = cluster_faults(args, root / "faults")
    lost = sum(r.ledger.lost for r in faults)
    duplicates = sum(r.ledger.duplicates for r in faults)
    throughput_failed = figures.failed
    kill = reconnects[0]
    say(
        f"nodes={NODES} node_kills=1 lost={lost}"
        f"{'+throughput' if throughput_failed else ''} duplicates={duplicates} "
        f"cluster_samples_per_s={figures.rate:.0f} reconnect_p99_s={kill.percentile(99):.1f} "
        f"single_broker_samples_per_s={'n/a' if single is None else f'{single:.0f}'}"
    )
    return 1 if lost or duplicates or throughput_failed or kill.missing else 0


def main(argv: Sequence[str] | None = None) -> int:
    """``make bench-cluster``; returns the exit status."""
    args = parse_args(argv)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return run_main("bench-cluster", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
