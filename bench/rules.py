"""``make bench-rules``: from a device's publish to the alert row, and to the SAFE table.

One run, everything on this machine and all of it started (and stopped, by pid) here:

1. a PostgreSQL cluster with production settings (durable, TimescaleDB preloaded), migrated,
   and a Mosquitto broker with Galvani's generated configuration, on free loopback ports;
2. ``--heartbeat-devices`` (10,000) + ``--session-devices`` (200) + ``--injections`` devices
   of one brand with real broker credentials;
3. the backend: ``--rules-workers`` rules workers and ``--ingest-workers`` ingest workers,
   as ``make run`` starts them;
4. a background load process with one MQTT connection per device: every heartbeat device
   sends one idle sample a minute, every session device ten samples a second (one message),
   spread evenly, at QoS 1;
5. after ``--warmup`` seconds, the injector publishes one triggering message every
   ``--interval`` seconds from a fresh device, cycling overcurrent (3 samples at 1,200 µA),
   session overrun (output 1,235 s after a LIFT start), no gel (the 101st to 110th dry
   sample) and battery overheating (61 °C). Each injected device is subscribed to its own
   ``config`` topic beforehand.

Measured per injection, from just before the PUBLISH is written to the socket:

* (a) the alert row committed: a trigger on ``alerts`` (created by this benchmark in its own
  database only) sends ``pg_notify`` on insert, which PostgreSQL delivers at commit; the
  time the benchmark's listening connection receives it;
* (b) the SAFE (or lock-all) table arriving at the device's ``config`` subscription (no gel is
  a warning and pushes nothing).

The last two lines are the result::

    alert_latency_ms p50=N p99=N
    push_latency_ms p50=N p99=N
"""

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import resource
import ssl
import statistics
import struct
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import psycopg

from bench.harness import (
    ServiceWorker,
    postgres_cpu_s,
    process_cpu_s,
    run_main,
    say,
    start_stack,
    workspace,
)
from bench.mqtt_load import (
    CONNECT_ATTEMPTS,
    CONNECT_CONCURRENCY,
    CONNECT_RETRY_S,
    DeviceLogin,
    connect_packet,
    publish_packet,
)
from deploy.stack.ports import LOOPBACK, distinct_free_ports
from services.common.mqtt5 import string, varint
from services.common.protocol.topics import CONFIG_CHANNEL, device_topic
from services.common.tls import client_context
from tests.rules import normal

TICK_S: Final = 0.005
HEARTBEAT_PERIOD_S: Final = 60.0
SESSION_PERIOD_S: Final = 1.0
RESULT_TIMEOUT_S: Final = 10.0
TRIGGERS: Final = ("overcurrent", "session_overrun", "no_gel", "battery_overtemp")
PUSHING: Final = frozenset({"overcurrent", "session_overrun", "battery_overtemp"})

NOTIFY_SQL: Final = """
CREATE FUNCTION bench_alert_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('bench_alerts', NEW.device_id);
    RETURN NULL;
END $$;
CREATE TRIGGER bench_alert_notify AFTER INSERT ON alerts
    FOR EACH ROW EXECUTE FUNCTION bench_alert_notify();
"""


# --- a minimal MQTT 3.1.1 client on asyncio ------------------------------------------------


class Client(asyncio.Protocol):
    """One device connection: QoS 1 publishes, a subscription, incoming publishes acked."""

    def __init__(self, on_message: Callable[[str, bytes, float], None] | None = None) -> None:
        self.on_message = on_message
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.connack: asyncio.Future[int] = loop.create_future()
        self.suback: asyncio.Future[int] = loop.create_future()
        self._buffer = b""
        self._next_id = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        buf = self._buffer + data
        pos = 0
        while True:
            if pos + 2 > len(buf):
                break
            kind, length, shift, i = buf[pos], 0, 0, pos + 1
            while i < len(buf):
                byte = buf[i]
                length |= (byte & 0x7F) << shift
                shift += 7
                i += 1
                if not byte & 0x80:
                    break
            else:
                break
            end = i + length
            if end > len(buf):
                break
            body = buf[i:end]
            if kind == 0x20 and not self.connack.done():
                self.connack.set_result(body[1])
            elif kind == 0x90 and not self.suback.done():
                self.suback.set_result(body[2])
            elif kind & 0xF0 == 0x30:
                self._incoming(kind, body, now)
            pos = end
        self._buffer = buf[pos:]

    def _incoming(self, kind: int, body: bytes, now: float) -> None:
        topic_len = struct.unpack("!H", body[:2])[0]
        topic = body[2 : 2 + topic_len].decode()
        rest = body[2 + topic_len :]
        if (kind >> 1) & 0x03:
            packet_id, payload = rest[:2], rest[2:]
            assert self.transport is not None
            self.transport.write(b"\x40\x02" + packet_id)
        else:
            payload = rest
        if self.on_message is not None:
            self.on_message(topic, payload, now)

    def publish(self, topic: str, payload: bytes) -> None:
        """Write one QoS 1 PUBLISH (PUBACKs are read and ignored)."""
        self._next_id = self._next_id % 65_535 + 1
        assert self.transport is not None
        self.transport.write(publish_packet(string(topic), self._next_id, payload))

    async def subscribe(self, topic: str) -> None:
        """SUBSCRIBE at QoS 1 and wait for the SUBACK."""
        self._next_id = self._next_id % 65_535 + 1
        body = struct.pack("!H", self._next_id) + string(topic) + b"\x01"
        assert self.transport is not None
        self.transport.write(b"\x82" + varint(len(body)) + body)
        code = await asyncio.wait_for(self.suback, 10)
        if code & 0x80:
            raise RuntimeError(f"subscription to {topic} refused")


async def connect(
    host: str,
    port: int,
    login: DeviceLogin,
    on_message: Callable[[str, bytes, float], None] | None,
    tls: ssl.SSLContext | None = None,
) -> Client:
    """A connected client (TLS with ``tls``), retrying while the broker is still reloading
    its password file."""
    loop = asyncio.get_running_loop()
    for _ in range(CONNECT_ATTEMPTS):
        transport, client = await loop.create_connection(
            lambda: Client(on_message),
            host,
            port,
            ssl=tls,
            server_hostname=host if tls is not None else None,
        )
        transport.write(connect_packet(login))
        code = await asyncio.wait_for(client.connack, 10)
        if code == 0:
            return client
        transport.close()
        await asyncio.sleep(CONNECT_RETRY_S)
    raise RuntimeError(f"{login.device_id} could not connect")


async def connect_all(
    host: str,
    port: int,
    logins: Sequence[DeviceLogin],
    on_message: Callable[[str, bytes, float], None] | None = None,
    ca_file: Path | None = None,
) -> list[Client]:
    """Every device connected, over TLS verifying the broker against ``ca_file`` when given
    (one context for all of them)."""
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
    tls = None if ca_file is None else client_context(ca_file)

    async def one(login: DeviceLogin) -> Client:
        async with gate:
            return await connect(host, port, login, on_message, tls)

    return list(await asyncio.gather(*(one(login) for login in logins)))


# --- payloads ------------------------------------------------------------------------------


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def telemetry(seq: int, session: str | None, samples: list[dict[str, Any]]) -> bytes:
    return json.dumps({"v": 1, "seq": seq, "session": session, "samples": samples}).encode()


def sample(ts: int, **fields: Any) -> dict[str, Any]:
    """A LIFT sample well inside every threshold (tests/rules.py ``normal``), at ``ts``."""
    return {"ts": ts, **normal(**{"i_ua": 301.0, "z_ohm": 7800.0, **fields})}


def idle_sample(ts: int) -> dict[str, Any]:
    return {"ts": ts, "out": False, "t_batt_c": 24.0, "batt_pct": 81, "charging": False}


def event(seq: int, ts: int, type_: str, **fields: Any) -> bytes:
    return json.dumps({"v": 1, "seq": seq, "ts": ts, "type": type_, **fields}).encode()


# --- background load -----------------------------------------------------------------------


@dataclass(frozen=True)
class Background:
    host: str
    port: int
    heartbeat: tuple[DeviceLogin, ...]
    session: tuple[DeviceLogin, ...]
    ca_file: Path | None = None  # TLS when set


def background_process(plan: Background, ready: Any, stop: Any, sent: Any) -> None:
    """Keep every background device publishing on schedule until ``stop`` is set."""
    asyncio.run(_background(plan, ready, stop, sent))


async def _background(plan: Background, ready: Any, stop: Any, sent: Any) -> None:
    heartbeat = await connect_all(plan.host, plan.port, plan.heartbeat, ca_file=plan.ca_file)
    session = await connect_all(plan.host, plan.port, plan.session, ca_file=plan.ca_file)
    ready.set()
    seqs = {id(c): 0 for c in heartbeat + session}
    start = time.monotonic()
    done_h = done_s = 0
    hb_every = HEARTBEAT_PERIOD_S / max(1, len(heartbeat))
    s_every = SESSION_PERIOD_S / max(1, len(session))
    while not stop.is_set():
        elapsed = time.monotonic() - start
        ts = now_ms()
        while heartbeat and done_h * hb_every <= elapsed:
            i = done_h % len(heartbeat)
            client, login = heartbeat[i], plan.heartbeat[i]
            seqs[id(client)] += 1
            client.publish(
                device_topic(login.device_id, "telemetry"),
                telemetry(seqs[id(client)], None, [idle_sample(ts)]),
            )
            done_h += 1
        while session and done_s * s_every <= elapsed:
            i = done_s % len(session)
            client, login = session[i], plan.session[i]
            seqs[id(client)] += 1
            samples = [sample(ts - 900 + 100 * k) for k in range(10)]
            client.publish(
                device_topic(login.device_id, "telemetry"),
                telemetry(seqs[id(client)], f"bg-{i}", samples),
            )
            done_s += 1
        sent.value = done_h + done_s
        await asyncio.sleep(TICK_S)


# --- the run -------------------------------------------------------------------------------


@dataclass
class Injection:
    trigger: str
    login: DeviceLogin
    client: Client | None = None
    published: float | None = None
    alerted: float | None = None
    pushed: float | None = None
    seq: int = 0


@dataclass
class Listener:
    """Receives the alert notifications on a connection of its own."""

    url: str
    by_device: dict[str, float] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute("LISTEN bench_alerts")
            while not self.stop.is_set():
                for note in conn.notifies(timeout=0.5):
                    self.by_device.setdefault(note.payload, time.monotonic())


async def precondition(injection: Injection, start_ms: int) -> None:
    """What a device did before its triggering message (a session start, dry samples)."""
    client, device = injection.client, injection.login.device_id
    assert client is not None
    # Session overrun: a LIFT session started 1,235 s ago; no gel: one started a minute ago.
    started_ago_ms = {"session_overrun": 1_235_000, "no_gel": 60_000}.get(injection.trigger)
    if started_ago_ms is None:
        return
    injection.seq += 1
    client.publish(
        device_topic(device, "events"),
        event(
            injection.seq,
            start_ms - started_ago_ms,
            "session_start",
            session="inj",
            mode="LIFT",
            level=5,
        ),
    )
    if injection.trigger == "no_gel":
        for m in range(10):  # 100 dry samples: exactly 10 s, not yet an alert
            injection.seq += 1
            first = start_ms - 50_000 + m * 1000
            samples = [sample(first + 100 * k, z_ohm=60_000.0) for k in range(10)]
            client.publish(
                device_topic(device, "telemetry"), telemetry(injection.seq, "inj", samples)
            )


def trigger_payload(injection: Injection) -> bytes:
    ts = now_ms()
    injection.seq += 1
    if injection.trigger == "overcurrent":
        samples = [sample(ts - 200 + 100 * k, i_ua=1200.0) for k in range(3)]
    elif injection.trigger == "session_overrun":
        samples = [sample(ts - 900 + 100 * k) for k in range(10)]
    elif injection.trigger == "no_gel":
        samples = [sample(ts - 900 + 100 * k, z_ohm=60_000.0) for k in range(10)]
    else:
        samples = [sample(ts, t_batt_c=61.0)]
    return telemetry(injection.seq, "inj", samples)


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


async def inject(
    host: str,
    port: int,
    injections: list[Injection],
    interval_s: float,
    listener: Listener,
    ca_file: Path | None = None,
) -> None:
    by_topic: dict[str, Injection] = {
        device_topic(i.login.device_id, CONFIG_CHANNEL): i for i in injections
    }

    def on_message(topic: str, payload: bytes, at: float) -> None:
        injection = by_topic.get(topic)
        if injection is not None and injection.pushed is None:
            injection.pushed = at

    clients = await connect_all(host, port, [i.login for i in injections], on_message, ca_file)
    start_ms = now_ms()
    for injection, client in zip(injections, clients, strict=True):
        injection.client = client
        await client.subscribe(device_topic(injection.login.device_id, CONFIG_CHANNEL))
        await precondition(injection, start_ms)
    await asyncio.sleep(3)  # let the preconditions be evaluated before the clock starts
    for injection in injections:
        payload = trigger_payload(injection)
        assert injection.client is not None
        injection.published = time.monotonic()
        injection.client.publish(device_topic(injection.login.device_id, "telemetry"), payload)
        await asyncio.sleep(interval_s)
    deadline = time.monotonic() + RESULT_TIMEOUT_S
    while time.monotonic() < deadline:
        if all(
            i.login.device_id in listener.by_device
            and (i.pushed is not None or i.trigger not in PUSHING)
            for i in injections
        ):
            break
        await asyncio.sleep(0.1)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench-rules", description=__doc__.split("\n")[0])
    parser.add_argument("--heartbeat-devices", type=int, default=10_000)
    parser.add_argument("--session-devices", type=int, default=200)
    parser.add_argument("--injections", type=int, default=200)
    parser.add_argument("--interval", type=float, default=0.25, help="seconds between injections")
    parser.add_argument("--warmup", type=float, default=20.0, help="seconds of background first")
    parser.add_argument("--rules-workers", type=int, default=1)
    parser.add_argument("--ingest-workers", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the data directory")
    args = parser.parse_args(argv)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return run_main("bench-rules", lambda: _main(args))


def _main(args: argparse.Namespace) -> int:
    with (
        workspace("galvani-bench-rules-", args.keep, "data kept in {}") as root,
        contextlib.ExitStack() as stack,
    ):
        return _run(args, root, stack)


def start_background(background: Background, stack: contextlib.ExitStack, bench: str) -> Any:
    """Run ``background`` in a process of its own (spawned: it shares no state with the
    measuring process), stopped when ``stack`` closes, and wait until every device connected.
    Returns its shared count of messages published (``.value``) and a stop function."""
    ctx = multiprocessing.get_context("spawn")
    ready, stop, sent = ctx.Event(), ctx.Event(), ctx.RawValue("q", 0)
    loader = ctx.Process(target=background_process, args=(background, ready, stop, sent))
    loader.start()

    def stop_loader() -> None:
        stop.set()
        loader.join(30)
        if loader.is_alive():
            loader.kill()

    stack.callback(stop_loader)
    if not ready.wait(300):
        raise SystemExit(f"{bench}: the background devices did not connect")
    return BackgroundLoad(sent, stop_loader)


@dataclass(frozen=True)
class BackgroundLoad:
    """A running background fleet: ``sent.value`` messages published so far."""

    sent: Any
    stop: Callable[[], None]


def _run(args: argparse.Namespace, root: Path, stack: contextlib.ExitStack) -> int:
    total = args.heartbeat_devices + args.session_devices + args.injections
    bench = start_stack(root, stack, "bench-rules", total, database="galvani_bench")
    server, url, broker, logins = bench.postgres, bench.url, bench.broker, bench.logins
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(NOTIFY_SQL)
    heartbeat = logins[: args.heartbeat_devices]
    session = logins[args.heartbeat_devices : args.heartbeat_devices + args.session_devices]
    injected = logins[args.heartbeat_devices + args.session_devices :]
    ports = distinct_free_ports(args.rules_workers + args.ingest_workers)
    rules = bench.start_workers(
        "rules",
        ports[: args.rules_workers],
        ready="subscribed to",
        data_dir=str(root),
        signing_key_dir=str(root / "secrets"),
    )
    ingest = bench.start_workers(
        "ingest", ports[args.rules_workers :], ready="subscribed to", data_dir=str(root)
    )
    say(
        f"devices: {len(heartbeat)} heartbeat (1 msg/min), {len(session)} in session "
        f"(1 msg of 10 samples/s), {len(injected)} injected; "
        f"{len(rules)} rules and {len(ingest)} ingest workers"
    )
    sent = start_background(
        Background(
            LOOPBACK,
            broker.config.device_port,
            tuple(heartbeat),
            tuple(session),
            broker.config.pki.ca_file,
        ),
        stack,
        "bench-rules",
    ).sent
    say(f"background connected; warming up {args.warmup:g} s")
    time.sleep(args.warmup)
    listener = Listener(url)
    thread = threading.Thread(target=listener.run, daemon=True)
    thread.start()
    injections = [Injection(TRIGGERS[n % len(TRIGGERS)], login) for n, login in enumerate(injected)]
    assert server.child is not None
    assert broker.child is not None
    postmaster, mosquitto = server.child.pid, broker.child.pid
    before = _cpu(rules, ingest, postmaster, mosquitto)
    sent_before, t0 = sent.value, time.monotonic()
    asyncio.run(
        inject(
            LOOPBACK,
            broker.config.device_port,
            injections,
            args.interval,
            listener,
            broker.config.pki.ca_file,
        )
    )
    elapsed = time.monotonic() - t0
    spent = _cpu(rules, ingest, postmaster, mosquitto).minus(before)
    background_rate = (sent.value - sent_before) / elapsed
    listener.stop.set()
    thread.join(5)
    for injection in injections:
        injection.alerted = listener.by_device.get(injection.login.device_id)
    alert_ms = [
        (i.alerted - i.published) * 1000
        for i in injections
        if i.alerted is not None and i.published is not None
    ]
    push_ms = [
        (i.pushed - i.published) * 1000
        for i in injections
        if i.trigger in PUSHING and i.pushed is not None and i.published is not None
    ]
    missing_alerts = len(injections) - len(alert_ms)
    missing_pushes = sum(1 for i in injections if i.trigger in PUSHING) - len(push_ms)
    by_trigger = {
        t: statistics.median(
            (i.alerted - i.published) * 1000
            for i in injections
            if i.trigger == t and i.alerted is not None and i.published is not None
        )
        for t in TRIGGERS
        if any(i.trigger == t and i.alerted is not None for i in injections)
    }
    say(
        f"background_msgs_per_s={background_rate:.0f} injected={len(injections)} "
        f"alerts={len(alert_ms)} pushes={len(push_ms)} missing_alerts={missing_alerts} "
        f"missing_pushes={missing_pushes}"
    )
    say(
        "cpu_pct "
        + " ".join(f"{name}={100 * seconds / elapsed:.0f}" for name, seconds in spent.items())
    )
    say("alert_p50_ms_by_trigger " + " ".join(f"{t}={v:.1f}" for t, v in by_trigger.items()))
    if not alert_ms or not push_ms:
        say("bench-rules: no latency measured")
        return 1
    say(
        f"alert_latency_ms p50={percentile(alert_ms, 0.5):.1f} p99={percentile(alert_ms, 0.99):.1f}"
    )
    say(f"push_latency_ms p50={percentile(push_ms, 0.5):.1f} p99={percentile(push_ms, 0.99):.1f}")
    return 0 if not missing_alerts and not missing_pushes else 1


@dataclass
class Cpu:
    seconds: dict[str, float]

    def minus(self, earlier: "Cpu") -> dict[str, float]:
        return {k: v - earlier.seconds.get(k, 0.0) for k, v in self.seconds.items()}


def _cpu(
    rules: Sequence[ServiceWorker], ingest: Sequence[ServiceWorker], postmaster: int, broker: int
) -> Cpu:
    seconds = {
        "rules": sum(process_cpu_s(w.child.pid) for w in rules),
        "ingest": sum(process_cpu_s(w.child.pid) for w in ingest),
        "postgres": postgres_cpu_s(postmaster),
        "mosquitto": process_cpu_s(broker),
    }
    return Cpu(seconds)


if __name__ == "__main__":
    sys.exit(main())
