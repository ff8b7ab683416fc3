"""Ingest workers as real processes, devices with real credentials, and v1 payload builders."""

import itertools
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Self

import psycopg

from deploy.stack.mosquitto import MosquittoBroker
from deploy.stack.ports import free_port
from services.common.broker_auth import ServiceAccount
from services.common.protocol.topics import device_topic
from services.common.provisioning import provision_device
from services.common.tls import client_context
from tests.mqtt import MqttClient, suite_ca_file, suite_tls

REPO_ROOT = Path(__file__).resolve().parents[1]
VECTORS_DIR = REPO_ROOT / "protocol" / "vectors"
T0_MS = int(time.time() * 1000) - 3_600_000
_groups = itertools.count(1)


def wait_until(check: Callable[[], bool], timeout_s: float = 30.0, what: str = "condition") -> None:
    """Poll ``check`` until it holds, or fail the test saying what did not happen."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


def scalar(url: str, query: str, params: list[object] | None = None) -> object:
    """One value from a fresh connection (so each poll sees committed data)."""
    with psycopg.connect(url) as conn:
        row = conn.execute(query, params or []).fetchone()
        return row[0] if row else None


@dataclass
class ServiceWorkers:
    """Worker processes of one backend service (``ingest`` or ``rules``) for one test, in a
    share group of their own."""

    database_url: str
    mqtt_port: int
    password: str
    log_dir: Path
    service: str = "ingest"
    # The CA the workers verify the broker's TLS certificate against.
    ca_file: Path | None = field(default_factory=suite_ca_file)
    group: str = field(default_factory=lambda: f"t{os.getpid()}-{next(_groups)}")
    env_overrides: dict[str, str] = field(default_factory=dict)
    # "nats": the workers consume JetStream (GALVANI_BROKER=nats in env_overrides).
    broker: str = "mosquitto"
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    metrics_ports: dict[str, int] = field(default_factory=dict)

    @classmethod
    def on_broker(
        cls,
        database_url: str,
        broker: MosquittoBroker,
        passwords: dict[ServiceAccount, str],
        log_dir: Path,
        **env_overrides: str,
    ) -> Self:
        """Workers for ``database_url`` on ``broker``'s service listener, under the service's
        own broker account."""
        return cls(
            database_url=database_url,
            mqtt_port=broker.config.service_port,
            password=passwords[ServiceAccount(f"galvani-{cls.service}")],
            log_dir=log_dir,
            ca_file=broker.config.pki.ca_file,
            env_overrides=env_overrides,
        )

    @classmethod
    def on_nats(
        cls,
        database_url: str,
        nats_urls: str,
        password: str,
        log_dir: Path,
        ca_file: Path | None,
        *,
        mqtt_port: int = 0,
        **env_overrides: str,
    ) -> Self:
        """Workers for ``database_url`` consuming JetStream from the NATS servers at
        ``nats_urls`` as ``galvani-<service>`` with ``password``; ``mqtt_port`` is the MQTT
        gateway's, for what publishes over MQTT (rules' tables; ingest has nothing there)."""
        return cls(
            database_url=database_url,
            mqtt_port=mqtt_port,
            password=password,
            log_dir=log_dir,
            ca_file=ca_file,
            env_overrides={
                "GALVANI_BROKER": "nats",
                "GALVANI_NATS_URLS": nats_urls,
                **env_overrides,
            },
            broker="nats",
        )

    def client_id(self, worker: str) -> str:
        return f"galvani-{self.service}-{self.group}-{worker}"

    def start(self, worker: str = "1", *, wait: bool = True) -> subprocess.Popen[bytes]:
        """Start (or restart) worker ``worker`` and wait until it has subscribed (unless
        ``wait`` is false)."""
        port = self.metrics_ports.setdefault(worker, free_port())
        env = dict(os.environ)
        prefix = f"GALVANI_{self.service.upper()}_"
        env.update(
            {
                prefix + "DATABASE_URL": self.database_url,
                prefix + "MQTT_PORT": str(self.mqtt_port),
                prefix + "MQTT_PASSWORD": self.password,
                prefix + "WORKER_ID": f"{self.group}-{worker}",
                prefix + "SHARE_GROUP": self.group,
                prefix + "METRICS_PORT": str(port),
                prefix + "LOG_LEVEL": "INFO",
                **({prefix + "MQTT_CA_FILE": str(self.ca_file)} if self.ca_file else {}),
                **self.env_overrides,
            }
        )
        log = open(self.log_path(worker), "ab")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", f"services.{self.service}.main"],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.procs[worker] = proc
        if wait:
            wait_until(
                lambda: self.subscribed(worker), 20, f"{self.service} worker {worker} to subscribe"
            )
        return proc

    def log_text(self, worker: str = "1") -> str:
        return self.log_path(worker).read_text(errors="replace")

    def log_path(self, worker: str) -> Path:
        return self.log_dir / f"{self.service}-{self.group}-{worker}.log"

    def subscribed(self, worker: str) -> bool:
        proc = self.procs[worker]
        if proc.poll() is not None:
            raise AssertionError(f"{self.service} worker exited:\n{self.log_text(worker)[-3000:]}")
        return "subscribed to" in self.log_text(worker).rsplit(f"{self.service} worker", 1)[-1]

    def metric(self, worker: str, name: str, labels: str = "") -> float:
        """One sample of a worker's /metrics, 0 when absent."""
        url = f"http://127.0.0.1:{self.metrics_ports[worker]}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        wanted = f"{name}{{{labels}}}" if labels else name
        for line in text.splitlines():
            if line.startswith(wanted + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def kill(self, worker: str = "1") -> None:
        """SIGKILL: no flush, no DISCONNECT, nothing acknowledged that was not committed."""
        proc = self.procs[worker]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def stop(self, worker: str = "1") -> int:
        """SIGTERM and wait; returns the exit status."""
        proc = self.procs[worker]
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        return proc.returncode

    def close(self) -> None:
        """Stop every worker and make the broker forget their sessions."""
        for worker in list(self.procs):
            self.stop(worker)
            if self.broker == "nats":
                continue  # a consumer of the test's own server, which goes with it
            forget = MqttClient(
                "127.0.0.1",
                self.mqtt_port,
                f"galvani-{self.service}",
                self.password,
                client_id=self.client_id(worker),
                tls=None if self.ca_file is None else client_context(self.ca_file),
            )
            forget.connect()  # clean start, no session expiry: the old session is dropped
            forget.close()


@dataclass
class IngestWorkers(ServiceWorkers):
    """Ingest worker processes of one test."""

    service: str = "ingest"


@dataclass(frozen=True)
class Device:
    """A provisioned device and its broker password."""

    device_id: str
    password: str


def connect_device(
    port: int,
    device: Device,
    *,
    host: str = "127.0.0.1",
    will: tuple[str, bytes] | None = None,
    tls: ssl.SSLContext | Literal["suite"] | None = "suite",
) -> MqttClient:
    """Connect as ``device`` (client id = username = device id) on the device listener, with
    TLS trusting the suite's CA unless ``tls`` says otherwise (None: plaintext)."""
    return MqttClient(
        host,
        port,
        device.device_id,
        device.password,
        client_id=device.device_id,
        will=will,
        tls=suite_tls() if tls == "suite" else tls,
    ).connect()


def provision(url: str, count: int, *, prefix: str = "dev", brand: str = "acme") -> list[Device]:
    """Create ``count`` devices of one brand with real credentials."""
    with psycopg.connect(url) as conn:
        conn.execute(
            "INSERT INTO brands (id, name) VALUES (%s, %s) ON CONFLICT DO NOTHING", [brand, brand]
        )
        devices = [
            provision_device(conn, device_id=f"{prefix}-{i:04d}", brand_id=brand, model="m1")
            for i in range(count)
        ]
    return [Device(d.device_id, d.password) for d in devices]


# A device's topic, built as the backend builds it (services.common.protocol.topics).
topic = device_topic


def _spec_sample() -> dict[str, object]:
    cases = json.loads((VECTORS_DIR / "telemetry.json").read_text("utf-8"))["valid"]
    payload = next(case["payload"] for case in cases if case["name"] == "spec_example")
    return {key: value for key, value in payload["samples"][0].items() if key != "ts"}


# One 10 Hz sample during output, with gel: protocol.md's example, as the protocol vectors pin
# it, without its ``ts`` (bench/mqtt_load.py publishes the same).
SPEC_SAMPLE = _spec_sample()


def sample(ts_ms: int, **fields: object) -> dict[str, object]:
    """One 10 Hz sample during output, with gel (override any field)."""
    return {"ts": ts_ms, **SPEC_SAMPLE, **fields}


def telemetry(
    seq: int, ts_ms: int, count: int = 10, session: str | None = "s-1", **fields: object
) -> bytes:
    """A telemetry message of ``count`` samples 100 ms apart starting at ``ts_ms``."""
    samples = [sample(ts_ms + 100 * i, **fields) for i in range(count)]
    return json.dumps({"v": 1, "seq": seq, "session": session, "samples": samples}).encode()


def event(seq: int, ts_ms: int, type_: str, **fields: object) -> bytes:
    return json.dumps({"v": 1, "seq": seq, "ts": ts_ms, "type": type_, **fields}).encode()


def state(seq: int, ts_ms: int, fw: str = "1.4.2", config: object = None, **extra: object) -> bytes:
    body: dict[str, object] = {"v": 1, "seq": seq, "ts": ts_ms, "fw": fw, "hw": "B", **extra}
    if config is not None:
        body["config"] = config
    return json.dumps(body).encode()
