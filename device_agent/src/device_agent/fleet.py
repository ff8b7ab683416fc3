"""``galvani-fleet``: many simulated devices in one process, one asyncio loop, no thread each.

Every device has its own credentials (from a JSON file ``{"device-id": "password", ...}``),
its own agent, outbox and seq (all in one SQLite file keyed by device id) and its own MQTT
connection. Usage is realistic by default: most people 3 to 5 sessions a week at random
times, some overusers (some of them with a second device), some who forget the gel, and a
few faulty units. ``--activity`` multiplies everyone's session rate, so a small live fleet
shows sessions within minutes instead of days.

With ``--ca-file`` every device connects with TLS (to the broker's password listener); the
fleet builds one TLS context for all of them, so the CA bundle is loaded once, not 10,000 times.

Given a cluster's nodes (``--broker`` repeated, or a comma-separated list), the fleet spreads its
devices over them round-robin, as a load balancer would: each device connects to its own node
first and fails over to the others, in an order of its own, so the devices of a node that dies
spread over the nodes left instead of all landing on the next one.
"""

import argparse
import asyncio
import contextlib
import heapq
import json
import logging
import os
import random
import resource
import signal
import sqlite3
import ssl
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from device_agent.agent import Identity
from device_agent.arguments import (
    MQTT_VERSIONS,
    add_shared_arguments,
    broker_nodes,
    read_public_keys,
)
from device_agent.connection import KEEPALIVE_S, MQTT_5
from device_agent.link import BrokerAddress, DeleteOn
from device_agent.simulation import Habits, SimulatedDevice, power_off
from device_agent.simulator import Scenario
from device_agent.store import DeviceStore, OutboxLimits, open_database, total_backlog
from device_agent.tls import client_context

log = logging.getLogger("galvani.fleet")

CONNECTS_PER_S: Final = 500  # how fast the fleet powers on by default (the accept queue)
STATUS_INTERVAL_S: Final = 10.0
PUBLISHING_WINDOW_S: Final = 70.0  # a heartbeat a minute, plus slack
# Thousands of outboxes share one file on one disk: 1 MiB each is still hours of a session.
FLEET_OUTBOX: Final = OutboxLimits(max_bytes=1024 * 1024)
OVERUSER_SHARE: Final = 0.05
FORGETFUL_SHARE: Final = 0.10
FAULTY_SHARE: Final = 0.02
FAULTS: Final = (
    Scenario.DRY_ELECTRODE,
    Scenario.CONTACT_LOSS,
    Scenario.OVERCURRENT_SPIKE,
    Scenario.REGULATION_DRIFT,
    Scenario.ELECTRODE_OVERHEAT,
)


@dataclass(frozen=True)
class FleetOptions:
    """What ``galvani-fleet`` was asked to run."""

    devices: int
    credentials: Path
    nodes: tuple[tuple[str, int], ...]  # the broker's nodes (host, port): one, or a cluster's
    public_keys: tuple[bytes, ...]
    store: Path
    activity: float = 1.0
    seed: int = 0
    status_file: Path | None = None
    status_interval_s: float = STATUS_INTERVAL_S
    duration_s: float | None = None
    delete_on: DeleteOn = DeleteOn.STORED
    faulty_share: float = FAULTY_SHARE
    ca_file: str | None = None  # TLS when set
    connects_per_s: int = CONNECTS_PER_S
    protocol: int = MQTT_5  # the CONNECT's protocol level: 5, or 4 (MQTT 3.1.1)
    keepalive_s: int = KEEPALIVE_S


@dataclass(frozen=True)
class Credential:
    """A device's broker password and, if known, the pseudonymous user it belongs to."""

    password: str
    user: str | None


def load_credentials(path: Path) -> dict[str, Credential]:
    """Device credentials from a JSON object: ``{"id": "password"}`` or
    ``{"id": {"password": "...", "user": "u-1"}}``; anything else is a clear error."""
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise SystemExit(f"galvani-fleet: cannot read credentials {path}: {exc}") from None
    problem = SystemExit(
        f"galvani-fleet: {path} must map device ids to a password or to "
        '{"password": ..., "user": ...}'
    )
    if not isinstance(data, dict):
        raise problem
    credentials = {}
    for device_id, value in data.items():
        if isinstance(value, str):
            credentials[device_id] = Credential(value, None)
        elif isinstance(value, dict) and isinstance(value.get("password"), str):
            user = value.get("user")
            credentials[device_id] = Credential(
                value["password"], user if isinstance(user, str) else None
            )
        else:
            raise problem
    return credentials


def habits_for(user: str | None, rng: random.Random, activity: float) -> Habits:
    """How ``user`` uses the device: most 3 to 5 times a week, some overuse or forget gel."""
    roll = rng.random()
    per_week = rng.uniform(3, 5)
    gel_forgotten = 0.02
    if roll < OVERUSER_SHARE:
        per_week = rng.uniform(8, 14)
    elif roll < OVERUSER_SHARE + FORGETFUL_SHARE:
        gel_forgotten = 0.4
    return Habits(
        user_id=user,
        sessions_per_week=per_week * activity,
        gel_forgotten=gel_forgotten,
        level=rng.randint(3, 7),
    )


class Fleet:
    """The devices and the one loop that ticks them."""

    def __init__(self, options: FleetOptions) -> None:
        self.options = options
        self.devices: list[SimulatedDevice] = []
        self.conn: sqlite3.Connection | None = None
        self.started = time.monotonic()
        # Uptimes: when the first device started connecting, and the first status that saw
        # every device connected (to within the status interval).
        self.power_on_s: float | None = None
        self.all_connected_s: float | None = None
        # How late ticks ran (ms) since the last report: is the one loop keeping up?
        self.lateness_ms: list[float] = []

    async def run(self, stop: asyncio.Event) -> None:
        """Power the fleet on, tick it until ``stop``, then power it off."""
        options = self.options
        credentials = load_credentials(options.credentials)
        device_ids = sorted(credentials)[: options.devices]
        if len(device_ids) < options.devices:
            raise SystemExit(
                f"galvani-fleet: {options.credentials} has {len(device_ids)} devices, "
                f"{options.devices} asked"
            )
        tls = _tls_context(options.ca_file)
        conn = self.conn = open_database(options.store, durable=False)
        rng = random.Random(options.seed)
        due: list[tuple[float, int]] = []
        for index, device_id in enumerate(device_ids):
            device_rng = random.Random(f"{options.seed}/{device_id}")
            scenarios = [rng.choice(FAULTS)] if rng.random() < options.faulty_share else []
            (host, port), *fallbacks = spread(
                options.nodes, index, random.Random(f"{options.seed}/{device_id}/nodes")
            )
            device = SimulatedDevice(
                Identity(device_id, fw="1.4.2", hw="B"),
                DeviceStore(conn, device_id, FLEET_OUTBOX),
                BrokerAddress(
                    host,
                    port,
                    credentials[device_id].password,
                    ca_file=options.ca_file,
                    tls_context=tls,
                    protocol=options.protocol,
                    fallbacks=tuple(fallbacks),
                    keepalive_s=options.keepalive_s,
                ),
                public_keys=options.public_keys,
                clock_ms=_now_ms,
                rng=device_rng,
                habits=habits_for(credentials[device_id].user, device_rng, options.activity),
                scenarios=scenarios,
                delete_on=options.delete_on,
            )
            self.devices.append(device)
        log.info("powering on %d devices", len(self.devices))
        self.power_on_s = round(time.monotonic() - self.started, 2)
        per_s = options.connects_per_s
        for index, device in enumerate(self.devices):
            device.start()
            heapq.heappush(due, (time.monotonic() + random.random(), index))
            if index % per_s == per_s - 1:
                await asyncio.sleep(1)
        next_status = time.monotonic()
        deadline = None if options.duration_s is None else time.monotonic() + options.duration_s
        while not stop.is_set():
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                break
            while due and due[0][0] <= now:
                at, index = heapq.heappop(due)
                self.lateness_ms.append(1000 * (now - at))
                interval_ms = self.devices[index].tick()
                next_at = at + interval_ms / 1000
                heapq.heappush(due, (next_at if next_at > now else now + interval_ms / 1000, index))
            if now >= next_status:
                next_status = now + options.status_interval_s
                self.report()
            wait = (due[0][0] - time.monotonic()) if due else 0.1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=max(0.005, wait))
        log.info("powering off")
        await power_off(self.devices)
        self.report()
        self.conn = None
        conn.close()

    def status(self) -> dict[str, object]:
        """What the fleet is doing now."""
        usage = resource.getrusage(resource.RUSAGE_SELF)
        recent = time.monotonic() - PUBLISHING_WINDOW_S
        lateness = sorted(self.lateness_ms)
        self.lateness_ms = []
        p99 = lateness[int(0.99 * (len(lateness) - 1))] if lateness else 0.0
        uptime_s = round(time.monotonic() - self.started, 2)
        connected = sum(d.link.connected for d in self.devices)
        by_node = Counter("{}:{}".format(*d.link.node) for d in self.devices if d.link.connected)
        if self.all_connected_s is None and self.devices and connected == len(self.devices):
            self.all_connected_s = uptime_s
        return {
            "devices": len(self.devices),
            "tls": self.options.ca_file is not None,
            "connected": connected,
            "connected_by_node": dict(sorted(by_node.items())),
            "power_on_s": self.power_on_s,
            "all_connected_s": self.all_connected_s,
            "publishing_60s": sum(
                (d.link.stats.last_delivery_s or -1e18) >= recent for d in self.devices
            ),
            "lateness_p99_ms": round(p99, 1),
            "in_session": sum(d.agent.session is not None for d in self.devices),
            "delivered": sum(d.link.stats.delivered for d in self.devices),
            "stored": sum(d.link.stats.stored for d in self.devices),
            "no_subscribers": sum(d.link.stats.no_subscribers for d in self.devices),
            "resends": sum(d.link.stats.resends for d in self.devices),
            "refused": sum(d.link.stats.refused for d in self.devices),
            "hung_up": sum(d.link.stats.hung_up for d in self.devices),
            "subscribe_refused": sum(d.link.stats.subscribe_refused for d in self.devices),
            # Devices whose delivered messages have waited past the longest stored-ack timeout:
            # the backend away, or acks not reaching them (a SUBACK can grant a filter the ACL
            # then delivers nothing on).
            "acks_overdue": sum(d.link.acks_overdue for d in self.devices),
            "backlog": total_backlog(self.conn)[0] if self.conn is not None else 0,
            "session_refusals": sum(d.refusals for d in self.devices),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "rss_mb": round(usage.ru_maxrss / 1024, 1),
            "uptime_s": uptime_s,
        }

    def report(self) -> None:
        """Log the status (and write it to the status file, if asked)."""
        status = self.status()
        log.info("fleet %s", " ".join(f"{key}={value}" for key, value in status.items()))
        if self.options.status_file is not None:
            tmp = self.options.status_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(status) + "\n")
            os.replace(tmp, self.options.status_file)


def spread(
    nodes: Sequence[tuple[str, int]], index: int, rng: random.Random
) -> list[tuple[str, int]]:
    """The nodes in the order device ``index`` tries them: its own first (round-robin over
    the fleet), then the others shuffled by the device's own generator."""
    first = nodes[index % len(nodes)]
    others = [node for position, node in enumerate(nodes) if position != index % len(nodes)]
    rng.shuffle(others)
    return [first, *others]


def _tls_context(ca_file: str | None) -> ssl.SSLContext | None:
    if ca_file is None:
        return None
    try:
        return client_context(ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise SystemExit(f"galvani-fleet: cannot use the CA file {ca_file}: {exc}") from None


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def parse_args(argv: Sequence[str]) -> FleetOptions:
    """The command line of ``galvani-fleet``."""
    parser = argparse.ArgumentParser(prog="galvani-fleet", description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, required=True, help="how many devices to run")
    parser.add_argument(
        "--credentials", type=Path, required=True, help="JSON file: device id -> password"
    )
    add_shared_arguments(parser, store_help="SQLite file for every device's outbox and seq")
    parser.add_argument(
        "--activity", type=float, default=1.0, help="multiply every session rate (1 = realistic)"
    )
    parser.add_argument("--ca-file", help="the broker's CA bundle: every device connects with TLS")
    parser.add_argument(
        "--connects-per-s",
        type=int,
        default=CONNECTS_PER_S,
        help=f"devices that start connecting each second at power-on (default {CONNECTS_PER_S})",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--status-file", type=Path, help="write the status JSON here")
    parser.add_argument(
        "--status-interval", type=float, default=STATUS_INTERVAL_S, help="seconds between reports"
    )
    parser.add_argument(
        "--faulty-share",
        type=float,
        default=FAULTY_SHARE,
        help=f"share of devices with a hardware fault (default {FAULTY_SHARE}; the fault suite "
        "raises it so rules push SAFE tables during every run)",
    )
    args = parser.parse_args(argv)
    if not 0 <= args.faulty_share <= 1:
        parser.error("--faulty-share must be between 0 and 1")
    if args.devices < 1:
        parser.error("--devices must be at least 1")
    if args.connects_per_s < 1:
        parser.error("--connects-per-s must be at least 1")
    if args.activity <= 0:
        parser.error("--activity must be positive")
    if not 0 < args.keepalive <= 0xFFFF:
        parser.error("--keepalive must be 1 to 65535 seconds")
    # The options are the parsed arguments, but for the keys (read from their file) and the two
    # durations, whose fields carry their unit in the name.
    values = vars(args)
    values["public_keys"] = read_public_keys(values.pop("public_key"))
    values["status_interval_s"] = values.pop("status_interval")
    values["duration_s"] = values.pop("duration")
    values["nodes"] = tuple(broker_nodes(parser, args))
    values["protocol"] = MQTT_VERSIONS[values.pop("mqtt_version")]
    values["keepalive_s"] = values.pop("keepalive")
    for name in ("host", "port", "broker"):
        del values[name]
    return FleetOptions(**values)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``galvani-fleet``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    options = parse_args(sys.argv[1:] if argv is None else argv)
    return asyncio.run(_serve(options))


async def _serve(options: FleetOptions) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await Fleet(options).run(stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
