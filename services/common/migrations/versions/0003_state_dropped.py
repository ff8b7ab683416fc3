"""State reports keep what a device's outbox had to drop (``state.dropped``, added in v1).

A device offline longer than its outbox holds drops telemetry first and says so on ``state``:
cumulative counts by channel and the lowest and highest dropped ``seq``. Kept as reported, so
a gap in a device's ``seq`` can be told apart from messages lost on the way.
"""

from services.common.migrations.ddl import execute

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    execute("ALTER TABLE state_reports ADD COLUMN dropped jsonb")


def downgrade() -> None:
    execute("ALTER TABLE state_reports DROP COLUMN dropped")
