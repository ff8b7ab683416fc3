"""Keyset pagination: the page a list endpoint answers with (its repository reads one row more
than the page), and its ``cursor`` query parameter.

A cursor is the position after the last row of a page, written as the list's keys (an id, a
device id, a time in microseconds since the epoch and an id). Clients pass ``next_cursor``
unchanged, but every value of the form the OpenAPI document gives for a list's ``cursor`` is a
position in that list: the document says exactly what the server accepts, so a generated
client never sends a cursor the server refuses for a reason the document hides.
"""

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Final, Protocol, TypeVar

from fastapi import Depends, Path, Query

from services.common.protocol.topics import DEVICE_ID_PATTERN

T = TypeVar("T")

# The largest bigint: ids and seqs are bigint columns.
MAX_KEY: Final = 2**63 - 1
EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_UUID: Final = "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
# Up to 16 digits of microseconds: until 2286, far past any created_at (the database's now()).
TIME_ID_PATTERN: Final = rf"^[0-9]{{1,16}}~{_UUID}$"
# A session's start (microseconds, or "none" when it has none) and its id, which any text but
# NUL may be (PostgreSQL text holds no NUL).
SESSION_PATTERN: Final = r"^([0-9]{1,18}|none)~[^\u0000]{1,256}$"
_ABOUT: Final = "the `next_cursor` of the previous page"

# An id in a path that is a bigint in the database (an alert's).
AlertId = Annotated[int, Path(ge=1, le=MAX_KEY)]
KeyCursor = Annotated[
    int | None, Query(ge=0, le=MAX_KEY, description=_ABOUT + ": the last row's id")
]
DeviceCursor = Annotated[
    str | None, Query(pattern=DEVICE_ID_PATTERN, description=_ABOUT + ": the last device's id")
]
SessionCursor = Annotated[
    str | None,
    Query(
        pattern=SESSION_PATTERN,
        max_length=300,
        description=_ABOUT + ": `<start, µs since the epoch, or none>~<session id>`",
    ),
]


def page(rows: list[T], limit: int, cursor: Callable[[T], str]) -> tuple[list[T], str | None]:
    """The first ``limit`` of ``rows`` (read as ``limit + 1``, to know whether more follow)
    and the cursor of the next page: ``cursor`` of the last row kept, or None at the end."""
    if len(rows) <= limit:
        return rows, None
    kept = rows[:limit]
    return kept, cursor(kept[-1])


def microseconds(moment: datetime) -> int:
    """``moment`` as whole microseconds since the epoch."""
    return (moment - EPOCH) // timedelta(microseconds=1)


def session_cursor(started_at: datetime | None, session: str) -> str:
    """The cursor after a session (ordered by start, then id, newest first)."""
    start = str(microseconds(started_at)) if started_at is not None else "none"
    return f"{start}~{session}"


def decode_session_cursor(cursor: str) -> tuple[int | None, str]:
    """(start in µs or None, session id) of a cursor :data:`SESSION_PATTERN` has checked."""
    start, _, session = cursor.partition("~")
    return (None if start == "none" else int(start)), session


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

    limit: int
    after: tuple[datetime, uuid.UUID] | None

    def answer(self, rows: list[TimedT]) -> tuple[list[TimedT], str | None]:
        """The page of ``rows`` (read as ``limit + 1``) and the next page's cursor."""
        return page(rows, self.limit, lambda r: f"{microseconds(r.created_at)}~{r.id}")


def newest_first(*, default: int, maximum: int) -> Any:
    """A dependency: the :class:`NewestFirst` page the ``limit`` and ``cursor`` query
    parameters ask for."""

    async def asked(
        limit: Annotated[int, Query(ge=1, le=maximum)] = default,
        cursor: Annotated[
            str | None,
            Query(
                pattern=TIME_ID_PATTERN,
                description=_ABOUT + ": `<created_at, µs since the epoch>~<id>`",
            ),
        ] = None,
    ) -> NewestFirst:
        if cursor is None:
            return NewestFirst(limit, None)
        created, _, row_id = cursor.partition("~")
        return NewestFirst(limit, (EPOCH + timedelta(microseconds=int(created)), uuid.UUID(row_id)))

    return Depends(asked)
