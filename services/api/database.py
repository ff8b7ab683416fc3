"""The API's database engine: SQLModel sessions for CRUD, the same connection for bulk reads.

One engine per app, created in the lifespan. A request's session owns its transaction
(``deps.SessionDep``); repositories that read in bulk with psycopg use the session's own
connection (``deps.ConnDep``), so an ORM write and a raw query in one request share one
transaction.
"""

from typing import cast

from sqlalchemy import Connection, Engine, create_engine
from sqlalchemy.engine import make_url
from sqlmodel import Session

from services.common.db import Conn

POOL_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 5


def create_database_engine(database_url: str, *, pool_size: int) -> Engine:
    """An engine on psycopg 3 with ``pool_size`` connections (no overflow: the pool is the cap)."""
    url = make_url(database_url).set(drivername="postgresql+psycopg")
    return create_engine(
        url,
        pool_size=pool_size,
        max_overflow=0,
        pool_timeout=POOL_TIMEOUT_S,
        # No pre-ping: it costs a round trip on every request. A connection the server closed
        # (restart, failover) fails its request with a 503 (problems.py) and is discarded
        # when it returns to the pool.
        pool_pre_ping=False,
        # UTC sessions: timestamps come back in UTC, as the API writes them (RFC 3339, Z).
        connect_args={"connect_timeout": CONNECT_TIMEOUT_S, "options": "-c TimeZone=UTC"},
    )


def raw_connection(session: Session) -> Conn:
    """The psycopg connection under ``session``, inside the session's transaction."""
    return raw_connection_of(session.connection())


def raw_connection_of(connection: Connection) -> Conn:
    """The psycopg connection under a SQLAlchemy ``connection``."""
    return cast(Conn, connection.connection.driver_connection)
