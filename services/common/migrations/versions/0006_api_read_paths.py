"""Indexes for the API's fleet summary, which counts per brand on every dashboard refresh.

* ``sessions_brand_started_idx``: "sessions today" of a brand was a scan of every session
  ever recorded (the table keeps the whole history); now it reads today's entries only.
* ``devices_brand_active_idx``: the brand's active devices and how many are online, counted
  from the index alone (an index-only scan while the visibility map is current) instead of
  from every row of the table. ``online`` changes on presence only, not on every sample.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""

from alembic import op
from sqlalchemy import text

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(text("CREATE INDEX sessions_brand_started_idx ON sessions (brand_id, started_at)"))
    op.execute(
        text(
            "CREATE INDEX devices_brand_active_idx ON devices (brand_id, online)"
            " WHERE decommissioned_at IS NULL"
        )
    )


def downgrade() -> None:
    op.execute(text("DROP INDEX devices_brand_active_idx"))
    op.execute(text("DROP INDEX sessions_brand_started_idx"))
