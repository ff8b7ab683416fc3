"""The simulated fleet ``make run`` starts: its devices, their credentials and the fleet process.

The devices belong to the brand ``demo``. Their passwords are shown once by provisioning, as
for real devices, and kept only in the fleet's credentials file (owner-only): that file plays
the part of each device's flash. Devices revoked since the last run stay revoked; the fleet is
topped up with new ones instead.
"""

import json
import logging
import os
import re
import sys
from pathlib import Path

from deploy.stack.ports import LOOPBACK
from deploy.stack.processes import Child, spawn, wait_until
from deploy.stack.state import Stack
from services.common.db import connect
from services.common.provisioning import provision_device
from services.common.settings import REPO_ROOT

log = logging.getLogger("galvani.run")

BRAND_ID = "demo"
BRAND_NAME = "Demo Beauty (simulated fleet)"
DEVICE_PREFIX = "sim-"
MODEL = "lumi-2"
CREDENTIALS_FILE = "credentials.json"
PUBLIC_KEY_FILE = "config-public-key"
STORE_FILE = "devices.sqlite3"
STATUS_FILE = "status.json"
READY_TIMEOUT_S = 60.0
# How often the fleet rewrites its status file (run.json's sim_fleet_status) and logs it. The
# start waits for a status naming every device connected: at the fleet's own default (10 s)
# every start would wait up to 10 s after the devices had connected.
STATUS_INTERVAL_S = 2.0
_NUMBER = re.compile(rf"^{DEVICE_PREFIX}(\d+)$")


Credential = dict[str, str | None]  # {"password": ..., "user": ...}


def user_for(number: int) -> str | None:
    """The person behind simulated device ``number``: every 20th is a second device of the
    previous one's owner, and every 7th is shared (no user)."""
    if number % 20 == 0:
        number -= 1
    if number % 7 == 0:
        return None
    return f"demo-user-{number:05d}"


def provision_fleet(database_url: str, directory: Path, count: int) -> dict[str, Credential]:
    """``count`` active simulated devices with credentials, reusing earlier runs' devices."""
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    path = directory / CREDENTIALS_FILE
    known: dict[str, Credential] = json.loads(path.read_text("utf-8")) if path.is_file() else {}
    with connect(database_url) as conn:
        conn.execute(
            "INSERT INTO brands (id, name) VALUES (%s, %s) ON CONFLICT DO NOTHING",
            [BRAND_ID, BRAND_NAME],
        )
        active = {
            row[0]
            for row in conn.execute(
                "SELECT id FROM devices WHERE brand_id = %s AND credential_hash IS NOT NULL",
                [BRAND_ID],
            )
        }
        usable = {device_id: pw for device_id, pw in known.items() if device_id in active}
        numbers = [int(m.group(1)) for d in known if (m := _NUMBER.match(d))]
        taken = {row[0] for row in conn.execute("SELECT id FROM devices")}
        next_number = max(numbers, default=0) + 1
        while len(usable) < count:
            device_id = f"{DEVICE_PREFIX}{next_number:05d}"
            next_number += 1
            if device_id in taken:
                continue
            user = user_for(next_number - 1)
            device = provision_device(
                conn, device_id=device_id, brand_id=BRAND_ID, model=MODEL, user_id=user
            )
            usable[device_id] = known[device_id] = {"password": device.password, "user": user}
        conn.commit()
    _write_private(path, json.dumps(known, indent=1, sort_keys=True) + "\n")
    chosen = dict(sorted(usable.items())[:count])
    if len(known) > len(usable):
        log.info(
            "simulated fleet: %d earlier devices are revoked and left out", len(known) - len(usable)
        )
    _write_private(directory / f"active-{CREDENTIALS_FILE}", json.dumps(chosen) + "\n")
    return chosen


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def start_fleet(
    stack: Stack,
    fleet_dir: Path,
    device_port: int,
    ca_file: Path,
    *,
    brokers: list[str] | None = None,
    mqtt_version: str = "5",
) -> None:
    """Start the fleet process (restarted like a worker if it exits) and wait until every
    device is connected, each with TLS to the device listener, verifying the broker against
    ``ca_file``. ``brokers`` (``host:port`` of a cluster's nodes) spreads the devices over the
    nodes instead, each failing over to the others."""
    options = stack.options
    status = fleet_dir / STATUS_FILE
    status.unlink(missing_ok=True)

    def start() -> Child:
        return spawn(
            "fleet",
            [
                sys.executable,
                "-m",
                "device_agent.fleet",
                f"--devices={options.sim_devices}",
                f"--credentials={fleet_dir / ('active-' + CREDENTIALS_FILE)}",
                *(
                    [f"--broker={','.join(brokers)}"]
                    if brokers
                    else [f"--host={LOOPBACK}", f"--port={device_port}"]
                ),
                f"--mqtt-version={mqtt_version}",
                f"--ca-file={ca_file}",
                f"--public-key={fleet_dir / PUBLIC_KEY_FILE}",
                f"--store={fleet_dir / STORE_FILE}",
                f"--activity={options.sim_activity}",
                f"--status-file={status}",
                f"--status-interval={STATUS_INTERVAL_S}",
            ],
            options.data_dir / "logs" / "fleet.log",
            env=dict(os.environ),
            cwd=REPO_ROOT,
        )

    child = start()
    stack.services.append(child)
    stack.restart[child.name] = start
    log.info("starting %d simulated devices", options.sim_devices)
    wait_until(
        lambda: _fleet_connected(status, options.sim_devices),
        child=child,
        timeout_s=READY_TIMEOUT_S,
        what="the simulated fleet",
    )


def _fleet_connected(status: Path, devices: int) -> bool:
    try:
        report = json.loads(status.read_text("utf-8"))
    except (OSError, ValueError):
        return False
    return bool(report.get("connected", 0) >= devices)
