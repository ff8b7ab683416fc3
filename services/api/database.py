"""The API's two ways to the database, created per app in the lifespan, never at import.

* The **read-write unit**: a SQLModel session on an engine (``create_database_engine``), on
  the thread pool; the shared sync services (provisioning, ``record_push``) and statements the
  ORM does not express run on the session's own psycopg connection
  (:func:`psycopg_connection`), so an ORM write and a signed push share one transaction.
* The **read-only unit**: a psycopg ``AsyncConnection`` from the read pool
  (``create_read_pool``), on the event loop, for the reads dashboards poll. A request that
  never leaves the event loop costs a fraction of the CPU of one handed to a worker thread and
  back, and does not wait for the GIL behind other threads (``bench/README.md``,
  ``make bench-api``). These connections are in autocommit with
  ``default_transaction_read_only``: each statement sees a committed snapshot, and PostgreSQL
  refuses any write made through them.
"""

import psycopg
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


def psycopg_connection(source: Session | Connection) -> Conn:
    """The psycopg connection under a session (inside its transaction) or a SQLAlchemy
    connection: the one accessor, so no caller casts the driver's connection."""
    connection = source.connection() if isinstance(source, Session) else source
    driver = connection.connection.driver_connection
    if not isinstance(driver, psycopg.Connection):
        raise TypeError(f"the engine's driver is not psycopg 3: {type(driver).__name__}")
    return driver
