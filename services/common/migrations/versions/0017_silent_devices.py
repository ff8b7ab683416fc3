"""Devices reported offline because they went silent.

* ``devices.silent_since``: when maintenance marked the device offline because nothing had
  been received from it for ``silent_after_s`` (services/maintenance/silent_devices.py); NULL
  otherwise. A broker killed -9 never publishes the last wills of the devices it held, so a
  device that does not come back would stay ``online`` forever on presence alone; the
  protocol's heartbeat (a telemetry sample a minute from an idle device) makes silence the
  signal instead. Ingest clears the column when the device's presence wins; maintenance
  clears it (and sets ``online`` again) when a message received after the mark is stored.

Maintenance's grants on ``devices`` (read the columns it judges by, update ``online`` and
``silent_since``) and on ``presence_log`` (insert the rows it logs) are in
services/common/migrations/grants.py, applied after every upgrade.
"""

from services.common.migrations.ddl import execute

revision = "0017"
down_revision = "0016"


def upgrade() -> None:
    execute("ALTER TABLE devices ADD COLUMN silent_since timestamptz")


def downgrade() -> None:
    execute("ALTER TABLE devices DROP COLUMN silent_since")
