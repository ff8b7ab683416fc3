"""Real servers for the suite: a TimescaleDB-enabled PostgreSQL and a Mosquitto broker.

Both are started once per test run on free loopback ports in a throwaway directory and
stopped by their pid at the end. Each test that needs the database gets a database of its
own, copied from a migrated template, so tests run in any order.
"""

import concurrent.futures
import contextlib
import itertools
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi.testclient import TestClient

from deploy.stack.mosquitto import MosquittoBroker, local_broker
from deploy.stack.nats_cluster import NatsCluster
from deploy.stack.pki import DevelopmentPKI
from deploy.stack.ports import free_port
from deploy.stack.postgres import PostgresConfig, PostgresServer, new_password, require_postgres
from deploy.stack.processes import service_user
from services.api.main import create_app
from services.api.settings import ApiSettings
from services.common.broker_auth import BrokerFiles, ServiceAccount, sync_device_credentials
from services.common.migrate import upgrade
from services.common.migrations.grants import ServiceRole
from services.common.tls import client_context
from tests.agent import AgentProcess
from tests.api import issue_keys
from tests.brokers import KINDS, BrokerUnderTest, open_broker_under_test
from tests.ingest import IngestWorkers, provision
from tests.mqtt import use_suite_ca
from tests.nats import CalloutSetup, ResponderProcess, callout_setup, running_cluster
from tests.roles import as_service, create_logins
from tests.rules import RulesWorkers

TEMPLATE_DB = "galvani_template"
TEMPLATE_COPY_ATTEMPTS = 20
_db_numbers = itertools.count(1)

# The files that keep one pytest process busiest (seconds, from `--durations=0`), longest
# first. ``make test`` hands whole files to its processes in collection order
# (``--dist loadfile --no-loadscope-reorder``), so these start first and the processes end
# together; by test count, as xdist orders by default, they came last and one process worked
# alone for minutes at the end. Only the order of the run depends on this list.
LONGEST_FILES = (
    "tests/test_cluster_faults.py",
    "tests/test_api_conformance.py",
    "tests/test_faults.py",
    "tests/test_agent_live.py",
    "tests/test_run_cluster.py",
    "tests/test_run.py",
    "tests/test_ingest_faults.py",
    "tests/test_nats_cluster.py",
    "tests/test_acceptance_brokers.py",
    "tests/test_signed_tables_live.py",
    "tests/test_flood_certificates.py",
    "tests/test_notify_dispatcher.py",
    "tests/test_jetstream_cluster.py",
    "tests/test_flood.py",
    "tests/test_rules_properties.py",
    "tests/test_silent_devices.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run :data:`LONGEST_FILES` first, in that order; every file keeps its own order."""
    rank = {path: index for index, path in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))


@pytest.fixture(scope="session")
def stack_root() -> Iterator[Path]:
    """A throwaway directory the servers (running as an unprivileged user) can enter."""
    root = Path(tempfile.mkdtemp(prefix="galvani-test-"))
    os.chmod(root, 0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres(stack_root: Path) -> Iterator[PostgresServer]:
    """A PostgreSQL cluster with TimescaleDB preloaded (required: `make test` installs it)."""
    install = require_postgres()
    if not install.has_timescaledb and not os.environ.get("GALVANI_TEST_ALLOW_PLAIN"):
        pytest.exit(
            "TimescaleDB is not installed for this PostgreSQL: run `make test` (it installs it) "
            "or set GALVANI_TEST_ALLOW_PLAIN=1 to test the plain-PostgreSQL path only",
            returncode=3,
        )
    config = PostgresConfig(
        data_dir=stack_root / "pg" / "data",
        port=free_port(),
        password=new_password(),
        run_as=service_user(),
        durable=False,
    )
    server = PostgresServer(install, config, stack_root / "postgres.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def template_url(postgres: PostgresServer) -> str:
    """A database migrated to head, used as the template of each test's database."""
    url = postgres.create_database(TEMPLATE_DB)
    upgrade(url)
    create_logins(url)
    # CREATE DATABASE ... TEMPLATE fails while anyone is connected to the template, and
    # TimescaleDB's job scheduler connects to every database with the extension. Closing the
    # template to connections (as template0 is) keeps the scheduler, and everyone else, out.
    with psycopg.connect(postgres.config.url("postgres"), autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{TEMPLATE_DB}" WITH ALLOW_CONNECTIONS false')
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
            [TEMPLATE_DB],
        )
    return url


class DatabaseSupply:
    """Copies of the template made one ahead: while a test runs, the next test's database is
    copied on a thread (a copy takes 100-140 ms, most of a short test's setup, and it waits on
    I/O that a running test leaves idle), and the last one is dropped there too. Each database
    is still used by one test only."""

    def __init__(self, postgres: PostgresServer) -> None:
        self._postgres = postgres
        self._next: concurrent.futures.Future[tuple[str, str]] | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="db-copy")
        self._drops: list[concurrent.futures.Future[None]] = []

    def _copy(self) -> tuple[str, str]:
        name = f"test_{os.getpid()}_{next(_db_numbers)}"
        return name, _copy_template(self._postgres, name)

    def take(self) -> tuple[str, str]:
        """A fresh database (its name and URL), and the next one started."""
        ready, self._next = self._next, self._executor.submit(self._copy)
        return ready.result() if ready is not None else self._copy()

    def close(self) -> None:
        if self._next is not None:
            with contextlib.suppress(psycopg.Error):
                name, _ = self._next.result()
                self.drop(name)
        self._executor.shutdown()
        for dropped in self._drops:
            dropped.result()

    def drop(self, name: str) -> None:
        """Drop ``name`` on the copying thread (terminating what is still connected to it can
        take a moment); a drop that failed fails the session's end."""
        self._drops.append(self._executor.submit(self._drop, name))

    def _drop(self, name: str) -> None:
        with psycopg.connect(self._postgres.config.url("postgres"), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def database_supply(postgres: PostgresServer, template_url: str) -> Iterator[DatabaseSupply]:
    supply = DatabaseSupply(postgres)
    yield supply
    supply.close()


@pytest.fixture
def database_url(database_supply: DatabaseSupply) -> Iterator[str]:
    """A fresh migrated database for one test, dropped afterwards."""
    name, url = database_supply.take()
    yield url
    database_supply.drop(name)


def _copy_template(postgres: PostgresServer, name: str) -> str:
    # TimescaleDB stops and restarts its per-database scheduler around CREATE DATABASE ...
    # TEMPLATE; a copy that races that restart sees the template "in use" for a moment.
    for attempt in range(TEMPLATE_COPY_ATTEMPTS):
        try:
            return postgres.create_database(name, template=TEMPLATE_DB)
        except psycopg.errors.ObjectInUse:
            if attempt == TEMPLATE_COPY_ATTEMPTS - 1:
                raise
            time.sleep(0.05 * (attempt + 1))
    raise AssertionError("unreachable")


@pytest.fixture
def ingest_database_url(database_url: str) -> str:
    """This test's database as the ingest service's role."""
    return as_service(database_url, ServiceRole.INGEST)


@pytest.fixture
def rules_database_url(database_url: str) -> str:
    """This test's database as the rules service's role."""
    return as_service(database_url, ServiceRole.RULES)


@pytest.fixture
def api_database_url(database_url: str) -> str:
    """This test's database as the API's role."""
    return as_service(database_url, ServiceRole.API)


@pytest.fixture
def maintenance_database_url(database_url: str) -> str:
    """This test's database as the maintenance service's role."""
    return as_service(database_url, ServiceRole.MAINTENANCE)


@pytest.fixture
def notify_database_url(database_url: str) -> str:
    """This test's database as the notification dispatcher's role."""
    return as_service(database_url, ServiceRole.NOTIFY)


@pytest.fixture
def empty_database_url(postgres: PostgresServer) -> Iterator[str]:
    """A database with no schema, for migration tests."""
    name = f"empty_{os.getpid()}_{next(_db_numbers)}"
    url = postgres.create_database(name)
    yield url
    with psycopg.connect(postgres.config.url("postgres"), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def db(database_url: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    """A connection to this test's database (autocommit off; the test commits)."""
    with psycopg.connect(database_url) as conn:
        yield conn


@pytest.fixture(scope="session")
def service_passwords() -> dict[ServiceAccount, str]:
    """Passwords of the backend's broker accounts for this run."""
    return {account: new_password() for account in ServiceAccount}


@pytest.fixture(scope="session")
def pki(stack_root: Path) -> DevelopmentPKI:
    """The run's certificates (deploy/stack/pki.py); every test client trusts its CA."""
    paths = DevelopmentPKI.ensure(stack_root / "pki")
    use_suite_ca(paths.ca_file, client_context(paths.ca_file))
    return paths


@pytest.fixture(scope="session")
def broker(
    stack_root: Path, service_passwords: dict[ServiceAccount, str], pki: DevelopmentPKI
) -> Iterator[MosquittoBroker]:
    """A Mosquitto broker with Galvani's generated configuration (every listener TLS) and no
    devices yet.

    Tests add devices to their own database and call ``sync_devices``; the broker's device
    file then holds exactly that test's devices.
    """
    server = local_broker(stack_root / "mosquitto", service_passwords, pki)
    server.start([])
    yield server
    server.stop()


@pytest.fixture(scope="session")
def nats_callout(
    stack_root: Path, pki: DevelopmentPKI, service_passwords: dict[ServiceAccount, str]
) -> Iterator[tuple[NatsCluster, CalloutSetup]]:
    """A 3-node NATS cluster (TLS) whose logins go to the auth callout, and what a responder
    needs to answer it (tests/nats.py); no responder runs until a test asks for ``nats_broker``."""
    setup, config = callout_setup(stack_root / "callout", pki, service_passwords)
    with running_cluster(stack_root / "nats-callout", pki, callout=config) as cluster:
        yield cluster, setup


@pytest.fixture
def nats_responder(
    nats_callout: tuple[NatsCluster, CalloutSetup], database_url: str, tmp_path: Path
) -> Iterator[ResponderProcess]:
    """An auth-callout responder deciding the callout cluster's logins from this test's
    database."""
    cluster, setup = nats_callout
    responder = ResponderProcess(cluster, setup, database_url, tmp_path / "broker-access.log")
    yield responder
    responder.stop()


@pytest.fixture
def nats_broker(
    nats_callout: tuple[NatsCluster, CalloutSetup], nats_responder: ResponderProcess
) -> NatsCluster:
    """The callout cluster with a responder deciding logins from this test's database."""
    return nats_callout[0]


@pytest.fixture(params=KINDS)
def broker_under_test(
    request: pytest.FixtureRequest,
    database_url: str,
    service_passwords: dict[ServiceAccount, str],
    pki: DevelopmentPKI,
    tmp_path: Path,
) -> Iterator[BrokerUnderTest]:
    """This test on each engine (tests/brokers.py): the session's Mosquitto, or the session's
    callout cluster with a responder on this test's database; each started on first use."""
    engine = (
        {"mosquitto": request.getfixturevalue("broker")}
        if request.param == "mosquitto"
        else {"callout": request.getfixturevalue("nats_callout")}
    )
    under_test = open_broker_under_test(
        request.param, database_url, tmp_path, service_passwords, pki.ca_file, **engine
    )
    yield under_test
    under_test.close()


@pytest.fixture
def sync_devices(broker: MosquittoBroker, database_url: str):  # type: ignore[no-untyped-def]
    """Render the broker's device credentials from this test's database and reload."""

    def sync() -> int:
        with psycopg.connect(database_url) as conn:
            return sync_device_credentials(conn, BrokerFiles(broker.config.directory))

    return sync


@pytest.fixture
def new_agent(
    request: pytest.FixtureRequest,
    database_url: str,
    broker: MosquittoBroker,
    sync_devices: Callable[[], int],
    tmp_path: Path,
) -> Callable[[str, Ed25519PrivateKey], AgentProcess]:
    """Make one new device (ids starting with a prefix) admitted to this test's broker and
    give its agent process, not started yet; every agent made is stopped after the test."""

    def make(prefix: str, key: Ed25519PrivateKey) -> AgentProcess:
        [device] = provision(database_url, 1, prefix=prefix)
        sync_devices()
        home = tmp_path / device.device_id  # its own store, key and log
        home.mkdir()
        agent = AgentProcess(home, device, broker.config.device_port, key)
        request.addfinalizer(agent.stop)
        return agent

    return make


@pytest.fixture
def ingest_workers(
    ingest_database_url: str,
    broker: MosquittoBroker,
    service_passwords: dict[ServiceAccount, str],
    tmp_path: Path,
) -> Iterator[IngestWorkers]:
    """Ingest worker processes for this test's database (as ingest's role), in a share group
    of their own."""
    workers = IngestWorkers.on_broker(ingest_database_url, broker, service_passwords, tmp_path)
    yield workers
    workers.close()


@pytest.fixture
def keys(database_url: str) -> dict[str, str]:
    """Plaintext keys by name: operator; acme's admin, viewer, support and a revoked one; and
    another brand's admin."""
    return issue_keys(database_url)


@pytest.fixture
def key_dir(tmp_path: Path) -> Path:
    """Where this test's rules workers (and API) keep the mode-table signing key."""
    return tmp_path / "secrets"


@pytest.fixture
def rules_workers(
    rules_database_url: str,
    broker: MosquittoBroker,
    service_passwords: dict[ServiceAccount, str],
    tmp_path: Path,
    key_dir: Path,
) -> Iterator[RulesWorkers]:
    """Rules worker processes for this test's database (as rules' role), in a share group of
    their own."""
    workers = RulesWorkers.on_broker(
        rules_database_url,
        broker,
        service_passwords,
        tmp_path,
        GALVANI_RULES_SIGNING_KEY_DIR=str(key_dir),
    )
    yield workers
    workers.close()


@pytest.fixture
def broker_api_settings(
    api_database_url: str,
    broker: MosquittoBroker,
    service_passwords: dict[ServiceAccount, str],
    tmp_path: Path,
    key_dir: Path,
) -> ApiSettings:
    """API settings on this test's broker with the API's own account: provisioning renders the
    broker's files, tables are published, and the signing key is the rules workers'."""
    return ApiSettings(
        database_url=api_database_url,
        mqtt_port=broker.config.service_port,
        mqtt_password=service_passwords[ServiceAccount.API],
        data_dir=tmp_path / "api",
        signing_key_dir=key_dir,
        broker_dir=broker.config.directory,
        device_mqtt_port=broker.config.device_port,
        mqtt_ca_file=broker.config.pki.ca_file,
    )


@pytest.fixture(scope="session")
def no_broker_port() -> Iterator[int]:
    """A loopback port on which every connect is refused for the whole run: bound and never
    listening, so no server can take it. For services "with no broker": their default port
    (8885) is the one ``make run``'s broker prefers, and a test of the run may hold it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        yield int(held.getsockname()[1])


@pytest.fixture
def client(api_database_url: str, tmp_path: Path, no_broker_port: int) -> Iterator[TestClient]:
    """The API (as its own role) on this test's database, with no broker."""
    settings = ApiSettings(
        database_url=api_database_url,
        mqtt_port=no_broker_port,
        mqtt_password="x",
        data_dir=tmp_path,
    )
    with TestClient(create_app(settings)) as client:
        yield client
