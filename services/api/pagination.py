"""Opaque cursors for keyset pagination: ``<kind>:<part>[\\x1f<part>...]``, base64url; and the
keyset query of the API's SQLModel resources (newest first by creation time)."""

import base64
import uuid
from datetime import datetime
from typing import Final, TypeVar

from sqlmodel import Session, col, select

from services.api.models import ModeTableRow, RolloutRow
from services.api.problems import ProblemError

Row = TypeVar("Row", ModeTableRow, RolloutRow)

SEPARATOR: Final = "\x1f"


def encode_cursor(kind: str, *parts: str) -> str:
    """The cursor that continues after ``parts`` (the last row's keys) in a list of ``kind``."""
    text = kind + ":" + SEPARATOR.join(parts)
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_cursor(kind: str, cursor: str, count: int) -> list[str]:
    """The ``count`` keys in a cursor of ``kind``; a 422 problem for anything else."""
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except ValueError:
        text = ""
    prefix, _, rest = text.partition(":")
    parts = rest.split(SEPARATOR)
    if prefix != kind or len(parts) != count or not all(parts):
        raise invalid_cursor()
    return parts


def decode_int_cursor(kind: str, cursor: str) -> int:
    """The one integer key (an id or seq) in a cursor of ``kind``."""
    [value] = decode_cursor(kind, cursor, 1)
    if not value.isdigit():
        raise invalid_cursor()
    return int(value)


def encode_time_cursor(kind: str, created_at: datetime, row_id: uuid.UUID) -> str:
    """The cursor after a row ordered by (created_at, id), newest first."""
    return encode_cursor(kind, created_at.isoformat(), str(row_id))


def decode_time_cursor(kind: str, cursor: str) -> tuple[datetime, uuid.UUID]:
    """The (created_at, id) in a cursor of ``kind``; a 422 problem for anything else."""
    created, row_id = decode_cursor(kind, cursor, 2)
    try:
        return datetime.fromisoformat(created), uuid.UUID(row_id)
    except ValueError:
        raise invalid_cursor() from None


def newest_first(
    session: Session,
    model: type[Row],
    brand_id: str,
    *,
    after: tuple[datetime, uuid.UUID] | None,
    limit: int,
) -> list[Row]:
    """A brand's rows of ``model``, newest first, continuing after ``after`` (created_at, id)."""
    query = select(model).where(model.brand_id == brand_id)
    if after is not None:
        created_at, row_id = after
        query = query.where(
            (col(model.created_at) < created_at)
            | ((col(model.created_at) == created_at) & (col(model.id) < row_id))
        )
    query = query.order_by(col(model.created_at).desc(), col(model.id).desc())
    return list(session.exec(query.limit(limit)).all())


def invalid_cursor() -> ProblemError:
    return ProblemError(
        422,
        "invalid-cursor",
        "Invalid cursor",
        "cursor: pass the next_cursor of a previous page unchanged",
    )
