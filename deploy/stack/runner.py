"""``make run``: the whole system on this machine, data under ``.galvani/``.

Order: database (own cluster, or ``GALVANI_DATABASE_URL``), migrations, the services' login
roles, broker (device credentials rendered from the database), then every service, each
connecting as its own role (``services/common/migrations/grants.py``). ``run.json`` is
written only when all of them are ready and removed when the stack stops. The parts:
``options`` (what was asked, secrets), ``state`` (what runs, run.json), ``supervision`` (the
services), ``broker_lifecycle`` (the broker's start and restarts), ``sim_fleet`` (the
simulated fleet).
"""

import fcntl
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import psycopg

from deploy.stack import sim_fleet
from deploy.stack.broker_lifecycle import (
    QuickFailures,
    admit_devices_once_subscribed,
    broker_exited,
    restart_broker,
    start_broker,
)
from deploy.stack.errors import SetupError
from deploy.stack.options import RunOptions, Secrets
from deploy.stack.pki import DevelopmentPKI
from deploy.stack.ports import LOOPBACK, choose_port
from deploy.stack.postgres import PostgresConfig, PostgresServer, require_postgres
from deploy.stack.processes import ChildExited, service_user
from deploy.stack.state import Stack
from deploy.stack.supervision import (
    mosquitto_endpoints,
    restart_exited_services,
    start_services,
)
from services.common import api_keys
from services.common.db import connect, describe_url
from services.common.db_roles import ensure_login, service_url
from services.common.errors import DatabaseUnavailable
from services.common.migrate import upgrade
from services.common.migrations.grants import ServiceRole
from services.common.signing import load_next_key, load_or_create_key, public_key_b64

log = logging.getLogger("galvani.run")

PREFERRED_DB_PORT = 5432
SUPERVISE_POLL_S = 0.5


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


def service_database_urls(database_url: str, secrets: Secrets) -> dict[ServiceRole, str]:
    """Each service's login role, made (or given its password again) as the migration role,
    and its URL. Passwords are generated once and kept as ``secrets/db-<service>``."""
    passwords = {role: secrets.get(f"db-{role.service}") for role in ServiceRole}
    try:
        with connect(database_url) as conn:
            for role, password in passwords.items():
                ensure_login(conn, role, password)
    except psycopg.errors.InsufficientPrivilege:
        raise SetupError(
            f"the role of GALVANI_DATABASE_URL ({describe_url(database_url)}) cannot create the "
            "services' login roles: give it CREATEROLE (the services run with roles of their "
            "own, never as the migration role)"
        ) from None
    return {role: service_url(database_url, role, password) for role, password in passwords.items()}


def ensure_key(
    database_url: str,
    secrets: Secrets,
    secret: str,
    role: api_keys.Role,
    label: str,
    brand_id: str | None = None,
) -> str:
    """The API key kept as ``secret``: the stored one if still valid, else a newly issued one."""
    with connect(database_url) as conn:
        existing = secrets.read(secret)
        if existing and api_keys.key_is_active(conn, existing):
            return existing
        issued = api_keys.issue_key(conn, role=role, name=label, brand_id=brand_id)
        conn.commit()
    secrets.put(secret, issued.key)
    return issued.key


@dataclass(frozen=True)
class Prepared:
    """What every stack has before its broker starts: the database with its roles, keys, the
    simulated fleet's credentials and the development PKI."""

    database_url: str  # the migration role's (it owns the schema)
    database_urls: dict[ServiceRole, str]  # each service's own login role
    operator_key: str
    demo_admin_key: str | None
    fleet_dir: Path
    signing_key_b64: str
    pki: DevelopmentPKI

    @property
    def api_database_url(self) -> str:
        """The API's URL: where set-up writes, as the API would."""
        return self.database_urls[ServiceRole.API]

    def run_json(self, stack: Stack, api_url: str) -> dict[str, object]:
        """run.json's fields that do not depend on the broker."""
        options = stack.options
        return {
            "api_url": api_url,
            # Every listener is TLS with a certificate ca_file verifies (for the loopback names).
            "ca_file": str(self.pki.ca_file),
            # The migration role's (it owns the schema); the services' own are in database_urls.
            "database_url": self.database_url,
            "database_urls": {role.service: url for role, url in self.database_urls.items()},
            "operator_key": self.operator_key,
            "dashboard_url": f"{api_url}/dashboard/",
            "demo_admin_key": self.demo_admin_key,
            "sim_devices": options.sim_devices,
            "sim_fleet_status": str(self.fleet_dir / sim_fleet.STATUS_FILE),
            "config_public_key": self.signing_key_b64,
            "data_dir": str(options.data_dir),
            "logs": str(options.data_dir / "logs"),
        }


def prepare(stack: Stack, secrets: Secrets) -> Prepared:
    """Database (started or checked), migrations, the services' roles, the operator key, the
    simulated fleet's devices and keys, the PKI: everything before the broker."""
    options = stack.options
    database_url = start_database(stack, secrets)
    log.info("migrating %s", describe_url(database_url))
    upgrade(database_url)
    # From here on the migration role is not used: set-up writes as the API would.
    database_urls = service_database_urls(database_url, secrets)
    api_database_url = database_urls[ServiceRole.API]
    operator_key = ensure_key(
        api_database_url,
        secrets,
        "operator-key",
        api_keys.Role.OPERATOR,
        "make run operator",
    )
    fleet_dir = options.data_dir / "fleet"
    signing_key = load_or_create_key(secrets.directory)
    demo_admin_key: str | None = None
    if options.sim_devices:
        (fleet_dir / sim_fleet.PUBLIC_KEY_FILE).parent.mkdir(parents=True, exist_ok=True)
        # The keys the simulated devices trust, one a line: the current one and, while a
        # rotation is under way, the next (docs/protocol.md, "Signing keys").
        trusted = [signing_key, *filter(None, [load_next_key(secrets.directory)])]
        (fleet_dir / sim_fleet.PUBLIC_KEY_FILE).write_text(
            "".join(f"{public_key_b64(key)}\n" for key in trusted)
        )
        sim_fleet.provision_fleet(api_database_url, fleet_dir, options.sim_devices)
        # An admin key of the simulated fleet's brand, for the dashboard.
        demo_admin_key = ensure_key(
            api_database_url,
            secrets,
            f"{sim_fleet.BRAND_ID}-admin-key",
            api_keys.Role.ADMIN,
            "make run dashboard",
            sim_fleet.BRAND_ID,
        )
    # Made once and reused (deploy/stack/pki.py): the CA every client trusts, the broker's and
    # API's certificate, and the device CA.
    pki = DevelopmentPKI.ensure(options.data_dir / "pki")
    return Prepared(
        database_url=database_url,
        database_urls=database_urls,
        operator_key=operator_key,
        demo_admin_key=demo_admin_key,
        fleet_dir=fleet_dir,
        signing_key_b64=public_key_b64(signing_key),
        pki=pki,
    )


def run(options: RunOptions, stop: threading.Event) -> None:
    """Start everything, write run.json, and block until ``stop`` or a child exits."""
    with exclusive(options.data_dir):
        stack = Stack(options)
        secrets = Secrets(options.data_dir / "secrets")
        try:
            prepared = prepare(stack, secrets)
            pki = prepared.pki
            broker = start_broker(stack, secrets, pki)
            api_url = start_services(
                stack,
                prepared.database_urls,
                mosquitto_endpoints(broker),
                secrets,
                tls_cert=(pki.server_cert, pki.server_key),
            )
            if not admit_devices_once_subscribed(stack, prepared.api_database_url, stop):
                return
            if options.sim_devices:
                sim_fleet.start_fleet(stack, prepared.fleet_dir, broker.device_port, pki.ca_file)
            plaintext = (
                {}
                if broker.plain_device_port is None
                else {"mqtt_plain_port": broker.plain_device_port}
            )
            stack.write_run_json(
                {
                    **prepared.run_json(stack, api_url),
                    "mqtt_host": LOOPBACK,
                    # Devices use mqtt_port (password) or mqtt_cert_port (a certificate from
                    # the device CA), services mqtt_service_port.
                    "mqtt_port": broker.device_port,
                    "mqtt_cert_port": broker.cert_port,
                    "mqtt_service_port": broker.service_port,
                    **plaintext,
                    "metrics": stack.metrics,
                    "pids": stack.pids(),
                }
            )
            print_ready(stack.info, stack.run_json)
            supervise(stack, prepared.api_database_url, stop)
        finally:
            stack.stop()


def supervise(stack: Stack, database_url: str, stop: threading.Event) -> None:
    """Restart exited services and a dead broker until ``stop``; PostgreSQL exiting ends it.

    ``database_url`` (the API's) is where the broker's device credentials are read from.
    """
    broker_failures = QuickFailures("Mosquitto")
    while not stop.wait(SUPERVISE_POLL_S):
        restart_exited_services(stack)
        if broker_exited(stack) is not None:
            restart_broker(stack, database_url, stop, broker_failures)
        check_postgres(stack)


def check_postgres(stack: Stack) -> None:
    """Raise ChildExited, with its log's end, when the stack's own PostgreSQL has exited: the
    stack ends with it (nothing restarts a database under its services)."""
    postgres = stack.postgres.child if stack.postgres else None
    if postgres is not None and not postgres.alive():
        raise ChildExited(
            f"{postgres.name} exited unexpectedly; its log ({postgres.log_path}) ends with:\n"
            f"{postgres.log_tail()}"
        )


def print_ready(info: dict[str, object], run_json: Path) -> None:
    """Tell the user where to look."""
    lines = [
        "",
        "Galvani is running.",
        f"  API          {info['api_url']}  (docs: {info['api_url']}/docs)",
        f"  dashboard    {info['dashboard_url']}"
        + ("  (sign in with run.json's demo_admin_key)" if info["demo_admin_key"] else ""),
        *_broker_lines(info),
        *(
            [f"  MQTT         {info['mqtt_host']}:{info['mqtt_plain_port']} (devices, plaintext)"]
            if "mqtt_plain_port" in info
            else []
        ),
        f"  database     {describe_url(str(info['database_url']))}",
        f"  logs         {info['logs']}",
        f"  run.json     {run_json}  (operator key inside)",
        "Press Ctrl-C to stop.",
        "",
    ]
    print("\n".join(lines), flush=True)


def run_main(run_stack: Callable[[RunOptions, threading.Event], None], env: dict[str, str]) -> int:
    """Run ``run_stack`` with the options ``env`` asks for until Ctrl-C or SIGTERM; return the
    exit status (2: the set-up was refused, 1: a part exited)."""
    logging.basicConfig(level=logging.INFO, format="galvani: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    started = time.monotonic()
    try:
        run_stack(RunOptions.from_env(env), stop)
    except SetupError as exc:
        print(f"galvani: {exc}", file=sys.stderr)
        return 2
    except ChildExited as exc:
        print(f"galvani: {exc}", file=sys.stderr)
        return 1
    log.info("stopped after %.0f s", time.monotonic() - started)
    return 0


def _broker_lines(info: dict[str, object]) -> list[str]:
    """Where devices connect: Mosquitto's listeners, or every node of a cluster."""
    broker = info.get("broker")
    if isinstance(broker, dict):
        return [
            f"  MQTT 3.1.1   {info['mqtt_host']}:{node['mqtt']} (devices, TLS; node {node['name']},"
            f" NATS {node['nats']}, monitoring {node['http']})"
            for node in broker["nodes"]
        ] + [f"  CA           {info['ca_file']}"]
    return [
        f"  MQTT         {info['mqtt_host']}:{info['mqtt_port']} (devices, TLS; CA"
        f" {info['ca_file']}), {info['mqtt_cert_port']} (device certificates)"
    ]


def main() -> int:
    """Entry point for ``make run``; returns the exit status."""
    return run_main(run, dict(os.environ))
