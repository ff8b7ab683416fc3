"""Bans of flooding devices, kept so the device's brand sees them as alerts.

* ``device_throttles``: one row each time an ingest worker bans a device from the broker for
  sending past its message budget (``services/ingest/throttle.py``): when, until when, the
  budget (``budget`` messages in ``window_s`` seconds, as one worker counts) and how many
  messages past it the device had sent in that window when it was banned. Ingest writes a row
  in a short transaction of its own after the ban is applied (the ban does not wait for it);
  the rules' sweep raises ``device_flooding`` from the rows (keyed by ``id``, so a row counts
  once); maintenance trims rows past the retention period.
"""

from services.common.migrations.ddl import execute

revision = "0012"
down_revision = "0011"


def upgrade() -> None:
    execute("""
    CREATE TABLE device_throttles (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        device_id text NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
        banned_at timestamptz NOT NULL,
        until timestamptz NOT NULL,
        messages_over_budget integer NOT NULL CHECK (messages_over_budget > 0),
        window_s double precision NOT NULL CHECK (window_s > 0),
        budget integer NOT NULL CHECK (budget > 0),
        CHECK (until > banned_at)
    )""")
    execute("CREATE INDEX device_throttles_banned_at_idx ON device_throttles (banned_at)")
    execute(
        "CREATE INDEX device_throttles_device_idx ON device_throttles (device_id, banned_at DESC)"
    )


def downgrade() -> None:
    execute("DROP TABLE device_throttles")
