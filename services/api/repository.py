"""The bases of every domain's repository: the only code of the API that holds SQL.

A repository is built per request by a dependency (``deps.py``) from the request's unit of
work and never commits: the dependency that owns the unit commits at the boundary, or rolls
back. Rows are typed where they are read: SQLModel table classes through the session, and
psycopg rows through row factories (``class_row`` into a schema or a dataclass, ``dict_row``
for rows passed on as they are), so no caller converts a column by hand.
"""

from typing import Final, TypeVar

from psycopg.abc import Params
from psycopg.rows import BaseRowFactory, dict_row
from sqlmodel import Session

from services.api.database import psycopg_connection
from services.common.db import AsyncConn

T = TypeVar("T")

# Whether a brand has a device, decommissioned or not: the tenancy check of every request
# that names a device (another brand's device is "not found" too).
OWNS_DEVICE: Final = "SELECT 1 FROM devices WHERE id = %s AND brand_id = %s"


class Repository:
    """A repository on the read-write unit: the request's session, and its psycopg connection
    for statements the ORM does not express and for the shared services."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.conn = psycopg_connection(session)

    # A cursor per statement, not closed, as psycopg's own ``Connection.execute`` does: a
    # client-side cursor holds nothing on the server, and closing costs a call per request.
    def one(self, query: str, params: Params, row: BaseRowFactory[T]) -> T | None:
        """The first row of ``query`` as ``row`` makes it, or None."""
        return self.conn.cursor(row_factory=row).execute(query, params).fetchone()

    def all(self, query: str, params: Params, row: BaseRowFactory[T]) -> list[T]:
        """Every row of ``query`` as ``row`` makes it."""
        return self.conn.cursor(row_factory=row).execute(query, params).fetchall()

    def owns_device(self, brand_id: str, device_id: str) -> bool:
        """Whether the brand has the device (decommissioned or not)."""
        return self.one(OWNS_DEVICE, [device_id, brand_id], dict_row) is not None


class ReadRepository:
    """A repository on the read-only unit: a connection of the read pool, on the event loop."""

    def __init__(self, conn: AsyncConn) -> None:
        self.conn = conn

    async def one(self, query: str, params: Params, row: BaseRowFactory[T]) -> T | None:
        """The first row of ``query`` as ``row`` makes it, or None."""
        cursor = await self.conn.cursor(row_factory=row).execute(query, params)
        return await cursor.fetchone()

    async def all(self, query: str, params: Params, row: BaseRowFactory[T]) -> list[T]:
        """Every row of ``query`` as ``row`` makes it."""
        cursor = await self.conn.cursor(row_factory=row).execute(query, params)
        return await cursor.fetchall()

    async def owns_device(self, brand_id: str, device_id: str) -> bool:
        """Whether the brand has the device (decommissioned or not)."""
        return await self.one(OWNS_DEVICE, [device_id, brand_id], dict_row) is not None
