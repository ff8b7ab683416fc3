"""The API's database access: an engine for the requests that write, a pool for the reads.

Both are created per app, in the lifespan, never at import.

* **Writes** (and the reads that serve them) run on the thread pool in a SQLModel session that
  owns the request's transaction (``deps.SessionDep``); repositories that use psycopg directly
  take the session's own connection (``deps.ConnDep``), so an ORM write and a raw query in one
  request share one transaction.
* **Reads** that dashboards poll (device details and lists, telemetry, the alert list, the
  fleet summary) run on the event loop with psycopg's ``AsyncConnection``
  (``deps.ReadConnDep``). A request that never leaves the event loop costs a fraction of the
  CPU of one that is handed to a worker thread and back, and it does not wait for the GIL
  behind other threads (``bench/README.md``, ``make bench-api``). These connections are in
  autocommit with ``default_transaction_read_only``: each statement sees a committed
  snapshot, and PostgreSQL refuses any write made through them.
"""

from typing import cast

from psycopg_pool import AsyncConnectionPool
from sqlalchemy import Connection, Engine, create_engine
from sqlalchemy.engine import make_url
from sqlmodel import Session

from services.common.db import AsyncConn, Conn

CONNECT_TIMEOUT_S = 5


def create_database_engine(database_url: str, *, pool_size: int, timeout_s: float) -> Engine:
    """An engine on psycopg 3 with ``pool_size`` connections (no overflow: the pool is the cap)."""
    url = make_url(database_url).set(drivername="postgresql+psycopg")
    return create_engine(
        url,
        pool_size=pool_size,
        max_overflow=0,
        pool_timeout=timeout_s,
        # No pre-ping: it costs a round trip on every request. A connection the server closed
        # (restart, failover) fails its request with a 503 (problems.py) and is discarded
        # when it returns to the pool.
        pool_pre_ping=False,
        # UTC sessions: timestamps come back in UTC, as the API writes them (RFC 3339, Z).
        connect_args={"connect_timeout": CONNECT_TIMEOUT_S, "options": "-c TimeZone=UTC"},
    )


def create_read_pool(
    database_url: str, *, size: int, timeout_s: float
) -> AsyncConnectionPool[AsyncConn]:
    """The read endpoints' pool of up to ``size`` connections; open it with ``await
    pool.open()`` on the event loop that will use it. A request that waits ``timeout_s`` for
    a connection (every one busy, or the database unreachable) fails with a 503."""
    return AsyncConnectionPool(
        database_url,
        min_size=min(2, size),
        max_size=size,
        open=False,
        timeout=timeout_s,
        name="api-reads",
        kwargs={
            "autocommit": True,
            "connect_timeout": CONNECT_TIMEOUT_S,
            "options": "-c TimeZone=UTC -c default_transaction_read_only=on",
        },
    )


def raw_connection(session: Session) -> Conn:
    """The psycopg connection under ``session``, inside the session's transaction."""
    return raw_connection_of(session.connection())


def raw_connection_of(connection: Connection) -> Conn:
    """The psycopg connection under a SQLAlchemy ``connection``."""
    return cast(Conn, connection.connection.driver_connection)
