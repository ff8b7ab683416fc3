"""Mode table rows, always scoped by brand. Never commits: the request owns the transaction."""

import uuid
from datetime import datetime

from sqlmodel import Session, col, or_, select

from services.api.models import ModeTableRow


def add(session: Session, row: ModeTableRow) -> ModeTableRow:
    """Insert ``row`` (flushed, so its id can be referenced in the same transaction)."""
    session.add(row)
    session.flush()
    return row


def get(session: Session, brand_id: str, table_id: uuid.UUID) -> ModeTableRow | None:
    """One table of the brand, or None (another brand's table is None too)."""
    return session.exec(
        select(ModeTableRow).where(ModeTableRow.id == table_id, ModeTableRow.brand_id == brand_id)
    ).first()


def newest_first(
    session: Session, brand_id: str, *, after: tuple[datetime, uuid.UUID] | None, limit: int
) -> list[ModeTableRow]:
    """The brand's tables, newest first, continuing after ``after`` (created_at, id)."""
    query = select(ModeTableRow).where(ModeTableRow.brand_id == brand_id)
    if after is not None:
        created_at, table_id = after
        query = query.where(
            or_(
                col(ModeTableRow.created_at) < created_at,
                (col(ModeTableRow.created_at) == created_at) & (col(ModeTableRow.id) < table_id),
            )
        )
    query = query.order_by(col(ModeTableRow.created_at).desc(), col(ModeTableRow.id).desc())
    return list(session.exec(query.limit(limit)).all())
