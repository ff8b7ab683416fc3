"""Brands and API keys. Never commits: the request's unit of work owns the transaction."""

import uuid

from psycopg.rows import class_row, dict_row

from services.api.brands.schemas import Brand
from services.api.repository import Repository
from services.common.api_keys import IssuedKey, Role, issue_key


class BrandRepository(Repository):
    """Brands and keys on the read-write unit."""

    def exists(self, brand_id: str) -> bool:
        """Whether the brand exists."""
        return self.one("SELECT 1 FROM brands WHERE id = %s", [brand_id], dict_row) is not None

    def create(self, brand_id: str, name: str) -> Brand:
        """Insert the brand; a taken id raises psycopg's ``UniqueViolation`` (``brands_pkey``)."""
        brand = self.one(
            "INSERT INTO brands (id, name) VALUES (%s, %s) RETURNING id, name, created_at",
            [brand_id, name],
            class_row(Brand),
        )
        assert brand is not None  # INSERT ... RETURNING returns the row it inserted
        return brand

    def issue_key(
        self, *, role: Role, name: str, brand_id: str | None, created_by: uuid.UUID
    ) -> IssuedKey:
        """A new key (its plaintext is in the result only)."""
        return issue_key(self.conn, role=role, name=name, brand_id=brand_id, created_by=created_by)

    def revoke_key(self, key_id: uuid.UUID, brand_id: str | None) -> bool:
        """Revoke the key (of ``brand_id`` only, unless None); False if there is no such key."""
        revoked = self.one(
            "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now())"
            " WHERE id = %s AND (%s::text IS NULL OR brand_id = %s) RETURNING id",
            [key_id, brand_id, brand_id],
            dict_row,
        )
        return revoked is not None
