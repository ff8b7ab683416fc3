"""A brand's factory CAs. Never commits: the request's unit of work owns the transaction."""

from datetime import datetime
from typing import Final

from psycopg.rows import class_row

from services.api.device_authorities.schemas import DeviceAuthority
from services.api.repository import Repository

INSERT: Final = """
INSERT INTO brand_device_authorities (brand_id, subject, fingerprint, certificate, not_after)
VALUES (%s, %s, %s, %s, %s)
RETURNING id, subject, fingerprint, certificate, not_after, created_at
"""
GET: Final = """
SELECT id, subject, fingerprint, certificate, not_after, created_at
FROM brand_device_authorities WHERE id = %s AND brand_id = %s AND removed_at IS NULL
"""
PAGE: Final = """
SELECT id, subject, fingerprint, certificate, not_after, created_at
FROM brand_device_authorities
WHERE brand_id = %(brand)s AND removed_at IS NULL
  AND (%(after)s::bigint IS NULL OR id > %(after)s)
ORDER BY id LIMIT %(limit)s
"""


class DeviceAuthorityRepository(Repository):
    """The brand's registered (not removed) device authorities."""

    def add(
        self,
        brand_id: str,
        *,
        subject: str,
        fingerprint: str,
        certificate: str,
        not_after: datetime,
    ) -> DeviceAuthority:
        """Register an authority; a duplicate of an active one of the brand fails the unique
        index ``brand_device_authorities_fingerprint_key``."""
        row = self.one(
            INSERT,
            [brand_id, subject, fingerprint, certificate, not_after],
            class_row(DeviceAuthority),
        )
        assert row is not None  # INSERT ... RETURNING returns the row
        return row

    def get(self, brand_id: str, authority_id: int) -> DeviceAuthority | None:
        """The brand's authority, or None (another brand's is None too)."""
        return self.one(GET, [authority_id, brand_id], class_row(DeviceAuthority))

    def page(self, brand_id: str, *, after_id: int | None, limit: int) -> list[DeviceAuthority]:
        """The brand's authorities in id order, after ``after_id``."""
        params = {"brand": brand_id, "after": after_id, "limit": limit}
        return self.all(PAGE, params, class_row(DeviceAuthority))

    def remove(self, brand_id: str, authority_id: int) -> bool:
        """Remove the brand's authority (its row stays, for the certificates it vouched for);
        False when the brand has no such authority."""
        row = self.conn.execute(
            "UPDATE brand_device_authorities SET removed_at = now()"
            " WHERE id = %s AND brand_id = %s AND removed_at IS NULL RETURNING id",
            [authority_id, brand_id],
        ).fetchone()
        return row is not None
