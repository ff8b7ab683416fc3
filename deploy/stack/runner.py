"""``make run``: the whole system on this machine, data under ``.galvani/``.

Order: database (own cluster, or ``GALVANI_DATABASE_URL``), migrations, broker (device
credentials rendered from the database), then every service. ``run.json`` is written only
when all of them are ready and removed when the stack stops.
"""

import fcntl
import functools
import json
import logging
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from deploy.stack import sim_fleet
from deploy.stack.errors import SetupError
from deploy.stack.mosquitto import BrokerConfig, MosquittoBroker, find_mosquitto
from deploy.stack.ports import LOOPBACK, choose_port, free_port
from deploy.stack.postgres import (
    PostgresConfig,
    PostgresServer,
    new_password,
    require_postgres,
)
from deploy.stack.processes import Child, ChildExited, service_user, spawn, wait_until
from services.common import api_keys
from services.common.broker_auth import ServiceAccount, sync_device_credentials
from services.common.db import connect, describe_url
from services.common.errors import DatabaseUnavailable
from services.common.migrate import upgrade
from services.common.settings import REPO_ROOT
from services.common.signing import load_or_create_key, public_key_b64

log = logging.getLogger("galvani.run")

DEFAULT_SIM_DEVICES = 50
# A live demo: sessions 50 times as often as real people start them, so the first ones come
# within minutes (each device's own limits still cap it at its mode table's daily count).
DEFAULT_SIM_ACTIVITY = 50.0
FLEET_READY_TIMEOUT_S = 60.0
DEFAULT_INGEST_WORKERS = 2
# A worker that dies is restarted under the same client id (the broker keeps dealing its
# share of messages to its session), but not in a tight loop.
RESTART_DELAY_S = 1.0
# A broker that exits within MIN_UPTIME_S of its start failed to start; after
# MAX_QUICK_FAILURES of those in a row the stack stops instead of restarting it forever (as the
# API's server supervisor does).
MIN_UPTIME_S = 10.0
MAX_QUICK_FAILURES = 3
# After the broker dies, each worker's connected gauge must read 0 before the broker starts
# again; otherwise a gauge the worker has not yet updated would pass for a new subscription.
DISCONNECT_SEEN_TIMEOUT_S = 10.0
SUBSCRIBED_POLL_S = 0.1
PREFERRED_MQTT_PORT = 1883
PREFERRED_SERVICE_MQTT_PORT = 1884
PREFERRED_DB_PORT = 5432
PREFERRED_API_PORT = 8000
SERVICE_READY_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class RunOptions:
    """What the user asked for, from the environment."""

    data_dir: Path
    sim_devices: int
    sim_activity: float
    ingest_workers: int
    api_port: int | None
    mqtt_port: int | None
    database_url: str | None

    @classmethod
    def from_env(cls, env: dict[str, str]) -> "RunOptions":
        """Read ``GALVANI_*`` variables, refusing malformed values with a clear message."""
        return cls(
            data_dir=Path(env.get("GALVANI_DATA_DIR", str(REPO_ROOT / ".galvani"))).resolve(),
            sim_devices=_int_env(env, "GALVANI_SIM_DEVICES", DEFAULT_SIM_DEVICES),
            sim_activity=_float_env(env, "GALVANI_SIM_ACTIVITY", DEFAULT_SIM_ACTIVITY),
            ingest_workers=max(1, _int_env(env, "GALVANI_INGEST_WORKERS", DEFAULT_INGEST_WORKERS)),
            api_port=_port_env(env, "GALVANI_API_PORT"),
            mqtt_port=_port_env(env, "GALVANI_MQTT_PORT"),
            database_url=env.get("GALVANI_DATABASE_URL") or None,
        )


def _int_env(env: dict[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SetupError(f"{name}={raw!r} is not a whole number") from None
    if value < 0:
        raise SetupError(f"{name}={raw!r} must be 0 or more")
    return value


def _float_env(env: dict[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SetupError(f"{name}={raw!r} is not a number") from None
    if not value > 0:
        raise SetupError(f"{name}={raw!r} must be positive")
    return value


def _port_env(env: dict[str, str], name: str) -> int | None:
    if not env.get(name):
        return None
    port = _int_env(env, name, 0)
    if not 1 <= port <= 65535:
        raise SetupError(f"{name}={port} is not a TCP port (1-65535)")
    return port


class Secrets:
    """Generated secrets kept under ``.galvani/secrets`` (owner-only), reused across runs."""

    def __init__(self, directory: Path):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o700)

    def get(self, name: str) -> str:
        """The secret ``name``, created on first use."""
        path = self.directory / name
        if path.is_file():
            return path.read_text().strip()
        value = new_password()
        self.put(name, value)
        return value

    def put(self, name: str, value: str) -> None:
        """Store ``value`` as ``name``."""
        path = self.directory / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(value + "\n")

    def read(self, name: str) -> str | None:
        """The secret ``name`` if it exists."""
        path = self.directory / name
        return path.read_text().strip() if path.is_file() else None


@dataclass
class Stack:
    """Everything ``make run`` started, stopped in reverse order."""

    options: RunOptions
    postgres: PostgresServer | None = None
    broker: MosquittoBroker | None = None
    services: list[Child] = field(default_factory=list)
    # Services restarted when they exit, by name: how to start each again.
    restart: dict[str, Callable[[], Child]] = field(default_factory=dict)
    metrics: dict[str, str] = field(default_factory=dict)
    # The broker's consumers (ingest and rules workers) by child name: their service, which
    # names the gauge (galvani_<service>_connected) that says they are subscribed.
    consumers: dict[str, str] = field(default_factory=dict)
    # What run.json says, once written; rewritten when a restart changes a pid.
    info: dict[str, object] = field(default_factory=dict)

    @property
    def run_json(self) -> Path:
        """Where the start-up contract file goes."""
        return self.options.data_dir / "run.json"

    def stop(self) -> None:
        """Stop services, then the broker, then the database; remove run.json."""
        self.run_json.unlink(missing_ok=True)
        if self.services or self.broker or self.postgres:
            log.info("stopping")
        for child in reversed(self.services):
            child.stop()
        self.services.clear()
        if self.broker is not None:
            self.broker.stop()
        if self.postgres is not None:
            self.postgres.stop()


@contextmanager
def exclusive(data_dir: Path) -> Iterator[None]:
    """Refuse a second ``make run`` on the same data directory."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / "run.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SetupError(
                f"another `make run` is already using {data_dir}: stop it first (Ctrl-C)"
            ) from None
        yield


def start_database(stack: Stack, secrets: Secrets) -> str:
    """Start the bundled PostgreSQL, or check the external one; return its URL."""
    options = stack.options
    if options.database_url:
        try:
            connect(options.database_url).close()
        except DatabaseUnavailable as exc:
            raise SetupError(
                f"GALVANI_DATABASE_URL ({describe_url(options.database_url)}) is unreachable: "
                f"{exc}; fix the URL or unset it to use the bundled database"
            ) from None
        return options.database_url
    install = require_postgres()
    port = choose_port(
        PREFERRED_DB_PORT, required=None, what="PostgreSQL", env_var="GALVANI_DB_PORT"
    )
    config = PostgresConfig(
        data_dir=options.data_dir / "pg" / "data",
        port=port,
        password=secrets.get("postgres-password"),
        run_as=service_user(),
    )
    server = PostgresServer(install, config, options.data_dir / "logs" / "postgres.log")
    stack.postgres = server
    log.info(
        "starting PostgreSQL (%s%s) on port %d",
        install.source,
        ", TimescaleDB" if server.timescaledb else ", no TimescaleDB",
        port,
    )
    server.start()
    return config.url()


def ensure_operator_key(database_url: str, secrets: Secrets) -> str:
    """The operator key: the stored one if still valid, else a newly issued one."""
    with connect(database_url) as conn:
        existing = secrets.read("operator-key")
        if existing and api_keys.key_is_active(conn, existing):
            return existing
        issued = api_keys.issue_key(
            conn, role=api_keys.Role.OPERATOR, name="make run operator", brand_id=None
        )
        conn.commit()
    secrets.put("operator-key", issued.key)
    return issued.key


def ensure_brand_admin_key(database_url: str, secrets: Secrets, brand_id: str) -> str:
    """An admin key of ``brand_id`` (the simulated fleet's), for the dashboard."""
    name = f"{brand_id}-admin-key"
    with connect(database_url) as conn:
        existing = secrets.read(name)
        if existing and api_keys.key_is_active(conn, existing):
            return existing
        issued = api_keys.issue_key(
            conn, role=api_keys.Role.ADMIN, name="make run dashboard", brand_id=brand_id
        )
        conn.commit()
    secrets.put(name, issued.key)
    return issued.key


def start_broker(stack: Stack, database_url: str, secrets: Secrets) -> tuple[int, int]:
    """Start Mosquitto with credentials from the database; return (device, service) ports."""
    find_mosquitto()
    device_port = choose_port(
        PREFERRED_MQTT_PORT,
        required=stack.options.mqtt_port,
        what="MQTT",
        env_var="GALVANI_MQTT_PORT",
    )
    service_port = choose_port(
        PREFERRED_SERVICE_MQTT_PORT, required=None, what="MQTT (services)", env_var=""
    )
    while service_port == device_port:
        service_port = free_port()
    passwords = {account: secrets.get(f"mqtt-{account}") for account in ServiceAccount}
    broker = MosquittoBroker(
        BrokerConfig(
            directory=stack.options.data_dir / "mosquitto",
            device_port=device_port,
            service_port=service_port,
            run_as=service_user(),
        ),
        passwords,
    )
    stack.broker = broker
    log.info("starting Mosquitto on port %d (devices) and %d (services)", device_port, service_port)
    # Devices are admitted only once ingest and rules have subscribed (admit_devices):
    # Mosquitto 2.0 restores plain subscriptions from its persistence file but not shared
    # ones, so a device publishing between a broker restart and the workers' resubscription
    # would have its messages acknowledged and dropped (docs/architecture.md, "Broker
    # restarts").
    broker.start([])
    return device_port, service_port


def admit_devices(stack: Stack, database_url: str) -> None:
    """Render the device credentials from the database so devices may connect."""
    assert stack.broker is not None
    with connect(database_url) as conn:
        admitted = sync_device_credentials(conn, stack.broker.files)
    log.info("admitting %d devices", admitted)


def admit_devices_once_subscribed(stack: Stack, database_url: str, stop: threading.Event) -> bool:
    """Wait until every ingest and rules worker reports it is subscribed, then admit devices.

    The second half of the broker's start-up, at ``make run``'s start and after a restart: the
    broker was started with no device logins (see :func:`start_broker`). A worker that exits
    meanwhile is restarted; the broker exiting raises :class:`BrokerExited`. Returns False,
    admitting no one, when ``stop`` is set first.
    """
    waiting = dict(stack.consumers)
    log.info("devices wait until %s have subscribed", ", ".join(waiting))
    reported = time.monotonic()
    while True:
        for name, service in list(waiting.items()):
            if _worker_connected(stack.metrics[name], service):
                log.info("%s is subscribed", name)
                del waiting[name]
        if not waiting:
            break
        _check_broker(stack)
        _restart_exited_services(stack)
        if time.monotonic() - reported > SERVICE_READY_TIMEOUT_S:
            reported = time.monotonic()
            log.warning(
                "%s not subscribed yet; devices are kept out until they are (see their logs)",
                ", ".join(waiting),
            )
        if stop.wait(SUBSCRIBED_POLL_S):
            return False
    admit_devices(stack, database_url)
    return True


class BrokerExited(ChildExited):
    """Mosquitto exited while the stack was waiting on it."""


def _check_broker(stack: Stack) -> None:
    broker = stack.broker
    if broker is not None and broker.child is not None and not broker.child.alive():
        raise BrokerExited(f"Mosquitto exited (status {broker.child.process.returncode})")


@dataclass
class QuickFailures:
    """Exits soon after a start, in a row; a child that keeps failing is not started forever."""

    what: str
    count: int = 0

    def record(self, lived_s: float, log_tail: str) -> None:
        """Count an exit after ``lived_s``; raise :class:`ChildExited` when too many in a row."""
        self.count = self.count + 1 if lived_s < MIN_UPTIME_S else 0
        if self.count >= MAX_QUICK_FAILURES:
            raise ChildExited(
                f"{self.what} exited {self.count} times in a row within {MIN_UPTIME_S:.0f} s of"
                f" starting: not restarting it; its log ends with:\n{log_tail}"
            )


def restart_broker(
    stack: Stack, database_url: str, stop: threading.Event, failures: QuickFailures
) -> None:
    """Start Mosquitto again after it exited, on the same ports and persistence directory.

    The same procedure as at start-up: no device logins until every ingest and rules worker
    has subscribed again. Mosquitto 2.0 restores sessions from its persistence file but not
    their shared subscriptions (docs/architecture.md, "Broker restarts"), so a device admitted
    earlier would publish to no subscriber. An API provisioning call inside this window renders
    every device at once; those devices then get PUBACK 0x10 "no matching subscribers", keep
    their messages and send them again (protocol.md), so it costs a retry, not data.
    """
    broker = stack.broker
    assert broker is not None
    while True:
        child = broker.child
        assert child is not None
        assert broker.started_at is not None
        lived_s = time.monotonic() - broker.started_at
        failures.record(lived_s, _broker_log_tail(broker))
        log.warning(
            "Mosquitto exited (status %s) after %.1f s; restarting it with no device logins",
            child.process.poll(),
            lived_s,
        )
        broker.stop()
        _wait_consumers_disconnected(stack)
        if failures.count:
            time.sleep(RESTART_DELAY_S)
        try:
            broker.start([])
        except ChildExited as exc:
            log.warning("%s", exc)
            continue
        assert broker.child is not None
        log.info(
            "Mosquitto restarted (pid %d) on ports %d (devices) and %d (services)",
            broker.child.pid,
            broker.config.device_port,
            broker.config.service_port,
        )
        _rewrite_run_json(stack)
        try:
            admit_devices_once_subscribed(stack, database_url, stop)
        except BrokerExited:
            continue
        return


def _wait_consumers_disconnected(stack: Stack) -> None:
    """Wait (briefly) until no worker still reports the connection to the dead broker."""
    deadline = time.monotonic() + DISCONNECT_SEEN_TIMEOUT_S
    while True:
        stale = [
            name
            for name, service in stack.consumers.items()
            if _worker_connected(stack.metrics[name], service)
        ]
        if not stale:
            return
        if time.monotonic() > deadline:
            log.warning(
                "%s still report a connection to the broker that exited; going on",
                ", ".join(stale),
            )
            return
        time.sleep(SUBSCRIBED_POLL_S)


def _broker_log_tail(broker: MosquittoBroker, lines: int = 5) -> str:
    # Mosquitto writes its own log to a file (log_dest in mosquitto.conf); stdout holds only
    # what it prints before reading its configuration.
    path = broker.config.directory / "mosquitto.log"
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return f"({path})\n" + "\n".join(text.strip().splitlines()[-lines:])


def service_env(prefix: str, **values: str | int) -> dict[str, str]:
    """The process environment plus ``GALVANI_<PREFIX>_<KEY>`` settings."""
    env = dict(os.environ)
    env.update({f"GALVANI_{prefix}_{key.upper()}": str(value) for key, value in values.items()})
    return env


def start_services(stack: Stack, database_url: str, service_port: int, secrets: Secrets) -> str:
    """Start the API and the maintenance loop; return the API's URL once it is ready."""
    options = stack.options
    logs = options.data_dir / "logs"
    api_port = choose_port(
        PREFERRED_API_PORT, required=options.api_port, what="API", env_var="GALVANI_API_PORT"
    )
    assert stack.broker is not None
    api = spawn(
        "api",
        [sys.executable, "-m", "services.api.main"],
        logs / "api.log",
        env=service_env(
            "API",
            database_url=database_url,
            mqtt_port=service_port,
            mqtt_password=secrets.get(f"mqtt-{ServiceAccount.API}"),
            data_dir=str(options.data_dir),
            port=api_port,
            device_mqtt_port=stack.broker.config.device_port,
        ),
        cwd=REPO_ROOT,
    )
    stack.services.append(api)
    maintenance_metrics_port = free_port()
    stack.metrics["maintenance"] = f"http://{LOOPBACK}:{maintenance_metrics_port}/metrics"
    stack.services.append(
        spawn(
            "maintenance",
            [sys.executable, "-m", "services.maintenance.main"],
            logs / "maintenance.log",
            # With the broker's password it also watches the broker's statistics ($SYS).
            env=service_env(
                "MAINTENANCE",
                database_url=database_url,
                mqtt_port=service_port,
                mqtt_password=secrets.get(f"mqtt-{ServiceAccount.MAINTENANCE}"),
                metrics_port=maintenance_metrics_port,
            ),
            cwd=REPO_ROOT,
        )
    )
    # Both consumers subscribe before any device is admitted (see start_broker).
    workers = [("ingest", str(n)) for n in range(1, options.ingest_workers + 1)]
    workers.append(("rules", "1"))
    for service, worker in workers:
        start_worker = _worker_starter(stack, service, database_url, service_port, secrets, worker)
        child = start_worker()
        stack.services.append(child)
        stack.restart[child.name] = start_worker
        stack.consumers[child.name] = service
        wait_until(
            functools.partial(_worker_connected, stack.metrics[child.name], service),
            child=child,
            timeout_s=SERVICE_READY_TIMEOUT_S,
            what=f"{service} worker {worker}",
        )
    api_url = f"http://{LOOPBACK}:{api_port}"
    wait_until(
        lambda: _http_ok(f"{api_url}/readyz"),
        child=api,
        timeout_s=SERVICE_READY_TIMEOUT_S,
        what="the API",
    )
    return api_url


def start_fleet(stack: Stack, fleet_dir: Path, device_port: int) -> None:
    """Start the simulated fleet and wait until every device is connected."""
    options = stack.options
    status = fleet_dir / sim_fleet.STATUS_FILE
    status.unlink(missing_ok=True)

    def start() -> Child:
        return spawn(
            "fleet",
            [
                sys.executable,
                "-m",
                "device_agent.fleet",
                f"--devices={options.sim_devices}",
                f"--credentials={fleet_dir / ('active-' + sim_fleet.CREDENTIALS_FILE)}",
                f"--host={LOOPBACK}",
                f"--port={device_port}",
                f"--public-key={fleet_dir / sim_fleet.PUBLIC_KEY_FILE}",
                f"--store={fleet_dir / sim_fleet.STORE_FILE}",
                f"--activity={options.sim_activity}",
                f"--status-file={status}",
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
        timeout_s=FLEET_READY_TIMEOUT_S,
        what="the simulated fleet",
    )


def _fleet_connected(status: Path, devices: int) -> bool:
    try:
        report = json.loads(status.read_text("utf-8"))
    except (OSError, ValueError):
        return False
    return bool(report.get("connected", 0) >= devices)


def _worker_starter(
    stack: Stack, service: str, database_url: str, service_port: int, secrets: Secrets, worker: str
) -> Callable[[], Child]:
    """How to (re)start worker ``worker`` of ``service`` (ingest or rules) under one name."""
    name = f"{service}-{worker}"
    metrics_port = free_port()
    stack.metrics[name] = f"http://{LOOPBACK}:{metrics_port}/metrics"
    account = ServiceAccount.INGEST if service == "ingest" else ServiceAccount.RULES

    def start() -> Child:
        return spawn(
            name,
            [sys.executable, "-m", f"services.{service}.main"],
            stack.options.data_dir / "logs" / f"{name}.log",
            env=service_env(
                service.upper(),
                database_url=database_url,
                mqtt_port=service_port,
                mqtt_password=secrets.get(f"mqtt-{account}"),
                data_dir=str(stack.options.data_dir),
                worker_id=worker,
                metrics_port=metrics_port,
            ),
            cwd=REPO_ROOT,
        )

    return start


def _worker_connected(metrics_url: str, service: str) -> bool:
    try:
        with urllib.request.urlopen(metrics_url, timeout=2) as response:  # noqa: S310 - loopback
            return f"galvani_{service}_connected 1.0".encode() in response.read()
    except (urllib.error.URLError, OSError):
        return False


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - loopback URL
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _pids(stack: Stack) -> dict[str, int]:
    pids = {child.name: child.pid for child in stack.services}
    if stack.postgres and stack.postgres.child:
        pids["postgres"] = stack.postgres.child.pid
    if stack.broker and stack.broker.child:
        pids["mosquitto"] = stack.broker.child.pid
    return pids


def _rewrite_run_json(stack: Stack) -> None:
    """Rewrite run.json with the current pids after a restart (once it has been written)."""
    if stack.info:
        stack.info["pids"] = _pids(stack)
        write_run_json(stack, stack.info)


def write_run_json(stack: Stack, info: dict[str, object]) -> None:
    """Write run.json atomically, owner-only (it holds the operator key)."""
    tmp = stack.run_json.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(info, handle, indent=2)
        handle.write("\n")
    os.replace(tmp, stack.run_json)


def run(options: RunOptions, stop: threading.Event) -> None:
    """Start everything, write run.json, and block until ``stop`` or a child exits."""
    with exclusive(options.data_dir):
        stack = Stack(options)
        secrets = Secrets(options.data_dir / "secrets")
        try:
            database_url = start_database(stack, secrets)
            log.info("migrating %s", describe_url(database_url))
            upgrade(database_url)
            operator_key = ensure_operator_key(database_url, secrets)
            fleet_dir = options.data_dir / "fleet"
            signing_key = load_or_create_key(secrets.directory)
            if options.sim_devices:
                (fleet_dir / sim_fleet.PUBLIC_KEY_FILE).parent.mkdir(parents=True, exist_ok=True)
                (fleet_dir / sim_fleet.PUBLIC_KEY_FILE).write_text(public_key_b64(signing_key))
                sim_fleet.provision_fleet(database_url, fleet_dir, options.sim_devices)
                demo_admin_key: str | None = ensure_brand_admin_key(
                    database_url, secrets, sim_fleet.BRAND_ID
                )
            else:
                demo_admin_key = None
            device_port, service_port = start_broker(stack, database_url, secrets)
            api_url = start_services(stack, database_url, service_port, secrets)
            if not admit_devices_once_subscribed(stack, database_url, stop):
                return
            if options.sim_devices:
                start_fleet(stack, fleet_dir, device_port)
            info: dict[str, object] = {
                "api_url": api_url,
                "mqtt_host": LOOPBACK,
                "mqtt_port": device_port,
                "mqtt_service_port": service_port,
                "database_url": database_url,
                "operator_key": operator_key,
                "dashboard_url": f"{api_url}/dashboard/",
                "demo_admin_key": demo_admin_key,
                "sim_devices": options.sim_devices,
                "sim_fleet_status": str(fleet_dir / sim_fleet.STATUS_FILE),
                "config_public_key": public_key_b64(signing_key),
                "data_dir": str(options.data_dir),
                "logs": str(options.data_dir / "logs"),
                "metrics": stack.metrics,
                "pids": _pids(stack),
            }
            stack.info = info
            write_run_json(stack, info)
            print_ready(info, stack.run_json)
            _supervise(stack, database_url, stop)
        finally:
            stack.stop()


def _supervise(stack: Stack, database_url: str, stop: threading.Event) -> None:
    broker_failures = QuickFailures("Mosquitto")
    while not stop.wait(0.5):
        _restart_exited_services(stack)
        broker = stack.broker
        if broker is not None and broker.child is not None and not broker.child.alive():
            restart_broker(stack, database_url, stop, broker_failures)
        postgres = stack.postgres.child if stack.postgres else None
        if postgres is not None and not postgres.alive():
            raise ChildExited(
                f"{postgres.name} exited unexpectedly; its log ({postgres.log_path}) ends with:\n"
                f"{postgres.log_tail()}"
            )


def _restart_exited_services(stack: Stack) -> None:
    """Restart each restartable service that exited; any other exit stops the stack."""
    restarted = False
    for index, child in enumerate(stack.services):
        if child.alive():
            continue
        start = stack.restart.get(child.name)
        if start is None:
            raise ChildExited(
                f"{child.name} exited unexpectedly; its log ({child.log_path}) ends with:\n"
                f"{child.log_tail()}"
            )
        log.warning("%s exited (status %s); restarting it", child.name, child.process.returncode)
        child.stop()
        time.sleep(RESTART_DELAY_S)
        stack.services[index] = start()
        restarted = True
    if restarted:
        _rewrite_run_json(stack)


def print_ready(info: dict[str, object], run_json: Path) -> None:
    """Tell the user where to look."""
    lines = [
        "",
        "Galvani is running.",
        f"  API          {info['api_url']}  (docs: {info['api_url']}/docs)",
        f"  dashboard    {info['dashboard_url']}"
        + ("  (sign in with run.json's demo_admin_key)" if info["demo_admin_key"] else ""),
        f"  MQTT         {info['mqtt_host']}:{info['mqtt_port']} (devices)",
        f"  database     {describe_url(str(info['database_url']))}",
        f"  logs         {info['logs']}",
        f"  run.json     {run_json}  (operator key inside)",
        "Press Ctrl-C to stop.",
        "",
    ]
    print("\n".join(lines), flush=True)


def main() -> int:
    """Entry point for ``make run``; returns the exit status."""
    logging.basicConfig(level=logging.INFO, format="galvani: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    started = time.monotonic()
    try:
        run(RunOptions.from_env(dict(os.environ)), stop)
    except SetupError as exc:
        print(f"galvani: {exc}", file=sys.stderr)
        return 2
    except ChildExited as exc:
        print(f"galvani: {exc}", file=sys.stderr)
        return 1
    log.info("stopped after %.0f s", time.monotonic() - started)
    return 0
