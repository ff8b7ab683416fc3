"""API keys: random tokens shown once and stored as a SHA-256 digest."""

import hashlib
import secrets
import uuid
from dataclasses import dataclass
from enum import StrEnum

from services.common.db import Conn

KEY_PREFIX = "gvk_"
KEY_RANDOM_BYTES = 32


class Role(StrEnum):
    """api.md roles: the platform operator, and a brand's admin, support and viewer."""

    OPERATOR = "operator"
    ADMIN = "admin"
    SUPPORT = "support"
    VIEWER = "viewer"


@dataclass(frozen=True)
class IssuedKey:
    """A key as issued: the plaintext exists only here and in the response that shows it."""

    id: uuid.UUID
    key: str


def digest(key: str) -> bytes:
    """The stored form of a key."""
    return hashlib.sha256(key.encode()).digest()


def issue_key(
    conn: Conn,
    *,
    role: Role,
    name: str,
    brand_id: str | None,
    created_by: uuid.UUID | None = None,
) -> IssuedKey:
    """Create a key in the caller's transaction and return its plaintext once."""
    key = KEY_PREFIX + secrets.token_urlsafe(KEY_RANDOM_BYTES)
    row = conn.execute(
        "INSERT INTO api_keys (brand_id, role, name, key_prefix, key_hash, created_by)"
        " VALUES (%s, %s, %s, %s, %s, %s) RETURNING id",
        [brand_id, role.value, name, key[: len(KEY_PREFIX) + 6], digest(key), created_by],
    ).fetchone()
    assert row is not None
    key_id = row[0]
    assert isinstance(key_id, uuid.UUID)
    return IssuedKey(id=key_id, key=key)


def key_is_active(conn: Conn, key: str) -> bool:
    """Whether ``key`` exists and is not revoked."""
    row = conn.execute(
        "SELECT 1 FROM api_keys WHERE key_hash = %s AND revoked_at IS NULL", [digest(key)]
    ).fetchone()
    return row is not None
