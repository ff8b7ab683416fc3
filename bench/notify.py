"""``make bench-notify``: fault event published → webhook received, and deliveries per second.

One run, everything on this machine and all of it started (and stopped, by pid) here:

1. the stack of ``make bench-rules`` (a durable PostgreSQL with TimescaleDB, Mosquitto, one
   rules and one ingest worker, 10,000 heartbeat and 200 session devices publishing in the
   background) plus the notification dispatcher (``python -m services.notify.main``, its own
   role, default settings but for loopback and plain http targets being allowed) and a
   webhook receiver in a process of its own (asyncio, HTTP/1.1 keep-alive, checking every
   request's signature);
2. **latency**: after ``--warmup`` seconds of background, ``--probes`` fresh devices each
   publish one ``fault`` event (``short_circuit``: ``device_fault``, critical, an alert at
   once), ``--interval`` seconds apart; measured from just before the PUBLISH is written to
   the socket to the receiver reading the ``alert.opened`` request of that device's alert
   (both clocks are this machine's CLOCK_MONOTONIC);
3. **throughput**: the background stops (``--throughput-under-load`` keeps it), ``--channels``
   webhook channels (each ``--max-concurrency``) to the receiver are made, ``--alerts`` alerts
   are opened in one transaction and resolved in the next, so ``alerts * 2 * channels``
   notifications are queued at once; deliveries per second over the steady window (the 10th
   to the 90th percentile of arrivals), the dispatcher's CPU per delivery, nothing lost, the
   duplicates (same idempotency key twice), and each alert's ``opened`` received before its
   ``resolved`` on every channel;
4. ``--outage-s N``: in the throughput phase, once half is delivered, the receiver goes down
   (listener and open connections closed) for N seconds, then up; the time from up to the
   last delivery is printed (the dispatcher's own backoff decides it).

The result lines::

    notify latency: n=… p50_ms=… p99_ms=… (goal p99 <= 250 ms)
    notify throughput: deliveries_per_s=… cpu_ms_per_delivery=… lost=0 duplicates=…
    notify outage: outage_s=… delivered_after_s=… lost=0 order_kept=yes
"""

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import json
import multiprocessing
import resource
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Final

import psycopg

from bench.harness import (
    postgres_cpu_s,
    process_cpu_s,
    run_main,
    say,
    start_stack,
    workspace,
)
from bench.rules import Background, connect_all, event, now_ms, percentile, start_background
from deploy.stack.ports import LOOPBACK, distinct_free_ports
from deploy.stack.postgres import new_password
from deploy.stack.processes import Child, service_env, spawn, wait_until
from services.common.db_roles import ensure_login, service_url
from services.common.migrations.grants import ServiceRole
from services.common.protocol.topics import device_topic
from services.common.secret_box import SecretBox, new_webhook_secret

REPO_ROOT: Final = Path(__file__).resolve().parents[1]
BRAND: Final = "bench"
FAULT_CODE: Final = "short_circuit"
PROBE_RULE: Final = "device_fault"
LOAD_RULE_PREFIX: Final = "bench_load_"
DISPATCHER_READY_TIMEOUT_S: Final = 30.0
LATENCY_WAIT_S: Final = 15.0
SAMPLE_EVERY_S: Final = 0.25
# A receiver's timestamp is only trusted as fresh within this (the dispatcher signs at send).
SIGNATURE_TOLERANCE_S: Final = 300
RECEIVER_READY_TIMEOUT_S: Final = 10.0

# (arrival monotonic time, idempotency key, alert id or None, device id or None, request path)
Arrival = tuple[float, str, int | None, str | None, str]


# --- the receiver (a process of its own) ---------------------------------------------------


class _Receiver:
    """An HTTP/1.1 webhook receiver: keep-alive, the Galvani signature checked, 200 or 401."""

    def __init__(self, secret: bytes, port: int) -> None:
        self.secret = secret
        self.port = port
        self.arrivals: list[Arrival] = []
        self.bad_signatures = 0
        self.connections: set[asyncio.Transport] = set()
        self.server: asyncio.AbstractServer | None = None

    async def up(self) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: _Connection(self), LOOPBACK, self.port, reuse_address=True, backlog=1024
        )

    def down(self) -> None:
        """Stop listening and close every open connection (kept-alive ones too)."""
        if self.server is not None:
            self.server.close()
            self.server = None
        for transport in list(self.connections):
            transport.abort()
        self.connections.clear()

    def request(self, path: str, headers: dict[str, str], body: bytes) -> bytes:
        timestamp = headers.get("galvani-timestamp", "")
        expected = (
            "v1="
            + hmac.new(self.secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
        )
        fresh = timestamp.isdigit() and abs(time.time() - int(timestamp)) < SIGNATURE_TOLERANCE_S
        if not (fresh and hmac.compare_digest(headers.get("galvani-signature", ""), expected)):
            self.bad_signatures += 1
            return b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 3\r\n\r\nbad"
        payload = json.loads(body)
        alert = payload.get("alert") or {}
        self.arrivals.append(
            (
                time.monotonic(),
                headers.get("galvani-idempotency-key", ""),
                alert.get("id"),
                alert.get("device_id") if payload.get("event") == "alert.opened" else None,
                path,
            )
        )
        return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class _Connection(asyncio.Protocol):
    """One client connection; requests parsed by Content-Length, answered in order."""

    def __init__(self, receiver: _Receiver) -> None:
        self.receiver = receiver
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.receiver.connections.add(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.receiver.connections.discard(self.transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = self.buffer[:end].decode("latin-1").split("\r\n")
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0"))
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4 : end + 4 + length]
            self.buffer = self.buffer[end + 4 + length :]
            path = lines[0].split(" ")[1] if " " in lines[0] else ""
            assert self.transport is not None
            self.transport.write(self.receiver.request(path, headers, body))
            if headers.get("connection", "").lower() == "close":
                self.transport.close()
                return


def receiver_process(secret: str, port: int, control: Connection) -> None:
    """Serve until told to stop; commands on ``control``: drain, down, up, stop."""
    asyncio.run(_serve(secret.encode(), port, control))


async def _serve(secret: bytes, port: int, control: Connection) -> None:
    receiver = _Receiver(secret, port)
    await receiver.up()
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    tasks: set[asyncio.Task[None]] = set()

    def command() -> None:
        what = control.recv()
        if what == "drain":
            control.send((receiver.arrivals, receiver.bad_signatures))
            receiver.arrivals = []
        elif what == "down":
            receiver.down()
            control.send("down")
        elif what == "up":
            tasks.add(loop.create_task(_up(receiver, control)))
        elif what == "stop" and not done.done():
            done.set_result(None)

    loop.add_reader(control.fileno(), command)
    control.send("ready")
    await done
    receiver.down()


async def _up(receiver: _Receiver, control: Connection) -> None:
    await receiver.up()
    control.send("up")


@dataclass
class ReceiverHandle:
    """The bench's side of the receiver process."""

    process: Any
    control: Connection
    port: int
    arrivals: list[Arrival]
    bad_signatures: int = 0

    def drain(self) -> list[Arrival]:
        """The requests received since the last drain (also kept in ``arrivals``)."""
        self.control.send("drain")
        new, self.bad_signatures = self.control.recv()
        self.arrivals.extend(new)
        return list(new)

    def down(self) -> None:
        self.control.send("down")
        assert self.control.recv() == "down"

    def up(self) -> None:
        self.control.send("up")
        assert self.control.recv() == "up"

    def url(self, path: str) -> str:
        return f"http://{LOOPBACK}:{self.port}{path}"


def start_receiver(secret: str, port: int, stack: contextlib.ExitStack) -> ReceiverHandle:
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    process = ctx.Process(target=receiver_process, args=(secret, port, theirs), daemon=True)
    process.start()

    def stop() -> None:
        with contextlib.suppress(OSError):
            ours.send("stop")
        process.join(10)
        if process.is_alive():
            process.kill()

    stack.callback(stop)
    if not ours.poll(RECEIVER_READY_TIMEOUT_S) or ours.recv() != "ready":
        raise SystemExit("bench-notify: the receiver did not start")
    return ReceiverHandle(process, ours, port, [])


# --- the dispatcher ------------------------------------------------------------------------


def start_dispatcher(
    root: Path, notify_url: str, key_file: Path, metrics_port: int, stack: contextlib.ExitStack
) -> Child:
    env = service_env(
        "NOTIFY",
        database_url=notify_url,
        secret_key_file=str(key_file),
        allow_private_targets=1,
        allow_http_targets=1,
        metrics_port=metrics_port,
        log_level="INFO",
    )
    child = spawn(
        "notify",
        [sys.executable, "-m", "services.notify.main"],
        root / "notify.log",
        env=env,
        cwd=REPO_ROOT,
    )
    stack.callback(child.stop)
    wait_until(
        lambda: "dispatcher started" in child.log_path.read_text(errors="replace"),
        child=child,
        timeout_s=DISPATCHER_READY_TIMEOUT_S,
        what="the notify dispatcher",
    )
    return child


def add_channel(
    url: str,
    box: SecretBox,
    secret: str,
    target: str,
    max_concurrency: int,
    rules: list[str] | None,
) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "INSERT INTO notification_channels (brand_id, name, kind, url, secret_ciphertext,"
            " rules, max_concurrency) VALUES (%s, 'bench', 'webhook', %s, %s, %s, %s)"
            " RETURNING id",
            [BRAND, target, box.encrypt(secret), rules, max_concurrency],
        ).fetchone()
    assert row is not None
    return int(str(row[0]))


# --- phase 1: latency ----------------------------------------------------------------------


async def publish_faults(
    host: str, port: int, probes: Sequence[Any], interval_s: float, ca_file: Path
) -> dict[str, float]:
    """Each probe device publishes one fault event; when (monotonic) each was written."""
    clients = await connect_all(host, port, probes, None, ca_file)
    published: dict[str, float] = {}
    for login, client in zip(probes, clients, strict=True):
        payload = event(1, now_ms(), "fault", code=FAULT_CODE, detail={})
        published[login.device_id] = time.monotonic()
        client.publish(device_topic(login.device_id, "events"), payload)
        await asyncio.sleep(interval_s)
    await asyncio.sleep(0.5)  # the last PUBACKs
    return published


def measure_latency(
    args: argparse.Namespace,
    receiver: ReceiverHandle,
    probes: Sequence[Any],
    host: str,
    port: int,
    ca_file: Path,
) -> list[float]:
    published = asyncio.run(publish_faults(host, port, probes, args.interval, ca_file))
    received: dict[str, float] = {}
    deadline = time.monotonic() + LATENCY_WAIT_S
    while len(received) < len(published) and time.monotonic() < deadline:
        for at, _key, _alert, device, _path in receiver.drain():
            if device in published:
                received.setdefault(device, at)
        time.sleep(SAMPLE_EVERY_S)
    return [(received[d] - published[d]) * 1000 for d in published if d in received]


# --- phase 2: throughput -------------------------------------------------------------------


@dataclass
class Sample:
    at: float
    received: int
    dispatcher_cpu_s: float
    postgres_cpu_s: float
    receiver_cpu_s: float


def queue_load(url: str, device: str, alerts: int) -> None:
    """``alerts`` alerts opened in one transaction and resolved in the next (the outbox
    trigger queues an ``opened`` and a ``resolved`` per alert and channel)."""
    explanation = json.dumps({"text": "bench load", "action": "alert"})
    with psycopg.connect(url) as conn:
        conn.execute(
            "INSERT INTO alerts (brand_id, device_id, rule, rule_version, severity, first_seen,"
            " last_seen, explanation) SELECT %s, %s, %s || n, 1, 'critical', now(), now(),"
            " %s::jsonb FROM generate_series(1, %s) n",
            [BRAND, device, LOAD_RULE_PREFIX, explanation, alerts],
        )
        conn.commit()
        conn.execute(
            "UPDATE alerts SET state = 'resolved', resolved_at = now(), resolved_by = 'rules',"
            " resolution = 'cleared' WHERE device_id = %s AND rule LIKE %s AND state = 'open'",
            [device, LOAD_RULE_PREFIX + "%"],
        )


def expected_keys(url: str, channels: list[int]) -> tuple[set[str], int]:
    """The queued keys of ``channels`` and how many of them are not delivered yet."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT idempotency_key, status FROM notifications WHERE channel_id = ANY(%s)",
            [channels],
        ).fetchall()
    return {str(r[0]) for r in rows}, sum(1 for r in rows if r[1] != "delivered")


def order_kept(arrivals: list[Arrival]) -> bool:
    """On each channel, every alert's ``opened`` arrived (first) before its ``resolved`` (keys
    are ``ntf_<channel>_<alert>_<transition>_<change>``)."""
    first: dict[str, float] = {}
    for at, key, *_ in arrivals:
        first.setdefault(key, at)
    opened: dict[tuple[str, str], float] = {}
    resolved: dict[tuple[str, str], float] = {}
    for key, at in first.items():
        parts = key.split("_")
        if len(parts) != 5:
            continue
        pair = (parts[1], parts[2])
        if parts[3] == "opened":
            opened[pair] = at
        elif parts[3] == "resolved":
            resolved[pair] = at
    return all(pair in opened and opened[pair] <= at for pair, at in resolved.items())


def measure_throughput(
    args: argparse.Namespace,
    url: str,
    box: SecretBox,
    secret: str,
    receiver: ReceiverHandle,
    device: str,
    dispatcher: Child,
    postmaster: int,
) -> int:
    receiver.drain()
    start = len(receiver.arrivals)
    channels = [
        add_channel(url, box, secret, receiver.url(f"/hooks/{n}"), args.max_concurrency, None)
        for n in range(args.channels)
    ]
    total = args.alerts * 2 * args.channels
    say(
        f"throughput: {args.alerts} alerts opened and resolved on {args.channels} channels "
        f"(max_concurrency {args.max_concurrency}): {total} deliveries queued"
    )
    receiver_pid = receiver.process.pid

    def sample(count: int) -> Sample:
        return Sample(
            time.monotonic(),
            count,
            process_cpu_s(dispatcher.pid),
            postgres_cpu_s(postmaster),
            process_cpu_s(receiver_pid),
        )

    samples = [sample(0)]
    queued_at = time.monotonic()
    queue_load(url, device, args.alerts)
    say(f"queued in {time.monotonic() - queued_at:.1f} s")
    outage_at = total // 2 if args.outage_s else None
    up_at: float | None = None
    deadline = time.monotonic() + total / 100 + args.outage_s + 300
    keys: set[str] = set()
    pending = total
    while time.monotonic() < deadline:
        time.sleep(SAMPLE_EVERY_S)
        receiver.drain()
        got = receiver.arrivals[start:]
        samples.append(sample(len(got)))
        if outage_at is not None and up_at is None and len(got) >= outage_at:
            receiver.down()
            say(f"receiver down for {args.outage_s:g} s after {len(got)} deliveries")
            time.sleep(args.outage_s)
            receiver.up()
            up_at = time.monotonic()
            say("receiver up again")
        if len(got) >= total:
            keys, pending = expected_keys(url, channels)
            if not pending:
                break
    receiver.drain()
    got = receiver.arrivals[start:]
    keys, pending = expected_keys(url, channels)
    counts = Counter(a[1] for a in got)
    lost = len(keys - set(counts))
    duplicates = sum(n - 1 for n in counts.values())
    kept = order_kept(got)
    firsts = sorted({a[1]: a[0] for a in reversed(got)}.values())
    if len(firsts) < 10:
        say("bench-notify: too few deliveries to measure")
        return 1
    # The steady window: the 10th to the 90th percentile of first arrivals (before the
    # outage, 5th to 45th, when there is one).
    low, high = (0.05, 0.45) if args.outage_s else (0.10, 0.90)
    t_low, t_high = firsts[int(low * (len(firsts) - 1))], firsts[int(high * (len(firsts) - 1))]
    in_window = sum(1 for t in firsts if t_low <= t <= t_high)
    rate = in_window / max(t_high - t_low, 1e-9)
    before = min(samples, key=lambda s: abs(s.at - t_low))
    after = min(samples, key=lambda s: abs(s.at - t_high))
    delivered = max(1, after.received - before.received)
    cpu_ms = 1000 * (after.dispatcher_cpu_s - before.dispatcher_cpu_s) / delivered
    pg_ms = 1000 * (after.postgres_cpu_s - before.postgres_cpu_s) / delivered
    rx_ms = 1000 * (after.receiver_cpu_s - before.receiver_cpu_s) / delivered
    say(
        f"throughput window: {in_window} deliveries in {t_high - t_low:.1f} s; cpu ms per "
        f"delivery: dispatcher={cpu_ms:.2f} postgres={pg_ms:.2f} receiver={rx_ms:.2f}; "
        f"first to last {firsts[-1] - firsts[0]:.1f} s; bad_signatures={receiver.bad_signatures}"
        f" undelivered={pending}"
    )
    say(
        f"notify throughput: deliveries_per_s={rate:.0f} cpu_ms_per_delivery={cpu_ms:.2f} "
        f"lost={lost} duplicates={duplicates} order_kept={'yes' if kept else 'no'} "
        f"(goal >= 1000/s)"
    )
    ok = not lost and not pending and kept and not receiver.bad_signatures
    if args.outage_s:
        assert up_at is not None
        after_s = max(0.0, firsts[-1] - up_at)
        say(
            f"notify outage: outage_s={args.outage_s:g} delivered_after_s={after_s:.1f} "
            f"lost={lost} order_kept={'yes' if kept else 'no'}"
        )
    return 0 if ok else 1


# --- the run -------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench-notify", description=__doc__.split("\n")[0])
    parser.add_argument("--heartbeat-devices", type=int, default=10_000)
    parser.add_argument("--session-devices", type=int, default=200)
    parser.add_argument("--probes", type=int, default=100, help="fault events for the latency")
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between probes")
    parser.add_argument("--warmup", type=float, default=20.0, help="seconds of background first")
    parser.add_argument("--alerts", type=int, default=1500, help="alerts of the throughput phase")
    parser.add_argument("--channels", type=int, default=8)
    parser.add_argument("--max-concurrency", type=int, default=4, help="each channel's")
    parser.add_argument("--outage-s", type=float, default=0.0, help="receiver down this long")
    parser.add_argument(
        "--throughput-under-load", action="store_true", help="keep the background load on"
    )
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the data directory")
    args = parser.parse_args(argv)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return run_main("bench-notify", lambda: _main(args))


def _main(args: argparse.Namespace) -> int:
    with (
        workspace("galvani-bench-notify-", args.keep, "data kept in {}") as root,
        contextlib.ExitStack() as stack,
    ):
        return _run(args, root, stack)


def _run(args: argparse.Namespace, root: Path, stack: contextlib.ExitStack) -> int:
    total = args.heartbeat_devices + args.session_devices + args.probes + 1
    bench = start_stack(root, stack, "bench-notify", total, database="galvani_bench")
    url, broker, logins = bench.url, bench.broker, bench.logins
    heartbeat = logins[: args.heartbeat_devices]
    session = logins[args.heartbeat_devices : args.heartbeat_devices + args.session_devices]
    probes = logins[args.heartbeat_devices + args.session_devices : -1]
    load_device = logins[-1].device_id
    password = new_password()
    with psycopg.connect(url, autocommit=True) as conn:
        ensure_login(conn, ServiceRole.NOTIFY, password)
    notify_url = service_url(url, ServiceRole.NOTIFY, password)
    key_file = root / "secrets" / "notify-secret-key"
    box = SecretBox.from_file(key_file)
    secret = new_webhook_secret()
    receiver_port, rules_port, ingest_port, notify_port = distinct_free_ports(4)
    receiver = start_receiver(secret, receiver_port, stack)
    rules = bench.start_workers(
        "rules",
        [rules_port],
        ready="subscribed to",
        data_dir=str(root),
        signing_key_dir=str(root / "secrets"),
    )
    ingest = bench.start_workers("ingest", [ingest_port], ready="subscribed to", data_dir=str(root))
    dispatcher = start_dispatcher(root, notify_url, key_file, notify_port, stack)
    assert bench.postgres.child is not None
    postmaster = bench.postgres.child.pid
    say(
        f"devices: {len(heartbeat)} heartbeat (1 msg/min), {len(session)} in session "
        f"(1 msg of 10 samples/s), {len(probes)} probes; {len(rules)} rules, {len(ingest)} "
        f"ingest worker, 1 notify dispatcher, a receiver on 127.0.0.1:{receiver_port}"
    )
    background = start_background(
        Background(
            LOOPBACK,
            broker.config.device_port,
            tuple(heartbeat),
            tuple(session),
            broker.config.pki.ca_file,
        ),
        stack,
        "bench-notify",
    )
    sent = background.sent
    status = 0
    if not args.skip_latency:
        say(f"background connected; warming up {args.warmup:g} s")
        time.sleep(args.warmup)
        add_channel(url, box, secret, receiver.url("/hooks/latency"), 4, [PROBE_RULE])
        sent_before, t0 = sent.value, time.monotonic()
        latencies = measure_latency(
            args, receiver, probes, LOOPBACK, broker.config.device_port, broker.config.pki.ca_file
        )
        background_rate = (sent.value - sent_before) / (time.monotonic() - t0)
        missing = len(probes) - len(latencies)
        say(f"background_msgs_per_s={background_rate:.0f} probes={len(probes)} missing={missing}")
        if latencies:
            say(
                f"notify latency: n={len(latencies)} p50_ms={percentile(latencies, 0.5):.1f} "
                f"p99_ms={percentile(latencies, 0.99):.1f} (goal p99 <= 250 ms)"
            )
        status |= 1 if missing or not latencies else 0
    if not args.throughput_under_load:
        background.stop()
        say("background stopped for the throughput phase")
    status |= measure_throughput(
        args, url, box, secret, receiver, load_device, dispatcher, postmaster
    )
    return status


if __name__ == "__main__":
    sys.exit(main())
