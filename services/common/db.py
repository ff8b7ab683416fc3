"""Database access shared by the services: connections and the storage flavour in use."""

from enum import StrEnum

import psycopg

from services.common.errors import DatabaseUnavailable

CONNECT_TIMEOUT_S = 5

# The connection type every Galvani function takes (psycopg's default tuple rows).
Conn = psycopg.Connection[tuple[object, ...]]
# The same on the event loop (the API's read endpoints).
AsyncConn = psycopg.AsyncConnection[tuple[object, ...]]


class Storage(StrEnum):
    """How time-series tables are stored in the connected database.

    ``timescaledb``: the full (Timescale-licensed) build: compression, continuous aggregates
    and retention policies. ``timescaledb-apache``: the Apache-only build Debian ships:
    hypertables and ``time_bucket``; Galvani maintains rollups and retention itself.
    ``plain``: PostgreSQL with declarative range partitions and a ``time_bucket`` function of
    Galvani's own with the same meaning.
    """

    TIMESCALEDB = "timescaledb"
    TIMESCALEDB_APACHE = "timescaledb-apache"
    PLAIN = "plain"


def connect(url: str, *, autocommit: bool = False) -> Conn:
    """Open a connection, translating failure into :class:`DatabaseUnavailable`."""
    try:
        return psycopg.connect(url, autocommit=autocommit, connect_timeout=CONNECT_TIMEOUT_S)
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailable(f"cannot connect to PostgreSQL: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__


def describe_url(url: str) -> str:
    """``host:port/dbname`` of a URL, without credentials, for messages."""
    info = psycopg.conninfo.conninfo_to_dict(url)
    return f"{info.get('host', 'localhost')}:{info.get('port', 5432)}/{info.get('dbname', '')}"


def storage_of(conn: Conn) -> Storage:
    """The storage flavour the migrations chose for this database."""
    row = conn.execute("SELECT value FROM galvani_meta WHERE key = 'storage'").fetchone()
    if row is None:
        raise DatabaseUnavailable("database is not migrated: run `alembic upgrade head`")
    return Storage(str(row[0]))


# SQLSTATE classes that say "this message cannot be stored", whatever is retried: bad data
# (22), a constraint (23), a limit such as an index entry too large (54). Anything else (the
# connection, a deadlock, a read-only or missing table during a failover or migration, an
# internal error) is the database's trouble, not the message's: it is retried, and no message
# is dead-lettered or skipped because of it.
BAD_MESSAGE_SQLSTATE_PREFIXES = ("22", "23", "54")


def is_bad_message(exc: BaseException) -> bool:
    """Whether a database error blames the data written (see BAD_MESSAGE_SQLSTATE_PREFIXES)."""
    if not isinstance(exc, psycopg.Error):
        return False
    sqlstate = exc.sqlstate
    if sqlstate is None:
        # Raised by psycopg itself while adapting a value (no server round trip).
        return isinstance(exc, psycopg.DataError)
    return sqlstate.startswith(BAD_MESSAGE_SQLSTATE_PREFIXES)


def describe_error(exc: BaseException) -> str:
    """An error for a log line, without the values that caused it.

    PostgreSQL's messages quote the data they refuse (``invalid input syntax for type
    integer: "..."``, ``Key (...)=(...) already exists``), and a device's payload can hold what
    a person typed (a ``user_report`` note). Logs get the error's class, SQLSTATE and the
    constraint or column it names, never its message; the message stays with the dead letter,
    where only the device's brand reads it.
    """
    if not isinstance(exc, psycopg.Error):
        return type(exc).__name__
    parts = [type(exc).__name__]
    if exc.sqlstate:
        parts.append(f"SQLSTATE {exc.sqlstate}")
    diag = exc.diag
    for label, value in (
        ("table", diag.table_name),
        ("column", diag.column_name),
        ("constraint", diag.constraint_name),
    ):
        if value:
            parts.append(f"{label} {value}")
    return ", ".join(parts)
