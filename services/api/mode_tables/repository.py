"""Mode tables of a brand (SQLModel rows). Never commits: the request's unit of work owns the
transaction."""

import uuid
from datetime import datetime

from sqlmodel import col, select

from services.api.models import ModeTableRow
from services.api.repository import Repository


class ModeTableRepository(Repository):
    """Mode tables on the read-write unit."""

    def add(self, row: ModeTableRow) -> ModeTableRow:
        """Insert ``row`` (flushed, so its id can be referenced in the same transaction)."""
        self.session.add(row)
        self.session.flush()
        return row

    def get(self, brand_id: str, table_id: uuid.UUID) -> ModeTableRow | None:
        """One table of the brand, or None (another brand's table is None too)."""
        return self.session.exec(
            select(ModeTableRow).where(
                ModeTableRow.id == table_id, ModeTableRow.brand_id == brand_id
            )
        ).first()

    def page(
        self, brand_id: str, *, after: tuple[datetime, uuid.UUID] | None, limit: int
    ) -> list[ModeTableRow]:
        """The brand's tables, newest first, after ``after`` (created_at, id)."""
        query = select(ModeTableRow).where(ModeTableRow.brand_id == brand_id)
        if after is not None:
            created_at, row_id = after
            query = query.where(
                (col(ModeTableRow.created_at) < created_at)
                | ((col(ModeTableRow.created_at) == created_at) & (col(ModeTableRow.id) < row_id))
            )
        newest = (col(ModeTableRow.created_at).desc(), col(ModeTableRow.id).desc())
        return list(self.session.exec(query.order_by(*newest).limit(limit)).all())
