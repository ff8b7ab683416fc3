"""Opaque cursors for keyset pagination: ``<kind>:<part>[\\x1f<part>...]``, base64url."""

import base64
from typing import Final

from services.api.problems import ProblemError

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


def invalid_cursor() -> ProblemError:
    return ProblemError(
        422,
        "invalid-cursor",
        "Invalid cursor",
        "cursor: pass the next_cursor of a previous page unchanged",
    )
