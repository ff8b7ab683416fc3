"""The agent's SQLite database: opening it, its schema, and one device's rows in it.

One database may hold many devices (the fleet simulator runs thousands in one process), so
every table is keyed by ``device_id``; a :class:`DeviceRows` is one device's view of a shared
connection, and the store's parts (:mod:`device_agent.outbox`, :mod:`device_agent.store`)
build on it.
"""

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY,
    last_seq INTEGER NOT NULL DEFAULT 0,
    backlog_messages INTEGER NOT NULL DEFAULT 0,
    backlog_bytes INTEGER NOT NULL DEFAULT 0,
    dropped_telemetry INTEGER NOT NULL DEFAULT 0,
    dropped_events INTEGER NOT NULL DEFAULT 0,
    dropped_state INTEGER NOT NULL DEFAULT 0,
    dropped_first_seq INTEGER,
    dropped_last_seq INTEGER
);
-- AUTOINCREMENT: SQLite then never reuses an id, even once the outbox has been emptied.
-- Without it a new row takes max(id) + 1, and the link, which asks for ids after the last one
-- it handed to paho, would not see it.
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    channel TEXT NOT NULL CHECK (channel IN ('telemetry', 'events', 'state')),
    payload BLOB NOT NULL,
    size INTEGER NOT NULL,  -- len(payload): the drop paths read it instead of the payload
    enqueued_ms INTEGER NOT NULL,
    UNIQUE (device_id, seq)
);
CREATE INDEX IF NOT EXISTS outbox_by_device ON outbox (device_id, id);
CREATE INDEX IF NOT EXISTS outbox_by_channel ON outbox (device_id, channel, id);
CREATE INDEX IF NOT EXISTS outbox_by_age ON outbox (device_id, enqueued_ms);
CREATE TABLE IF NOT EXISTS kv (
    device_id TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (device_id, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sessions (
    device_id TEXT NOT NULL,
    session_id TEXT NOT NULL,
    mode TEXT NOT NULL,
    started_ms INTEGER NOT NULL,
    ended_ms INTEGER,
    output_s REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (device_id, session_id)
);
CREATE INDEX IF NOT EXISTS sessions_by_start ON sessions (device_id, started_ms);
"""


def open_database(path: str | os.PathLike[str], *, durable: bool = True) -> sqlite3.Connection:
    """Open (creating if needed) the store database, in WAL mode with its schema.

    ``durable`` (a real device) syncs every commit to flash; the fleet simulator, whose
    "devices" share one server disk, passes False and syncs at checkpoints only.
    """
    # isolation_level=None: the sqlite3 module opens no transactions of its own; DeviceStore
    # says BEGIN and COMMIT itself, so a transaction is exactly what it means one to be.
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        # WAL: a commit appends to the log instead of rewriting pages, and readers never block
        # the writer. synchronous=FULL syncs the log at every commit, so a brownout cannot
        # lose a commit whose message may already be at the broker: its seq would be handed
        # out again and the backend would discard the new message as a duplicate.
        # synchronous=NORMAL syncs at checkpoints only: it survives the process crashing, not
        # the power failing. synchronous is per connection, so it is set on every open.
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")
        _create_schema(conn, path)
    except BaseException:
        conn.close()
        raise
    return conn


def total_backlog(conn: sqlite3.Connection) -> tuple[int, int]:
    """(messages, payload bytes) waiting in every device's outbox in this database."""
    ((messages, nbytes),) = conn.execute(
        "SELECT coalesce(sum(backlog_messages), 0), coalesce(sum(backlog_bytes), 0) FROM devices"
    ).fetchall()
    return int(messages), int(nbytes)


def _create_schema(conn: sqlite3.Connection, path: str | os.PathLike[str]) -> None:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version not in (0, SCHEMA_VERSION):
        raise RuntimeError(
            f"{os.fspath(path)!r} has store schema {version}; this agent knows {SCHEMA_VERSION}"
        )
    conn.executescript(f"BEGIN; {_SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")


class DeviceRows:
    """One device's rows in a shared database, and the transactions that change them."""

    def __init__(self, conn: sqlite3.Connection, device_id: str) -> None:
        self.conn = conn
        self.device_id = device_id
        conn.execute("INSERT OR IGNORE INTO devices (device_id) VALUES (?)", (device_id,))

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Everything written inside commits together, or on an exception not at all. Nests."""
        if self.conn.in_transaction:
            # Inside another transaction (the agent answering a mode table wraps enqueue): a
            # savepoint, so this part can still be undone alone and the outer one decides.
            self.conn.execute("SAVEPOINT nested")
            try:
                yield
            except BaseException:
                self.conn.execute("ROLLBACK TO nested")
                self.conn.execute("RELEASE nested")
                raise
            self.conn.execute("RELEASE nested")
            return
        # IMMEDIATE takes the write lock at BEGIN, so reading last_seq and writing it back
        # cannot interleave with another writer.
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")
