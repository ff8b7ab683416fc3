"""``make bench-flood``: one device floods while others publish at their normal rate.

One device publishes QoS 1 telemetry as fast as the broker acknowledges it (``--window``
publishes in flight, one sample a message) for ``--seconds``, reconnecting whenever the broker
closes or refuses it, and resending from its first unacknowledged message as a device's outbox
would. Meanwhile ``--devices`` normal devices publish one message a second each (device time =
the moment of sending). The report gives the normal devices' ingest lag (ingest's receipt time
in ``telemetry_messages`` minus the device time: what the flood queued ahead of them) as p50,
p99 and max; the flooder's acknowledged rate; and ingest's throttle counters. After the flood
it waits until every message the flooder got a PUBACK for is stored and checks each is stored
exactly once.

``--no-throttle`` runs the same with ingest's per-device budget off (the state before it).
"""

import argparse
import contextlib
import json
import multiprocessing
import socket
import ssl
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import psycopg

from bench.harness import BenchStack, run_main, say, start_stack, workspace
from bench.mqtt_load import (
    SAMPLE_FIELDS,
    DeviceLogin,
    connect_packet,
    packet_id,
    publish_packet,
    telemetry_topic,
)
from deploy.stack.ports import LOOPBACK, distinct_free_ports
from services.common.mqtt5 import string
from services.common.tls import client_context

PUBACK_HEADER: Final = b"\x40\x02"
CONNACK_SIZE: Final = 4
READ_SIZE: Final = 64 * 1024
SOCKET_TIMEOUT_S: Final = 1.0
RECONNECT_DELAY_S: Final = 0.2
STEADY_PERIOD_S: Final = 1.0
DRAIN_POLL_S: Final = 0.5
# The flooder's device time starts this far back and advances 1 ms a message, so that every
# sample has a time of its own and none is in the future (a minute at 50,000 msg/s is 50 min).
FLOOD_TS_BACK_MS: Final = 3_600_000


class BrokerClosed(Exception):
    """The broker closed the connection or refused it."""


def _template() -> bytes:
    """A one-sample telemetry payload with ``%d`` for its seq and its sample's time."""
    sample = {"ts": 222_222_222, **SAMPLE_FIELDS}
    body = {"v": 1, "seq": 111_111_111, "session": None, "samples": [sample]}
    text = json.dumps(body).replace("%", "%%")
    return text.replace("111111111", "%d").replace("222222222", "%d").encode()


def _connect(host: str, port: int, login: DeviceLogin, tls: ssl.SSLContext | None) -> socket.socket:
    """A device connection (TLS with ``tls``) whose CONNACK accepted it, or BrokerClosed."""
    try:
        sock = socket.create_connection((host, port), timeout=SOCKET_TIMEOUT_S * 5)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname=host)
    except OSError as exc:
        raise BrokerClosed(f"connect: {exc}") from exc
    try:
        sock.sendall(connect_packet(login))
        connack = _read_exactly(sock, CONNACK_SIZE)
    except OSError as exc:
        sock.close()
        raise BrokerClosed(f"CONNACK: {exc}") from exc
    if len(connack) < CONNACK_SIZE or connack[0] != 0x20 or connack[3] != 0:
        sock.close()
        raise BrokerClosed(f"refused (CONNACK {connack!r})")
    sock.settimeout(SOCKET_TIMEOUT_S)
    return sock


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    """``size`` bytes, or fewer when the broker closes the connection first."""
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


@dataclass
class FloodResult:
    """What the flooding device did. Seqs ``0 .. acked - 1`` had a PUBACK."""

    acked: int = 0
    sent: int = 0  # PUBLISH packets written, resends included
    connects: int = 0  # connections the broker accepted
    refused: int = 0  # connection attempts refused (a ban) or failed
    closed: int = 0  # accepted connections the broker closed
    bursts: list[int] = field(default_factory=list)  # messages acknowledged per connection


def flood(
    host: str,
    port: int,
    login: DeviceLogin,
    seconds: float,
    window: int,
    first_ts_ms: int,
    ca_file: Path | None = None,
) -> FloodResult:
    """Publish as fast as acknowledged for ``seconds``; resend from the first unacknowledged
    message after every reconnect (PUBACKs of MQTT 3.1.1 QoS 1 come in order, 4.6). With
    ``ca_file``, over TLS verifying the broker against it."""
    tls = None if ca_file is None else client_context(ca_file)
    template = _template()
    topic = string(telemetry_topic(login.device_id))
    result = FloodResult()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            sock = _connect(host, port, login, tls)
        except BrokerClosed:
            result.refused += 1
            time.sleep(RECONNECT_DELAY_S)
            continue
        result.connects += 1
        before = result.acked
        try:
            _publish_until(sock, deadline, result, template, topic, window, first_ts_ms)
        except BrokerClosed:
            result.closed += 1
        finally:
            sock.close()
            result.bursts.append(result.acked - before)
    return result


def _publish_until(
    sock: socket.socket,
    deadline: float,
    result: FloodResult,
    template: bytes,
    topic: bytes,
    window: int,
    first_ts_ms: int,
) -> None:
    next_seq = result.acked
    buffer = b""
    while time.monotonic() < deadline:
        room = window - (next_seq - result.acked)
        if room > 0:
            packets = [
                publish_packet(topic, packet_id(seq), template % (seq, first_ts_ms + seq))
                for seq in range(next_seq, next_seq + room)
            ]
            try:
                sock.sendall(b"".join(packets))
            except OSError as exc:
                raise BrokerClosed(f"write: {exc}") from exc
            next_seq += room
            result.sent += room
        try:
            data = sock.recv(READ_SIZE)
        except TimeoutError:
            continue
        except OSError as exc:
            raise BrokerClosed(f"read: {exc}") from exc
        if not data:
            raise BrokerClosed("closed by the broker")
        buffer += data
        whole = len(buffer) - len(buffer) % 4
        acked = result.acked
        for pos in range(0, whole, 4):
            if buffer[pos : pos + 2] != PUBACK_HEADER:
                raise BrokerClosed(f"unexpected packet {buffer[pos : pos + 4]!r}")
            if int.from_bytes(buffer[pos + 2 : pos + 4], "big") != packet_id(acked):
                raise BrokerClosed("PUBACK out of order")
            acked += 1
        buffer = buffer[whole:]
        result.acked = acked


def _flood_into(queue: Any, *args: Any) -> None:
    queue.put(flood(*args))


class FloodProcess:
    """The flooder in a process of its own, so that it floods at full speed."""

    def __init__(
        self,
        port: int,
        login: DeviceLogin,
        seconds: float,
        window: int,
        first_ts_ms: int,
        ca_file: Path | None = None,
    ) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.queue = ctx.Queue()
        self.process = ctx.Process(
            target=_flood_into,
            args=(self.queue, LOOPBACK, port, login, seconds, window, first_ts_ms, ca_file),
            daemon=True,
        )

    def start(self) -> None:
        """Start flooding."""
        self.process.start()

    def result(self, timeout_s: float) -> FloodResult:
        """Wait for the flood to end and return what it did."""
        result = self.queue.get(timeout=timeout_s)
        self.process.join(timeout_s)
        assert isinstance(result, FloodResult)
        return result

    def stop(self) -> None:
        """Stop it if it is still running (by its own pid)."""
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)
        self.queue.close()
        self.queue.join_thread()


@dataclass
class SteadyDevices:
    """Devices publishing one telemetry message a second each, device time = sending time,
    on a thread of their own. ``sent[device]`` counts each device's messages (seqs 0..n-1)."""

    port: int
    logins: Sequence[DeviceLogin]
    ca_file: Path | None = None  # TLS verifying the broker against it, when set
    sent: dict[str, int] = field(default_factory=dict)
    unacked: int = 0
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        """Connect every device and start publishing."""
        self._thread = threading.Thread(target=self._run, name="steady-devices", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop publishing and disconnect."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)

    def _run(self) -> None:
        socks: dict[str, socket.socket] = {}
        tls = None if self.ca_file is None else client_context(self.ca_file)
        try:
            for login in self.logins:
                socks[login.device_id] = _connect(LOOPBACK, self.port, login, tls)
                self.sent[login.device_id] = 0
            self._publish(socks)
        except (BrokerClosed, OSError) as exc:
            self.errors.append(f"a normal device lost its connection: {exc}")
        finally:
            for sock in socks.values():
                with contextlib.suppress(OSError):
                    sock.sendall(b"\xe0\x00")  # DISCONNECT
                sock.close()

    def _publish(self, socks: dict[str, socket.socket]) -> None:
        template = _template()
        acks = dict.fromkeys(socks, 0)
        topics = {d: string(telemetry_topic(d)) for d in socks}
        next_at = time.monotonic()
        while not self._stop.is_set():
            for device_id, sock in socks.items():
                seq = self.sent[device_id]
                payload = template % (seq, int(time.time() * 1000))
                sock.sendall(publish_packet(topics[device_id], packet_id(seq), payload))
                self.sent[device_id] = seq + 1
            for device_id, sock in socks.items():
                acks[device_id] += _read_pubacks(sock)
            self.unacked = sum(self.sent.values()) - sum(acks.values())
            next_at += STEADY_PERIOD_S
            self._stop.wait(max(0.0, next_at - time.monotonic()))


def _read_pubacks(sock: socket.socket) -> int:
    """PUBACKs waiting on a steady device's socket (it sends one message a second)."""
    sock.setblocking(False)
    count = 0
    try:
        while True:
            data = sock.recv(READ_SIZE)
            if not data:
                break
            count += len(data) // 4
    except (BlockingIOError, ssl.SSLWantReadError):
        pass
    finally:
        sock.settimeout(SOCKET_TIMEOUT_S)
    return count


# --- Reading the database ------------------------------------------------------------------


def stored_count(url: str, device_ids: Sequence[str]) -> int:
    """Telemetry messages stored for ``device_ids``."""
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM telemetry_messages WHERE device_id = ANY(%s)", [list(device_ids)]
        ).fetchone()
    return int(row[0]) if row else 0


def lags_s(url: str, device_ids: Sequence[str]) -> list[float]:
    """Each stored message's ingest lag: ingest's receipt time minus its device time."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT extract(epoch FROM received_at - ts)::float8 FROM telemetry_messages"
            " WHERE device_id = ANY(%s)",
            [list(device_ids)],
        ).fetchall()
    return [float(r[0]) for r in rows]


def acked_stored(url: str, device_id: str, acked: int, first_ts_ms: int) -> tuple[int, int, int]:
    """Of the flooder's seqs ``0 .. acked-1`` (seq n's one sample is at ``first_ts_ms + n``):
    messages stored, distinct seqs stored, samples stored."""
    before = datetime.fromtimestamp((first_ts_ms + acked) / 1000, UTC)
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT count(*), count(DISTINCT seq) FROM telemetry_messages"
            " WHERE device_id = %s AND seq < %s",
            [device_id, acked],
        ).fetchone()
        samples = conn.execute(
            "SELECT count(*) FROM samples WHERE device_id = %s AND ts < %s",
            [device_id, before],
        ).fetchone()
    assert row is not None
    assert samples is not None
    return int(row[0]), int(row[1]), int(samples[0])


def wait_stored(url: str, device_ids: Sequence[str], expected: int, stall_s: float) -> bool:
    """Wait until ``expected`` messages of ``device_ids`` are stored; False once none more has
    been stored for ``stall_s`` (the broker dropped the rest)."""
    stored = stored_count(url, device_ids)
    progressed = time.monotonic()
    while stored < expected:
        if time.monotonic() - progressed > stall_s:
            return False
        time.sleep(DRAIN_POLL_S)
        now_stored = stored_count(url, device_ids)
        if now_stored != stored:
            stored, progressed = now_stored, time.monotonic()
    return True


def broker_dropped(broker_dir: Path) -> bool:
    """Whether the broker logged dropping queued messages (a subscriber's queue was full)."""
    log_text = (broker_dir / "mosquitto.log").read_text(errors="replace")
    return "Outgoing messages are being dropped" in log_text


def percentile(values: Sequence[float], fraction: float) -> float:
    """The ``fraction`` quantile of ``values`` (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


# --- The run -------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="make bench-flood", description="one device floods; do the others still get in?"
    )
    parser.add_argument("--seconds", type=float, default=60.0, help="flood time (60)")
    parser.add_argument("--devices", type=int, default=20, help="normal devices (20)")
    parser.add_argument("--workers", type=int, default=1, help="ingest workers (1)")
    parser.add_argument("--window", type=int, default=1000, help="flooder's publishes in flight")
    parser.add_argument("--budget", type=int, default=2000, help="messages per window (2000)")
    parser.add_argument("--budget-window-s", type=float, default=10.0, help="budget window (10)")
    parser.add_argument("--ban-s", type=float, default=30.0, help="ban length (30)")
    parser.add_argument(
        "--no-throttle", action="store_true", help="ingest's per-device budget off (before)"
    )
    parser.add_argument(
        "--stall-s",
        type=float,
        default=30.0,
        help="stop waiting for the backlog after this long without progress (30)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the data and logs directory")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    """Start everything, flood, report, stop everything (in reverse order, by pid)."""
    with (
        workspace("galvani-bench-flood-", args.keep, "data and logs kept in {}") as root,
        contextlib.ExitStack() as stack,
    ):
        bench = start_stack(root, stack, "bench-flood", args.devices + 1)
        flooder, normal = bench.logins[0], bench.logins[1:]
        throttle = (
            "off"
            if args.no_throttle
            else (f"{args.budget} msgs/{args.budget_window_s:g} s a device, ban {args.ban_s:g} s")
        )
        workers = bench.start_workers(
            "ingest",
            distinct_free_ports(args.workers),
            ready="subscribed to",
            throttle=str(not args.no_throttle).lower(),
            throttle_messages=args.budget,
            throttle_window_s=str(args.budget_window_s),
            throttle_ban_s=str(args.ban_s),
            broker_dir=str(bench.broker.config.directory),
        )
        say(f"{len(workers)} ingest worker(s), throttle {throttle}")
        return _measure(args, bench, flooder, normal, workers, stack)


def _measure(
    args: argparse.Namespace,
    bench: BenchStack,
    flooder: DeviceLogin,
    normal: Sequence[DeviceLogin],
    workers: Sequence[Any],
    stack: contextlib.ExitStack,
) -> int:
    port = bench.broker.config.device_port
    ca_file = bench.broker.config.pki.ca_file
    steady = SteadyDevices(port, normal, ca_file)
    stack.callback(steady.stop)
    steady.start()
    time.sleep(2.0)  # the normal devices' lag before the flood, as a reference
    first_ts_ms = int(time.time() * 1000) - FLOOD_TS_BACK_MS
    flood_proc = FloodProcess(port, flooder, args.seconds, args.window, first_ts_ms, ca_file)
    stack.callback(flood_proc.stop)
    say(f"{len(normal)} normal devices at 1 msg/s; one device floods for {args.seconds:g} s")
    flood_proc.start()
    result = flood_proc.result(args.seconds + 120)
    steady.stop()
    normal_ids = [login.device_id for login in normal]
    sent_normal = sum(steady.sent.values())
    drained = wait_stored(bench.url, normal_ids, sent_normal, args.stall_s)
    flood_drained = wait_stored(bench.url, [flooder.device_id], result.acked, args.stall_s)
    lags = lags_s(bench.url, normal_ids)
    stored, distinct, samples = acked_stored(
        bench.url, flooder.device_id, result.acked, first_ts_ms
    )
    seconds = args.seconds
    say(
        f"normal devices' ingest lag (s): p50 {percentile(lags, 0.5):.3f}"
        f" p99 {percentile(lags, 0.99):.3f} max {max(lags):.3f}"
        f" mean {statistics.fmean(lags):.2f} over {len(lags)} messages"
        + ("" if drained else f" (only {len(lags)} of {sent_normal} stored in time)")
    )
    say(
        f"flooder: {result.acked} messages acknowledged in the {seconds:g} s flood"
        f" ({result.acked / seconds:.0f} msg/s), {result.sent} sent,"
        f" {result.connects} connections accepted, {result.closed} closed by the broker,"
        f" {result.refused} attempts refused; acknowledged per connection:"
        f" {', '.join(map(str, result.bursts))}"
    )
    say(
        f"flooder's acknowledged messages stored: {stored} of {result.acked}"
        f" ({distinct} distinct seqs, {samples} samples)"
        + ("" if flood_drained else "; the rest never arrived")
    )
    if broker_dropped(bench.broker.config.directory):
        say(
            "the broker dropped queued messages: ingest's queue reached max_queued_bytes /"
            " max_queued_messages (acknowledged messages lost unless their device resends them)"
        )
    banned = sum(
        w.metric('galvani_ingest_devices_throttled_total{action="banned"}') for w in workers
    )
    lifted = sum(
        w.metric('galvani_ingest_devices_throttled_total{action="lifted"}') for w in workers
    )
    failed = sum(
        w.metric('galvani_ingest_devices_throttled_total{action="ban_failed"}') for w in workers
    )
    over = sum(w.metric("galvani_ingest_over_budget_messages_total") for w in workers)
    say(
        f"throttle: {banned:.0f} bans, {lifted:.0f} lifted, {failed:.0f} failed,"
        f" {over:.0f} messages over budget (all stored)"
    )
    exact = stored == distinct == samples == result.acked
    return 0 if drained and flood_drained and exact and not steady.errors else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``make bench-flood``; returns the exit status."""
    args = parse_args(argv)
    return run_main("bench-flood", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
