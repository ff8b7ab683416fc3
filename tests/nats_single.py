"""One nats-server for a test: a single node with JetStream and the MQTT gateway, static
users in one JetStream account, TLS on the client and MQTT listeners when given.

For the client and worker tests that need a real server but not a cluster (the cluster and
its auth callout are deploy/stack/nats_cluster.py's, with helpers in tests/nats.py).
"""

import contextlib
import json
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from deploy.stack.ports import LOOPBACK, distinct_free_ports

REPO_ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0


@cache
def nats_server_binary() -> Path:
    """The nats-server the project installs (deploy/install-nats.sh prints its path last)."""
    out = subprocess.run(
        ["bash", str(REPO_ROOT / "deploy" / "install-nats.sh")],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return Path(out.strip().splitlines()[-1])


@dataclass
class SingleNats:
    """A running nats-server and its ports."""

    directory: Path
    client_port: int
    mqtt_port: int
    http_port: int
    tls: bool
    process: subprocess.Popen[bytes]

    def url(self) -> str:
        """The client URL (tls:// when the listener is TLS)."""
        return f"{'tls' if self.tls else 'nats'}://{LOOPBACK}:{self.client_port}"

    def stop(self) -> None:
        """SIGTERM and wait (SIGKILL after STOP_TIMEOUT_S)."""
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def render_config(
    directory: Path,
    ports: tuple[int, int, int],
    users: dict[str, str],
    tls: tuple[Path, Path, Path] | None,
) -> str:
    """The server's configuration: users of account GALVANI (JetStream) and a system account."""
    client_port, mqtt_port, http_port = ports
    tls_block = ""
    if tls is not None:
        cert, key, ca = tls
        tls_block = (
            f"  tls {{ cert_file: {json.dumps(str(cert))}, key_file: {json.dumps(str(key))},"
            f" ca_file: {json.dumps(str(ca))} }}\n"
        )
    user_list = ", ".join(
        f"{{user: {json.dumps(name)}, password: {json.dumps(password)}}}"
        for name, password in users.items()
    )
    return (
        f"server_name: single-{client_port}\n"
        f"listen: {LOOPBACK}:{client_port}\n"
        f"http: {LOOPBACK}:{http_port}\n"
        + (tls_block.replace("  tls", "tls", 1) if tls_block else "")
        + f"jetstream {{ store_dir: {json.dumps(str(directory / 'js'))},"
        " max_memory_store: 64MB, max_file_store: 1GB }\n"
        f"mqtt {{\n  listen: {LOOPBACK}:{mqtt_port}\n{tls_block}}}\n"
        "accounts {\n"
        f"  GALVANI {{ jetstream: enabled, users: [{user_list}] }}\n"
        '  SYS { users: [{user: "galvani-sys", password: "sys-test-password"}] }\n'
        "}\n"
        "system_account: SYS\n"
    )


def start(
    directory: Path, users: dict[str, str], *, tls: tuple[Path, Path, Path] | None = None
) -> SingleNats:
    """Start a server under ``directory`` and wait until JetStream answers its health check."""
    directory.mkdir(parents=True, exist_ok=True)
    client_port, mqtt_port, http_port = distinct_free_ports(3)
    config = directory / "nats.conf"
    config.write_text(render_config(directory, (client_port, mqtt_port, http_port), users, tls))
    log = (directory / "nats.log").open("ab")
    process = subprocess.Popen(
        [str(nats_server_binary()), "-c", str(config)], stdout=log, stderr=subprocess.STDOUT
    )
    log.close()
    server = SingleNats(directory, client_port, mqtt_port, http_port, tls is not None, process)
    deadline = time.monotonic() + START_TIMEOUT_S
    health = f"http://{LOOPBACK}:{http_port}/healthz?js-enabled-only=true"
    while True:
        if process.poll() is not None:
            raise RuntimeError(
                f"nats-server exited with {process.returncode}: "
                + (directory / "nats.log").read_text()[-2000:]
            )
        try:
            with urllib.request.urlopen(health, timeout=1.0) as answer:
                if answer.status == 200:
                    return server
        except OSError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"nats-server not healthy within {START_TIMEOUT_S:g} s")
        time.sleep(0.05)


@contextlib.contextmanager
def single_nats(
    directory: Path, users: dict[str, str], *, tls: tuple[Path, Path, Path] | None = None
) -> Iterator[SingleNats]:
    """A started server (see :func:`start`), stopped afterwards."""
    server = start(directory, users, tls=tls)
    try:
        yield server
    finally:
        server.stop()
