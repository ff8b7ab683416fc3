"""Indexes for the API's fleet summary, which counts per brand on every dashboard refresh.

* ``sessions_brand_started_idx``: "sessions today" of a brand was a scan of every session
  ever recorded (the table keeps the whole history); now it reads today's entries only.
* ``devices_brand_active_idx``: the brand's active devices and how many are online, counted
  from the index alone (an index-only scan while the visibility map is current) instead of
  from every row of the table. ``online`` changes on presence only, not on every sample.
"""

from services.common.migrations.ddl import execute

revision = "0006"
down_revision = "0005"


def upgrade() -> None:
    execute("CREATE INDEX sessions_brand_started_idx ON sessions (brand_id, started_at)")
    execute(
        "CREATE INDEX devices_brand_active_idx ON devices (brand_id, online)"
        " WHERE decommissioned_at IS NULL"
    )


def downgrade() -> None:
    execute("DROP INDEX devices_brand_active_idx")
    execute("DROP INDEX sessions_brand_started_idx")
