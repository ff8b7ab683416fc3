"""Database access shared by the services: connections and the storage flavour in use."""

from enum import StrEnum

import psycopg

from services.common.errors import DatabaseUnavailable

CONNECT_TIMEOUT_S = 5

# The connection type every Galvani function takes (psycopg's default tuple rows).
Conn = psycopg.Connection[tuple[object, ...]]


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


# SQLSTATE classes worth retrying: the connection failed (08), the transaction was rolled back
# for a deadlock or serialization failure (40), the server is short of resources (53), an
# object is locked or in use (55), an operator cancelled or shut down (57), an I/O error (58).
# Anything else (a too-long index key, bad data) fails the same way every time, so retrying
# it would stall the stream on one poison message.
TRANSIENT_SQLSTATE_PREFIXES = ("08", "40", "53", "55", "57", "58")


def is_transient(exc: BaseException) -> bool:
    """Whether a database error may succeed if retried (see TRANSIENT_SQLSTATE_PREFIXES)."""
    if not isinstance(exc, psycopg.Error):
        return False
    sqlstate = exc.sqlstate
    if sqlstate is None:
        # No SQLSTATE: raised by the client itself (connection lost, closed, timed out).
        return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)
    return sqlstate.startswith(TRANSIENT_SQLSTATE_PREFIXES)
