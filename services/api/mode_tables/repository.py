"""Mode table rows, always scoped by brand. Never commits: the request owns the transaction."""

import uuid

from sqlmodel import Session, select

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
