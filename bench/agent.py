"""``make bench-agent``: what one agent costs on the device, and how many simulated devices one
fleet process keeps connected and publishing; each without TLS and with it, in one run.

Part 1 runs ``galvani-agent run --simulate`` in a LIFT session (10 Hz sampling, one telemetry
message a second) against its own Mosquitto and reads the process's RSS and CPU from /proc
over a window: plaintext (the development listener), TLS with the device's password, and
mutual TLS with a device certificate from the run's device CA (the certificate listener).
Targets: at most 40 MB RSS and 2 % of one core.

Part 2 runs ``galvani-fleet`` with N devices, each with its own credentials, at realistic usage,
and after all of them have connected watches a window of at least 70 s (every idle device
sends a heartbeat a minute). N "holds" when every device is connected at the end, every one
delivered at least one message in the window, and the fleet's scheduler ran its ticks on time
(p99 lateness at most 250 ms). Each size in ``--fleet-sizes`` runs plaintext and then TLS (one
TLS context in the fleet, a password each), each on a fresh broker so that the broker's
memory is its own; the search stops at the first size that does not hold. Besides the window's
figures it reports how long the fleet took to connect everyone (from the first device's
connect to the first status that saw all connected: the status interval is 1 s), that as
connections per second, and the CPU spent until then per device: the fleet's from its start
(Python's start-up and building the devices included, the same for both transports) and the
broker's from the fleet's start.
Target: 10,000.

Last lines:
``agent_rss_mb=… agent_cpu_pct=… agent_tls_… agent_mtls_…`` and
``fleet_max_devices=… …`` and ``fleet_tls_max_devices=… …``
"""

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench.harness import process_cpu_s, say
from deploy.stack.mosquitto import MosquittoBroker, local_broker
from deploy.stack.pki import DevelopmentPKI
from services.common import pki as certificates
from services.common.broker_auth import ServiceAccount, hash_password, new_device_password
from services.common.signing import public_key_b64

REPO_ROOT: Final = Path(__file__).resolve().parents[1]
PAGE_KB: Final = os.sysconf("SC_PAGE_SIZE") // 1024
LATENESS_P99_LIMIT_MS: Final = 250.0
# The fleet's status interval: the resolution of the time to connect everyone.
FLEET_STATUS_INTERVAL_S: Final = 1.0


class Transport(StrEnum):
    """How the device reaches the broker."""

    PLAIN = "plain"  # the development listener (GALVANI_MQTT_PLAINTEXT)
    TLS = "tls"  # the device listener: TLS, the device's password
    MTLS = "mtls"  # the certificate listener: mutual TLS, a device certificate


def start_broker(
    root: Path,
    name: str,
    passwords: dict[ServiceAccount, str],
    development_pki: DevelopmentPKI,
    stack: contextlib.ExitStack,
) -> MosquittoBroker:
    """Mosquitto with Galvani's generated configuration, its TLS listeners and the plaintext
    device listener, and no devices yet."""
    broker = local_broker(root / name, passwords, development_pki, plain_device=True)
    stack.callback(broker.stop)
    broker.start([])
    return broker


def broker_pid(broker: MosquittoBroker) -> int:
    """The running broker's process id."""
    if broker.child is None:
        raise SystemExit("the broker is not running")
    return broker.child.pid


def rss_mb(pid: int) -> float:
    """Resident set size of ``pid`` in MB."""
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * PAGE_KB / 1024


def admit_devices(broker: MosquittoBroker, path: Path, count: int, prefix: str) -> dict[str, str]:
    """``count`` devices with fresh passwords, written to ``path`` and loaded by the broker."""
    passwords = {f"{prefix}-{i:05d}": new_device_password() for i in range(count)}
    path.write_text(json.dumps(passwords))
    path.chmod(0o600)
    broker.files.write_device_files(
        [(device_id, hash_password(pw)) for device_id, pw in passwords.items()]
    )
    if not broker.files.reload_broker():
        raise SystemExit("the broker did not take the new device credentials")
    return passwords


def connection_options(
    root: Path, broker: MosquittoBroker, transport: Transport, device_id: str
) -> list[str]:
    """The agent's port and TLS options for ``transport``."""
    config = broker.config
    ca = f"--ca-file={config.pki.ca_file}"
    if transport is Transport.PLAIN:
        assert config.plain_device_port is not None
        return [f"--port={config.plain_device_port}"]
    if transport is Transport.TLS:
        return [f"--port={config.device_port}", ca]
    key = certificates.new_device_key()
    certificate = config.pki.device_authority().issue_client(device_id, key.public_key())
    cert_file, key_file = root / f"{device_id}.pem", root / f"{device_id}.key"
    certificates.write_file(cert_file, certificates.pem(certificate), mode=0o644)
    certificates.write_file(key_file, certificates.private_pem(key), mode=0o600)
    return [f"--port={config.cert_port}", ca, f"--cert-file={cert_file}", f"--key-file={key_file}"]


def measure_agent(
    root: Path, broker: MosquittoBroker, public_key: Path, window_s: float, transport: Transport
) -> tuple[float, float]:
    """One agent in a session: (RSS MB at the end of the window, CPU % of one core)."""
    [(device_id, password)] = admit_devices(
        broker, root / f"agent-{transport}-credentials.json", 1, f"agent-{transport}"
    ).items()
    env = {**os.environ, "GALVANI_AGENT_PASSWORD": password}
    if transport is Transport.MTLS:
        del env["GALVANI_AGENT_PASSWORD"]  # the certificate names the device
    log_path = root / f"agent-{transport}.log"
    log = open(log_path, "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "device_agent.cli",
            "run",
            "--simulate",
            f"--device-id={device_id}",
            *connection_options(root, broker, transport, device_id),
            f"--public-key={public_key}",
            f"--store={root / f'agent-{transport}.sqlite3'}",
            "--session=LIFT:5:900",
            # No backend behind this broker sends stored-acks: delete on PUBACK, as devices did
            # before them, so the outbox stays as small as a device's in the field.
            "--delete-on=puback",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=REPO_ROOT,
    )
    try:
        time.sleep(5)  # start-up (imports, connect) is not the steady state
        if process.poll() is not None:
            raise SystemExit(f"the agent exited: see {log_path}")
        cpu_before, started = process_cpu_s(process.pid), time.monotonic()
        time.sleep(window_s)
        cpu = process_cpu_s(process.pid) - cpu_before
        elapsed = time.monotonic() - started
        rss = rss_mb(process.pid)
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()
    # The agent keeps trying a connection the broker refuses: measured idle, it would look
    # cheap. Mosquitto logs each accepted client as "... as <client id> (...)".
    broker_log = (broker.config.directory / "mosquitto.log").read_text(errors="replace")
    if f" as {device_id} (" not in broker_log:
        raise SystemExit(f"the {transport} agent never connected: see {log_path}")
    return rss, 100 * cpu / elapsed


@dataclass
class FleetRun:
    transport: Transport
    devices: int
    connected: int
    publishing: int
    lateness_p99_ms: float
    cpu_pct: float
    rss_mb: float
    delivered_per_s: float
    connect_s: float  # first device's connect to the first status with all connected
    fleet_cpu_connect_s: float  # the fleet's CPU from its start until all connected
    broker_cpu_connect_s: float  # the broker's, over the same time
    broker_rss_mb: float  # at the end of the window

    @property
    def connects_per_s(self) -> float:
        return self.devices / self.connect_s if self.connect_s > 0 else float("inf")

    @property
    def holds(self) -> bool:
        return (
            self.connected == self.devices
            and self.publishing == self.devices
            and self.lateness_p99_ms <= LATENESS_P99_LIMIT_MS
        )

    def line(self) -> str:
        per_device_ms = 1000 / self.devices
        return (
            f"fleet transport={self.transport} devices={self.devices} "
            f"connected={self.connected} publishing={self.publishing} "
            f"lateness_p99_ms={self.lateness_p99_ms:.0f} cpu_pct={self.cpu_pct:.0f} "
            f"rss_mb={self.rss_mb:.0f} messages_per_s={self.delivered_per_s:.0f} "
            f"connect_s={self.connect_s:.1f} connects_per_s={self.connects_per_s:.0f} "
            f"fleet_startup_cpu_ms_per_device={self.fleet_cpu_connect_s * per_device_ms:.2f} "
            f"broker_connect_cpu_ms_per_device={self.broker_cpu_connect_s * per_device_ms:.2f} "
            f"broker_rss_mb={self.broker_rss_mb:.0f} holds={'yes' if self.holds else 'no'}"
        )

    def summary(self) -> str:
        return (
            f"devices={self.devices} connected={self.connected} publishing={self.publishing} "
            f"lateness_p99_ms={self.lateness_p99_ms:.0f} cpu_pct={self.cpu_pct:.0f} "
            f"rss_mb={self.rss_mb:.0f} connect_s={self.connect_s:.1f} "
            f"connects_per_s={self.connects_per_s:.0f} broker_rss_mb={self.broker_rss_mb:.0f}"
        )


def run_fleet(
    root: Path,
    broker: MosquittoBroker,
    public_key: Path,
    devices: int,
    window_s: float,
    transport: Transport,
    connects_per_s: int,
) -> FleetRun:
    """Run ``devices`` simulated devices; measure once all are connected."""
    name = f"fleet-{transport}-{devices}"
    credentials = root / f"{name}.json"
    admit_devices(broker, credentials, devices, f"f{transport}{devices}")
    status = root / f"{name}-status.json"
    log = open(root / f"{name}.log", "wb")  # noqa: SIM115 - closed below
    if transport is Transport.PLAIN:
        connection = [f"--port={broker.config.plain_device_port}"]
    else:
        connection = [
            f"--port={broker.config.device_port}",
            f"--ca-file={broker.config.pki.ca_file}",
        ]
    broker_cpu_before = process_cpu_s(broker_pid(broker))
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "device_agent.fleet",
            f"--devices={devices}",
            f"--credentials={credentials}",
            *connection,
            f"--connects-per-s={connects_per_s}",
            f"--public-key={public_key}",
            f"--store={root / f'{name}.sqlite3'}",
            f"--status-file={status}",
            f"--status-interval={FLEET_STATUS_INTERVAL_S}",
            "--delete-on=puback",  # as the single agent above: no backend, no stored-acks
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=REPO_ROOT,
    )

    def read_status() -> dict[str, float]:
        with contextlib.suppress(OSError, ValueError):
            data: dict[str, float] = json.loads(status.read_text())
            return data
        return {}

    try:
        deadline = time.monotonic() + 120 + devices / 100
        while read_status().get("all_connected_s") is None:
            if process.poll() is not None:
                raise SystemExit(f"the fleet exited: see {root / f'{name}.log'}")
            if time.monotonic() > deadline:
                say(f"fleet {name}: only {read_status().get('connected')} connected")
                break
            time.sleep(0.2)
        fleet_cpu_connect = process_cpu_s(process.pid)
        broker_cpu_connect = process_cpu_s(broker_pid(broker)) - broker_cpu_before
        before = read_status()
        cpu_before, started = process_cpu_s(process.pid), time.monotonic()
        time.sleep(window_s)
        after = read_status()
        elapsed = time.monotonic() - started
        cpu = process_cpu_s(process.pid) - cpu_before
        rss = rss_mb(process.pid)
        broker_rss = rss_mb(broker_pid(broker))
    finally:
        process.terminate()
        process.wait(timeout=60)
        log.close()
    all_connected, power_on = before.get("all_connected_s"), before.get("power_on_s")
    return FleetRun(
        transport=transport,
        devices=devices,
        connected=int(after.get("connected", 0)),
        publishing=int(after.get("publishing_60s", 0)),
        lateness_p99_ms=float(after.get("lateness_p99_ms", float("inf"))),
        cpu_pct=100 * cpu / elapsed,
        rss_mb=rss,
        delivered_per_s=(after.get("delivered", 0) - before.get("delivered", 0))
        / max(after.get("uptime_s", 0) - before.get("uptime_s", 0), 1e-9),
        connect_s=(
            float(all_connected) - float(power_on)
            if all_connected is not None and power_on is not None
            else float("inf")
        ),
        fleet_cpu_connect_s=fleet_cpu_connect,
        broker_cpu_connect_s=broker_cpu_connect,
        broker_rss_mb=broker_rss,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agent-window", type=float, default=60.0, help="seconds")
    parser.add_argument("--fleet-window", type=float, default=75.0, help="seconds (>= 70)")
    parser.add_argument(
        "--fleet-sizes",
        default="10000",
        help="sizes to try, in order, each plaintext and TLS (e.g. 1000,5000,10000,15000)",
    )
    parser.add_argument(
        "--connects-per-s",
        type=int,
        default=500,
        help="the fleet's power-on pace (galvani-fleet's default): a floor on the time to connect",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    sizes = [int(size) for size in args.fleet_sizes.split(",")]
    with contextlib.ExitStack() as stack:
        root = Path(tempfile.mkdtemp(prefix="galvani-bench-agent-"))
        root.chmod(0o755)  # the broker runs as an unprivileged account and must enter it
        if not args.keep:
            stack.callback(lambda: subprocess.run(["rm", "-rf", str(root)], check=False))
        else:
            say(f"work directory: {root}")
        development_pki = DevelopmentPKI.ensure(root / "pki")
        passwords = {account: new_device_password() for account in ServiceAccount}
        public_key = root / "config-public-key"
        public_key.write_text(public_key_b64(Ed25519PrivateKey.generate()))
        agents: dict[Transport, tuple[float, float]] = {}
        with contextlib.ExitStack() as agent_stack:
            broker = start_broker(root, "mosquitto-agent", passwords, development_pki, agent_stack)
            for transport in Transport:
                rss, cpu_pct = measure_agent(root, broker, public_key, args.agent_window, transport)
                agents[transport] = rss, cpu_pct
                say(
                    f"agent transport={transport} window_s={args.agent_window:.0f} "
                    f"rss_mb={rss:.1f} cpu_pct={cpu_pct:.2f}"
                )
        best: dict[Transport, FleetRun] = {}
        for size in sizes:
            runs = []
            for transport in (Transport.PLAIN, Transport.TLS):
                # A broker of its own per run: its memory and CPU are this fleet's alone.
                with contextlib.ExitStack() as fleet_stack:
                    broker = start_broker(
                        root,
                        f"mosquitto-{transport}-{size}",
                        passwords,
                        development_pki,
                        fleet_stack,
                    )
                    run = run_fleet(
                        root,
                        broker,
                        public_key,
                        size,
                        args.fleet_window,
                        transport,
                        args.connects_per_s,
                    )
                say(run.line())
                runs.append(run)
                if run.holds:
                    best[transport] = run
            if not all(run.holds for run in runs):
                break
        prefixes = {
            Transport.PLAIN: "agent",
            Transport.TLS: "agent_tls",
            Transport.MTLS: "agent_mtls",
        }
        say(
            " ".join(
                f"{prefixes[t]}_rss_mb={rss:.1f} {prefixes[t]}_cpu_pct={cpu:.2f}"
                for t, (rss, cpu) in agents.items()
            )
        )
        for transport, label in ((Transport.PLAIN, "fleet"), (Transport.TLS, "fleet_tls")):
            if transport in best:
                say(f"{label}_max_devices={best[transport].summary().removeprefix('devices=')}")
            else:
                say(f"{label}_max_devices=0 (the smallest size, {sizes[0]}, did not hold)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
