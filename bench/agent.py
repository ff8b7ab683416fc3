"""``make bench-agent``: what one agent costs on the device, and how many simulated devices one
fleet process keeps connected and publishing.

Part 1 runs ``galvani-agent run --simulate`` in a LIFT session (10 Hz sampling, one telemetry
message a second) against its own Mosquitto and reads the process's RSS and CPU from /proc
over a window. Targets: at most 40 MB RSS and 2 % of one core.

Part 2 runs ``galvani-fleet`` with N devices, each with its own credentials, at realistic usage,
and after all of them have connected watches a window of at least 70 s (every idle device
sends a heartbeat a minute). N "holds" when every device is connected at the end, every one
delivered at least one message in the window, and the fleet's scheduler ran its ticks on time
(p99 lateness at most 250 ms). It tries the sizes in ``--fleet-sizes`` in order and stops at
the first that does not hold. Target: 10,000.

Last lines:
``agent_rss_mb=… agent_cpu_pct=…`` and ``fleet_max_devices=… connected=… publishing=… …``
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
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench.harness import process_cpu_s, say, start_broker
from deploy.stack.mosquitto import MosquittoBroker
from services.common.broker_auth import ServiceAccount, hash_password, new_device_password
from services.common.signing import public_key_b64

REPO_ROOT: Final = Path(__file__).resolve().parents[1]
PAGE_KB: Final = os.sysconf("SC_PAGE_SIZE") // 1024
LATENESS_P99_LIMIT_MS: Final = 250.0


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


def measure_agent(
    root: Path, broker: MosquittoBroker, public_key: Path, window_s: float
) -> tuple[float, float]:
    """One agent in a session: (RSS MB at the end of the window, CPU % of one core)."""
    [(device_id, password)] = admit_devices(
        broker, root / "agent-credentials.json", 1, "agent"
    ).items()
    log = open(root / "agent.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "device_agent.cli",
            "run",
            "--simulate",
            f"--device-id={device_id}",
            f"--port={broker.config.device_port}",
            f"--public-key={public_key}",
            f"--store={root / 'agent.sqlite3'}",
            "--session=LIFT:5:900",
            # No backend behind this broker sends stored-acks: delete on PUBACK, as devices did
            # before them, so the outbox stays as small as a device's in the field.
            "--delete-on=puback",
        ],
        env={**os.environ, "GALVANI_AGENT_PASSWORD": password},
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=REPO_ROOT,
    )
    try:
        time.sleep(5)  # start-up (imports, connect) is not the steady state
        if process.poll() is not None:
            raise SystemExit(f"the agent exited: see {root / 'agent.log'}")
        cpu_before, started = process_cpu_s(process.pid), time.monotonic()
        time.sleep(window_s)
        cpu = process_cpu_s(process.pid) - cpu_before
        elapsed = time.monotonic() - started
        rss = rss_mb(process.pid)
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()
    return rss, 100 * cpu / elapsed


@dataclass
class FleetRun:
    devices: int
    connected: int
    publishing: int
    lateness_p99_ms: float
    cpu_pct: float
    rss_mb: float
    delivered_per_s: float

    @property
    def holds(self) -> bool:
        return (
            self.connected == self.devices
            and self.publishing == self.devices
            and self.lateness_p99_ms <= LATENESS_P99_LIMIT_MS
        )

    def line(self) -> str:
        return (
            f"fleet devices={self.devices} connected={self.connected} "
            f"publishing={self.publishing} lateness_p99_ms={self.lateness_p99_ms:.0f} "
            f"cpu_pct={self.cpu_pct:.0f} rss_mb={self.rss_mb:.0f} "
            f"messages_per_s={self.delivered_per_s:.0f} holds={'yes' if self.holds else 'no'}"
        )


def run_fleet(
    root: Path, broker: MosquittoBroker, public_key: Path, devices: int, window_s: float
) -> FleetRun:
    """Run ``devices`` simulated devices; measure once all are connected."""
    credentials = root / f"fleet-{devices}.json"
    admit_devices(broker, credentials, devices, f"f{devices}")
    status = root / f"fleet-{devices}-status.json"
    log = open(root / f"fleet-{devices}.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "device_agent.fleet",
            f"--devices={devices}",
            f"--credentials={credentials}",
            f"--port={broker.config.device_port}",
            f"--public-key={public_key}",
            f"--store={root / f'fleet-{devices}.sqlite3'}",
            f"--status-file={status}",
            "--status-interval=5",
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
        while read_status().get("connected", 0) < devices:
            if process.poll() is not None:
                raise SystemExit(f"the fleet exited: see {root / f'fleet-{devices}.log'}")
            if time.monotonic() > deadline:
                say(f"fleet devices={devices}: only {read_status().get('connected')} connected")
                break
            time.sleep(1)
        before = read_status()
        cpu_before, started = process_cpu_s(process.pid), time.monotonic()
        time.sleep(window_s)
        after = read_status()
        elapsed = time.monotonic() - started
        cpu = process_cpu_s(process.pid) - cpu_before
        rss = rss_mb(process.pid)
    finally:
        process.terminate()
        process.wait(timeout=60)
        log.close()
    return FleetRun(
        devices=devices,
        connected=int(after.get("connected", 0)),
        publishing=int(after.get("publishing_60s", 0)),
        lateness_p99_ms=float(after.get("lateness_p99_ms", float("inf"))),
        cpu_pct=100 * cpu / elapsed,
        rss_mb=rss,
        delivered_per_s=(after.get("delivered", 0) - before.get("delivered", 0))
        / max(after.get("uptime_s", 0) - before.get("uptime_s", 0), 1e-9),
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agent-window", type=float, default=60.0, help="seconds")
    parser.add_argument("--fleet-window", type=float, default=75.0, help="seconds (>= 70)")
    parser.add_argument(
        "--fleet-sizes", default="1000,5000,10000,15000", help="sizes to try, in order"
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
        passwords = {account: new_device_password() for account in ServiceAccount}
        broker = start_broker(root, passwords, stack)
        public_key = root / "config-public-key"
        public_key.write_text(public_key_b64(Ed25519PrivateKey.generate()))
        rss, cpu_pct = measure_agent(root, broker, public_key, args.agent_window)
        say(f"agent window_s={args.agent_window:.0f} rss_mb={rss:.1f} cpu_pct={cpu_pct:.2f}")
        best: FleetRun | None = None
        for size in sizes:
            run = run_fleet(root, broker, public_key, size, args.fleet_window)
            say(run.line())
            if not run.holds:
                break
            best = run
        say(f"agent_rss_mb={rss:.1f} agent_cpu_pct={cpu_pct:.2f}")
        if best is None:
            say(f"fleet_max_devices=0 (the smallest size, {sizes[0]}, did not hold)")
        else:
            say(
                f"fleet_max_devices={best.devices} connected={best.connected} "
                f"publishing={best.publishing} lateness_p99_ms={best.lateness_p99_ms:.0f} "
                f"cpu_pct={best.cpu_pct:.0f} rss_mb={best.rss_mb:.0f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
