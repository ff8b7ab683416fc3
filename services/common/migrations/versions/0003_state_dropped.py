"""State reports keep what a device's outbox had to drop (``state.dropped``, added in v1).

A device offline longer than its outbox holds drops telemetry first and says so on ``state``:
cumulative counts by channel and the lowest and highest dropped ``seq``. Kept as reported, so
a gap in a device's ``seq`` can be told apart from messages lost on the way.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""

from alembic import op
from sqlalchemy import text

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(text("ALTER TABLE state_reports ADD COLUMN dropped jsonb"))


def downgrade() -> None:
    op.execute(text("ALTER TABLE state_reports DROP COLUMN dropped"))
