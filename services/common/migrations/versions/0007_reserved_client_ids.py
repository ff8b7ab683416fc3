"""No device id may start with ``galvani-``: that prefix is the backend's MQTT client ids.

Mosquitto keys sessions by client id across listeners, and the device listener makes a
device's client id its username. A device provisioned as ``galvani-ingest-1`` would therefore
log in under the ingest worker's client id and take over its persistent session. The API
refuses such ids (``services.common.broker_auth.RESERVED_CLIENT_ID_PREFIX``); this constraint
makes the database refuse them too, whoever inserts the row.

The prefix is written out here rather than imported: a migration must mean the same thing
whatever the code around it later becomes.
"""

from services.common.migrations.ddl import column, execute

revision = "0007"
down_revision = "0006"

CONSTRAINT = "devices_id_not_reserved"
SHOWN_IDS = 10


def upgrade() -> None:
    # ADD CONSTRAINT would also fail on such rows, but with PostgreSQL's "is violated by some
    # row", which names neither the rows nor what to do. Nothing is deleted here: the rows
    # carry a device's history, and only an operator can decide what becomes of it.
    reserved = column("SELECT id FROM devices WHERE id LIKE 'galvani-%' ORDER BY id")
    if reserved:
        shown = ", ".join(reserved[:SHOWN_IDS]) + (", ..." if len(reserved) > SHOWN_IDS else "")
        raise RuntimeError(
            f"{len(reserved)} device(s) have ids starting with 'galvani-' ({shown}), a prefix now "
            "reserved for the backend's MQTT client ids: a device logging in under one takes "
            "over a backend worker's broker session. Delete these devices or move their rows "
            "to new ids, then run the migration again."
        )
    execute(f"ALTER TABLE devices ADD CONSTRAINT {CONSTRAINT} CHECK (id NOT LIKE 'galvani-%')")


def downgrade() -> None:
    execute(f"ALTER TABLE devices DROP CONSTRAINT {CONSTRAINT}")
