"""``galvani-agent``: run one device's agent.

``galvani-agent run --device-id d-1 --simulate --session LIFT:5:300 --scenario dry-electrode``
runs the agent on simulated hardware, starts a session as a user would, and makes the device
misbehave on demand, so a support team or a test can reproduce any rule of the catalogue.

The password comes from ``--password-file`` or ``GALVANI_AGENT_PASSWORD``, never from the
command line (which other users of the machine can read in the process list). With
``--cert-file`` and ``--key-file`` (and ``--ca-file``) the agent connects with mutual TLS to
the broker's certificate listener, which names the device by its certificate: no password.
"""

import argparse
import asyncio
import contextlib
import logging
import os
import random
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from device_agent.agent import Identity
from device_agent.arguments import (
    MQTT_VERSIONS,
    add_shared_arguments,
    broker_address,
    broker_nodes,
    read_public_keys,
)
from device_agent.link import BACKOFF_MAX_S, BrokerAddress
from device_agent.simulation import SCENARIO_NAMES, Plan, SimulatedDevice, power_off
from device_agent.store import DeviceStore, OutboxLimits, open_database

log = logging.getLogger("galvani.agent.cli")

PASSWORD_ENV = "GALVANI_AGENT_PASSWORD"  # noqa: S105 - a variable name


def _plan(text: str) -> tuple[str, int, int]:
    parts = text.split(":")
    if not 2 <= len(parts) <= 3 or not all(part.strip() for part in parts):
        raise argparse.ArgumentTypeError("expected MODE:LEVEL or MODE:LEVEL:SECONDS")
    try:
        level = int(parts[1])
        seconds = int(parts[2]) if len(parts) == 3 else 0
    except ValueError:
        raise argparse.ArgumentTypeError("LEVEL and SECONDS are integers") from None
    return parts[0].upper(), level, seconds


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(prog="galvani-agent", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the agent")
    run.add_argument("--device-id", required=True)
    add_shared_arguments(run, store_help="SQLite file: outbox, seq, applied table")
    run.add_argument("--password-file", type=Path, help=f"else ${PASSWORD_ENV}")
    run.add_argument("--ca-file", help="the broker's CA bundle: connect with TLS")
    run.add_argument(
        "--cert-file",
        help="the device's certificate (PEM): mutual TLS to the certificate listener, no password",
    )
    run.add_argument("--key-file", help="the device's private key (PEM) for --cert-file")
    run.add_argument("--outbox-max-bytes", type=int, default=OutboxLimits().max_bytes)
    run.add_argument("--outbox-max-age", type=float, default=OutboxLimits().max_age_s)
    run.add_argument(
        "--backoff-max",
        type=float,
        default=BACKOFF_MAX_S,
        help="seconds: the longest wait before reconnecting or sending a refused message again",
    )
    run.add_argument("--fw", default="1.4.2")
    run.add_argument("--hw", default="B")
    run.add_argument(
        "--simulate",
        action="store_true",
        help="simulated hardware (this build has no real driver; see device_agent.hardware)",
    )
    run.add_argument(
        "--session",
        type=_plan,
        metavar="MODE:LEVEL[:SECONDS]",
        help="start this session at once (SECONDS 0: the mode's default length)",
    )
    run.add_argument("--every", type=float, help="repeat --session every this many seconds")
    run.add_argument("--battery", type=float, help="initial battery %% of the simulated device")
    run.add_argument(
        "--scenario",
        action="append",
        default=[],
        choices=SCENARIO_NAMES,
        help="make the simulated device misbehave (repeatable)",
    )
    run.add_argument("--seed", type=int, default=None)
    run.add_argument("--verbose", action="store_true")
    return parser


def _password(args: argparse.Namespace) -> str:
    if args.cert_file is not None:
        return ""  # the certificate names the device
    if args.password_file is not None:
        try:
            return str(args.password_file.read_text("utf-8").strip())
        except OSError as exc:
            raise SystemExit(f"galvani-agent: cannot read {args.password_file}: {exc}") from None
    password = os.environ.get(PASSWORD_ENV)
    if not password:
        raise SystemExit(f"galvani-agent: give --password-file or set {PASSWORD_ENV}")
    return password


async def _run(args: argparse.Namespace) -> int:
    if not args.simulate:
        raise SystemExit(
            "galvani-agent: this build has no hardware driver; pass --simulate, or run the agent "
            "from Python with your driver (device_agent.hardware.Hardware)"
        )
    plan = None
    if args.session is not None:
        mode, level, seconds = args.session
        plan = Plan(mode=mode, level=level, seconds=seconds, every_s=args.every)
    (host, port), *fallbacks = args.nodes
    conn = open_database(args.store)
    store = DeviceStore(
        conn,
        args.device_id,
        OutboxLimits(max_bytes=args.outbox_max_bytes, max_age_s=args.outbox_max_age),
    )
    device = SimulatedDevice(
        Identity(args.device_id, fw=args.fw, hw=args.hw),
        store,
        broker_address(
            "galvani-agent",
            BrokerAddress(
                host,
                port,
                _password(args),
                args.ca_file,
                args.cert_file,
                args.key_file,
                protocol=MQTT_VERSIONS[args.mqtt_version],
                fallbacks=tuple(fallbacks),
                keepalive_s=args.keepalive,
            ),
        ),
        public_keys=read_public_keys(args.public_key),
        clock_ms=lambda: time.time_ns() // 1_000_000,
        rng=random.Random(args.seed),
        plan=plan,
        scenarios=args.scenario,
        backoff_max_s=args.backoff_max,
        batt_pct=args.battery,
        delete_on=args.delete_on,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    if args.duration is not None:
        loop.call_later(args.duration, stop.set)
    device.start()
    while not stop.is_set():
        interval_ms = device.tick()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval_ms / 1000)
    await power_off([device])
    messages, size = store.backlog()
    log.info("stopped; %d messages (%d bytes) wait in the outbox", messages, size)
    conn.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``galvani-agent``."""
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if (args.cert_file is None) != (args.key_file is None):
        parser.error("--cert-file and --key-file go together")
    if args.cert_file is not None and args.ca_file is None:
        parser.error("--cert-file needs --ca-file (the broker's CA: mutual TLS)")
    args.nodes = broker_nodes(parser, args)
    if not 0 < args.keepalive <= 0xFFFF:
        parser.error("--keepalive must be 1 to 65535 seconds")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(message)s",
    )
    return asyncio.run(_run(args))


if __name__ == "__main__":
    sys.exit(main())
