"""A whole Galvani stack under faults: its own servers, the backend, a simulated fleet, a ledger.

The stack runs everything as ``make run`` does, but each part on free loopback ports of its
own, so one part can be killed without touching the rest of the suite: a durable PostgreSQL
with TimescaleDB, Mosquitto with Galvani's configuration and persistence, two ingest workers,
one rules worker, and ``galvani-fleet`` with simulated devices that keep each message in
their outbox until ingest says it is stored.

The ledger is the judge. For every message a device deleted from its outbox (every seq the
device handed out that is no longer in its outbox and was not given up by the outbox's own
limits) the database must hold exactly one row, in ``telemetry_messages``, ``events`` or
``state_reports``. ``make test`` runs short faults (``tests/test_faults.py``); ``make
bench-faults`` runs the same faults longer, on a larger fleet (``bench/faults.py``).
"""

import json
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, TypeVar

import psycopg

from deploy.stack import sim_fleet
from deploy.stack.mosquitto import MosquittoBroker, local_broker
from deploy.stack.pki import DevelopmentPKI
from deploy.stack.postgres import PostgresServer, local_server, new_password
from services.common.broker_auth import (
    BrokerFiles,
    ServiceAccount,
    active_device_credentials,
    sync_device_credentials,
)
from services.common.migrate import upgrade
from services.common.migrations.grants import ServiceRole
from services.common.signing import load_or_create_key, public_key_b64
from tests.ingest import REPO_ROOT, IngestWorkers, wait_until
from tests.roles import as_service, create_logins
from tests.rules import RulesWorkers

Workers = TypeVar("Workers", IngestWorkers, RulesWorkers)

INGEST_WORKERS: Final = ("1", "2")
# How long recovery may take before the fault counts as not recovered.
RECOVERY_TIMEOUT_S: Final = 120.0
# The backlog is back to normal when it is within this many messages of its level before.
BACKLOG_SLACK: Final = 5


@dataclass(frozen=True)
class Ledger:
    """What devices handed out, deleted and what the database holds, at one moment."""

    published: int  # seqs handed out by every device's outbox
    deleted: int  # of those, no longer in an outbox (acknowledged as stored, or dropped)
    stored: int  # of the deleted, in the database
    lost: int  # deleted but not in the database (includes dropped ones: see ``dropped``)
    duplicates: int  # rows beyond one per (device, seq), across the ledgers
    miscounted: int  # devices whose seq_count is not their number of stored seqs
    miscounts: tuple[tuple[str, int, int], ...]  # (device, seq_count, stored seqs), a few
    conflicts: int  # rows in message_conflicts (a resend is the same bytes: expect none)
    dropped: int  # given up by an outbox's own limits (age, bytes) or refused by the broker
    outstanding: int  # still in an outbox


@dataclass(frozen=True)
class FaultResult:
    """One fault and what it cost."""

    fault: str
    ledger: Ledger
    recovery_s: float
    delayed: int  # the most messages held in outboxes beyond the level before the fault

    def line(self) -> str:
        """The figure line the fault suite prints."""
        ledger = self.ledger
        return (
            f"fault={self.fault} published={ledger.published} stored={ledger.stored} "
            f"lost={ledger.lost} duplicates={ledger.duplicates} recovery_s={self.recovery_s:.1f} "
            f"delayed={self.delayed} outstanding={ledger.outstanding} dropped={ledger.dropped} "
            f"miscounted={ledger.miscounted} conflicts={ledger.conflicts}"
        )


def read_outboxes(store: Path) -> tuple[dict[str, int], int, set[tuple[str, int]]]:
    """Each device's last seq handed out, the messages its outbox dropped, and the
    ``(device, seq)`` still waiting, all from one read transaction of the fleet's store."""
    with open_store_read_only(store) as conn:
        conn.execute("BEGIN")
        devices = conn.execute(
            "SELECT device_id, last_seq, dropped_telemetry + dropped_events + dropped_state"
            " FROM devices"
        ).fetchall()
        waiting = conn.execute("SELECT device_id, seq FROM outbox").fetchall()
        conn.execute("COMMIT")
    handed_out = {str(device_id): int(last_seq) for device_id, last_seq, _ in devices}
    dropped = sum(int(count) for _, _, count in devices)
    return handed_out, dropped, {(str(d), int(s)) for d, s in waiting}


def read_ledger(store: Path, database_url: str) -> Ledger:
    """The ledger now. The fleet's store is read first: whatever a device deleted before that
    read was acknowledged by ingest after its commit, so the database read after it has it."""
    handed_out, dropped, in_outbox = read_outboxes(store)
    devices = list(handed_out)
    with psycopg.connect(database_url) as conn:
        # One snapshot for every statement below: ingest commits meanwhile, and under READ
        # COMMITTED the counters could be read after a batch the rows were read before.
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        rows = _ledger_rows(conn, devices)
        counted = dict(
            conn.execute(
                "SELECT id, seq_count FROM devices WHERE id = ANY(%s)", [devices]
            ).fetchall()
        )
        row = conn.execute(
            "SELECT count(*) FROM message_conflicts WHERE device_id = ANY(%s)", [devices]
        ).fetchone()
        conflicts = int(row[0]) if row else 0
    copies = Counter((str(device_id), int(seq)) for device_id, seq in rows)
    per_device = Counter(device_id for device_id, _ in copies)
    # A message stored or counted twice shows here, though each ledger's key stops a second
    # row: seq_count is derived state, counting each new seq once.
    miscounts = [
        (device_id, int(str(counted.get(device_id) or 0)), per_device[device_id])
        for device_id in devices
        if int(str(counted.get(device_id) or 0)) != per_device[device_id]
    ]
    deleted = stored = 0
    for device_id, last_seq in handed_out.items():
        for seq in range(1, last_seq + 1):
            if (device_id, seq) in in_outbox:
                continue
            deleted += 1
            stored += (device_id, seq) in copies
    return Ledger(
        published=sum(handed_out.values()),
        deleted=deleted,
        stored=stored,
        lost=deleted - stored,
        duplicates=sum(n - 1 for n in copies.values()),
        miscounted=len(miscounts),
        miscounts=tuple(miscounts[:5]),
        conflicts=conflicts,
        dropped=dropped,
        outstanding=len(in_outbox),
    )


def stored_seqs(database_url: str, wanted: set[tuple[str, int]]) -> set[tuple[str, int]]:
    """Which of ``wanted`` the database holds."""
    devices = sorted({device_id for device_id, _ in wanted})
    with psycopg.connect(database_url) as conn:
        rows = _ledger_rows(conn, devices)
    return {(str(d), int(s)) for d, s in rows} & wanted


def _ledger_rows(
    conn: psycopg.Connection[tuple[object, ...]], devices: list[str]
) -> list[tuple[object, ...]]:
    """Every stored ``(device_id, seq)`` of ``devices``, one row per ledger row (a seq stored
    in two ledgers comes twice)."""
    return conn.execute(
        "SELECT device_id, seq FROM telemetry_messages WHERE device_id = ANY(%(d)s)"
        " UNION ALL SELECT device_id, seq FROM events WHERE device_id = ANY(%(d)s)"
        " UNION ALL SELECT device_id, seq FROM state_reports WHERE device_id = ANY(%(d)s)",
        {"d": devices},
    ).fetchall()


@contextmanager
def open_store_read_only(path: Path) -> Iterator[sqlite3.Connection]:
    """A read-only connection to the fleet's store (WAL: it never blocks the fleet)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10, isolation_level=None)
    try:
        yield conn
    finally:
        conn.close()


def outbox_backlog(store: Path) -> int:
    """Messages waiting in every outbox of the fleet: not yet stored, as far as devices know."""
    with open_store_read_only(store) as conn:
        (count,) = conn.execute("SELECT count(*) FROM outbox").fetchone()
    return int(count)


@dataclass
class FaultStack:
    """Servers, backend and fleet of one fault run, under ``root``."""

    root: Path
    devices: int
    activity: float
    seed: int = 1
    faulty_share: float = 0.2
    delete_on: str = "stored"  # the devices' outbox contract: "stored" (ack) or "puback"
    postgres: PostgresServer | None = None
    broker: MosquittoBroker | None = None
    ingest: IngestWorkers | None = None
    rules: RulesWorkers | None = None
    fleet: subprocess.Popen[bytes] | None = None
    database_url: str = ""
    results: list[FaultResult] = field(default_factory=list)
    # Every (device, seq) waiting in an outbox when a fault struck or while it lasted: each
    # must be stored in the end, however the fault treated it (nothing may wait forever for a
    # resend). Sampled through the fault, not only as it struck: a small fleet's outboxes
    # can be empty at one instant, and then the check had nothing to judge.
    held: set[tuple[str, int]] = field(default_factory=set)

    @property
    def store(self) -> Path:
        """The fleet's SQLite store: every device's outbox and seq."""
        return self.root / "fleet" / sim_fleet.STORE_FILE

    def start(self) -> None:
        """Start everything and wait until the fleet's messages are being stored."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        # Durable: a crash must lose nothing committed, as in production.
        self.postgres = local_server(self.root, durable=True)
        self.postgres.start()
        self.database_url = self.postgres.config.url()
        upgrade(self.database_url)
        create_logins(self.database_url)
        passwords = {account: new_password() for account in ServiceAccount}
        self.pki = DevelopmentPKI.ensure(self.root / "pki")
        fleet_dir = self.root / "fleet"
        key_dir = self.root / "secrets"
        (fleet_dir).mkdir(parents=True, exist_ok=True)
        (fleet_dir / sim_fleet.PUBLIC_KEY_FILE).write_text(
            public_key_b64(load_or_create_key(key_dir))
        )
        sim_fleet.provision_fleet(self.database_url, fleet_dir, self.devices)
        self.start_broker(passwords)
        self.ingest = self.workers(IngestWorkers, passwords[ServiceAccount.INGEST])
        for worker in INGEST_WORKERS:
            self.ingest.start(worker)
        self.rules = self.workers(
            RulesWorkers,
            passwords[ServiceAccount.RULES],
            GALVANI_RULES_SIGNING_KEY_DIR=str(key_dir),
            GALVANI_RULES_SWEEP_INTERVAL_S="2",
            GALVANI_RULES_REPUBLISH_GRACE_S="5",
        )
        self.rules.start()
        self.fleet = self._start_fleet(fleet_dir)
        wait_until(lambda: self.stored_messages() > self.devices, 90, "the fleet's messages")

    def start_broker(self, passwords: dict[ServiceAccount, str]) -> None:
        """Mosquitto with Galvani's configuration, the fleet's devices admitted."""
        self.broker = local_broker(self.root / "mosquitto", passwords, self.pki)
        self.broker.start([])
        with psycopg.connect(self.database_url) as conn:
            sync_device_credentials(conn, BrokerFiles(self.broker.config.directory))

    def workers(self, kind: type[Workers], password: str, **env: str) -> Workers:
        """The ingest or rules workers of group ``kind.service`` on Mosquitto's service
        listener, as the service's own database role and broker account."""
        assert self.broker is not None
        return kind(
            database_url=as_service(self.database_url, ServiceRole(f"galvani_{kind.service}")),
            mqtt_port=self.broker.config.service_port,
            password=password,
            log_dir=self.root,
            ca_file=self.pki.ca_file,
            group=kind.service,
            env_overrides=env,
        )

    def broker_arguments(self) -> list[str]:
        """Where the fleet's devices connect: Mosquitto's device listener."""
        assert self.broker is not None
        return [f"--port={self.broker.config.device_port}"]

    def _start_fleet(self, fleet_dir: Path) -> subprocess.Popen[bytes]:
        log = open(self.root / "fleet.log", "ab")  # noqa: SIM115 - the child holds it
        try:
            return subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "device_agent.fleet",
                    f"--devices={self.devices}",
                    f"--credentials={fleet_dir / ('active-' + sim_fleet.CREDENTIALS_FILE)}",
                    *self.broker_arguments(),
                    f"--ca-file={self.pki.ca_file}",
                    f"--public-key={fleet_dir / sim_fleet.PUBLIC_KEY_FILE}",
                    f"--store={self.store}",
                    f"--activity={self.activity}",
                    f"--seed={self.seed}",
                    f"--faulty-share={self.faulty_share}",
                    f"--delete-on={self.delete_on}",
                    f"--status-file={fleet_dir / sim_fleet.STATUS_FILE}",
                    "--status-interval=1",
                ],
                cwd=REPO_ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        finally:
            log.close()

    def stored_messages(self) -> int:
        """Telemetry messages in the database (0 while it is down)."""
        try:
            with psycopg.connect(self.database_url, connect_timeout=2) as conn:
                row = conn.execute("SELECT count(*) FROM telemetry_messages").fetchone()
        except psycopg.OperationalError:
            return 0
        return int(row[0]) if row else 0

    def run_fault(
        self,
        fault: str,
        inject: Callable[[], None],
        settle_s: float,
        *,
        prepare: Callable[[], None] | None = None,
        label: str = "",
    ) -> FaultResult:
        """Let the fleet run ``settle_s``, ``prepare`` the scene (not timed), inject the fault
        (which also restarts what it broke), measure recovery from the injection, check the
        ledger, and return what it cost."""
        time.sleep(settle_s)
        before = outbox_backlog(self.store)
        if prepare is not None:
            prepare()
        started = time.monotonic()
        waiting = read_outboxes(self.store)[2]
        self.held |= waiting
        peak = len(waiting)
        # The backlog is highest while the part is down, not once it is back (a restarted
        # database drains hundreds of messages in a second): sampled while the fault lasts,
        # and what waits then is held too.
        with ThreadPoolExecutor(1) as pool:
            injected = pool.submit(inject)
            while not injected.done():
                waiting = read_outboxes(self.store)[2]
                self.held |= waiting
                peak = max(peak, len(waiting))
                time.sleep(0.2)
            injected.result()
        # Recovered when the outboxes are back to their level before the fault, and the
        # database has stored something since the restart (a quiet fleet's backlog may never
        # have grown at all).
        stored_at_restart = self.stored_messages()
        deadline = started + RECOVERY_TIMEOUT_S
        while True:
            backlog = outbox_backlog(self.store)
            peak = max(peak, backlog)
            if backlog <= before + BACKLOG_SLACK and self.stored_messages() > stored_at_restart:
                break
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{fault}: not recovered in {RECOVERY_TIMEOUT_S} s "
                    f"(backlog {backlog}, before {before})"
                )
            time.sleep(0.2)
        recovery_s = time.monotonic() - started
        time.sleep(settle_s)
        result = FaultResult(
            fault, read_ledger(self.store, self.database_url), recovery_s, peak - before
        )
        self.results.append(result)
        print(label + result.line(), flush=True)
        return result

    # -- the faults -------------------------------------------------------------------------

    def kill_broker(self, down_s: float) -> None:
        """kill -9 Mosquitto, and start it again on the same ports and persistence file."""
        broker = self.broker
        assert broker is not None
        _take_down(broker, signal.SIGKILL, down_s)
        with psycopg.connect(self.database_url) as conn:
            broker.start(list(active_device_credentials(conn)))

    def kill_ingest(self, down_s: float, worker: str = "1") -> None:
        """kill -9 one ingest worker (the other keeps going) and start it again."""
        assert self.ingest is not None
        self.ingest.kill(worker)
        time.sleep(down_s)
        self.ingest.start(worker)

    def stop_ingest_until_published(self, messages: int) -> None:
        """Stop every ingest worker (their sessions stay, so the broker queues for them) and
        wait until the fleet has published ``messages`` more."""
        assert self.ingest is not None
        for worker in INGEST_WORKERS:
            self.ingest.stop(worker)
        published = read_ledger(self.store, self.database_url).published
        wait_until(
            lambda: read_ledger(self.store, self.database_url).published >= published + messages,
            60,
            f"{messages} messages published while ingest is stopped",
        )

    def kill_broker_then_start_ingest(self, down_s: float) -> None:
        """kill -9 the broker, start it again, then the ingest workers stopped before."""
        self.kill_broker(down_s)
        assert self.ingest is not None
        for worker in INGEST_WORKERS:
            self.ingest.start(worker)

    def kill_rules(self, down_s: float) -> None:
        """kill -9 the rules worker and start it again."""
        assert self.rules is not None
        self.rules.kill()
        time.sleep(down_s)
        self.rules.start()

    def stop_postgres(self, down_s: float) -> None:
        """Immediate shutdown of PostgreSQL (SIGQUIT: no checkpoint, crash recovery when it
        starts), ``down_s`` without a database, then start it again."""
        postgres = self.postgres
        assert postgres is not None
        _take_down(postgres, signal.SIGQUIT, down_s)
        postgres.start()

    # -- after the faults -------------------------------------------------------------------

    def unapplied_safe_pushes(self) -> list[tuple[str, int, str | None]]:
        """Each device's newest table from a rule, unless the device applied it: ``(device,
        version, answer)`` (a rejection counts as not applied)."""
        with psycopg.connect(self.database_url) as conn:
            rows = conn.execute(
                "SELECT p.device_id, p.version, p.answer_status FROM config_pushes p"
                " JOIN devices d ON d.id = p.device_id"
                " WHERE p.source = 'rule' AND p.version = d.config_desired_version"
                "   AND p.answer_status IS DISTINCT FROM 'applied'"
            ).fetchall()
        return [(str(d), int(v), None if a is None else str(a)) for d, v, a in rows]

    def safe_pushes(self) -> int:
        """Tables the rules pushed."""
        with psycopg.connect(self.database_url) as conn:
            row = conn.execute(
                "SELECT count(*) FROM config_pushes WHERE source = 'rule'"
            ).fetchone()
        return int(row[0]) if row else 0

    def stop(self) -> None:
        """Stop the fleet, the backend and the servers (each by its pid)."""
        if self.fleet is not None and self.fleet.poll() is None:
            self.fleet.send_signal(signal.SIGTERM)
            try:
                self.fleet.wait(30)
            except subprocess.TimeoutExpired:
                self.fleet.kill()
                self.fleet.wait(5)
        for workers in (self.rules, self.ingest):
            if workers is not None:
                for worker in list(workers.procs):
                    workers.stop(worker)
        self.stop_broker()
        if self.postgres is not None:
            self.postgres.stop()

    def stop_broker(self) -> None:
        """Stop Mosquitto (by its pid)."""
        if self.broker is not None:
            self.broker.stop()


def fleet_status(stack: FaultStack) -> dict[str, object]:
    """The fleet's last status report."""
    path = stack.root / "fleet" / sim_fleet.STATUS_FILE
    try:
        report = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return {}
    return report if isinstance(report, dict) else {}


def _take_down(
    server: MosquittoBroker | PostgresServer, sig: signal.Signals, down_s: float
) -> None:
    """Stop ``server`` with ``sig`` and leave it down for ``down_s``; its owner starts it again."""
    assert server.child is not None
    server.child.stop(sig)
    server.child = None
    time.sleep(down_s)
