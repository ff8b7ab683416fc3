"""Opaque cursors for keyset pagination: ``<kind>:<part>[\\x1f<part>...]``, base64url; and the
page a list endpoint answers with (its repository reads one row more than the page)."""

import base64
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Final, Protocol, TypeVar

from fastapi import Depends, Query

from services.api.problems import ProblemError

T = TypeVar("T")

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


def page(rows: list[T], limit: int, cursor: Callable[[T], str]) -> tuple[list[T], str | None]:
    """The first ``limit`` of ``rows`` (read as ``limit + 1``, to know whether more follow)
    and the cursor of the next page: ``cursor`` of the last row kept, or None at the end."""
    if len(rows) <= limit:
        return rows, None
    kept = rows[:limit]
    return kept, cursor(kept[-1])


class _Timed(Protocol):
    @property
    def created_at(self) -> datetime: ...

    @property
    def id(self) -> uuid.UUID: ...


TimedT = TypeVar("TimedT", bound=_Timed)


@dataclass(frozen=True)
class NewestFirst:
    """The page asked of a list ordered newest first by (created_at, id): at most ``limit``
    rows, after the row ``after`` names (None: from the newest)."""

    kind: str
    limit: int
    after: tuple[datetime, uuid.UUID] | None

    def answer(self, rows: list[TimedT]) -> tuple[list[TimedT], str | None]:
        """The page of ``rows`` (read as ``limit + 1``) and the next page's cursor."""
        return page(rows, self.limit, lambda r: encode_time_cursor(self.kind, r.created_at, r.id))


def newest_first(kind: str, *, default: int, maximum: int) -> Any:
    """A dependency: the :class:`NewestFirst` page the ``limit`` and ``cursor`` query
    parameters ask for, in a list of ``kind``."""

    async def asked(
        limit: Annotated[int, Query(ge=1, le=maximum)] = default,
        cursor: Annotated[str | None, Query(max_length=200)] = None,
    ) -> NewestFirst:
        after = decode_time_cursor(kind, cursor) if cursor is not None else None
        return NewestFirst(kind, limit, after)

    return Depends(asked)


def invalid_cursor() -> ProblemError:
    """The 422 for a cursor this API did not hand out."""
    return ProblemError(
        422,
        "invalid-cursor",
        "Invalid cursor",
        "cursor: pass the next_cursor of a previous page unchanged",
    )
