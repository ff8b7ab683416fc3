"""Conflicting messages kept where a brand can see them, and devices whose seq restarted.

A device resends a message byte for byte (its outbox keeps the payload), so a second message
with a stored ``(device_id, seq)`` but other bytes is not a redelivery: the device used the
seq twice (a factory reset or a lost outbox restarts its counter). Likewise a sample whose
``(device_id, ts)`` is stored with other values. Neither can go where the first one is, and
neither may vanish behind a metric.

* ``payload_crc32`` on the three ledgers (``telemetry_messages``, ``events``,
  ``state_reports``): CRC-32 of the payload as received, compared only when a key is already
  taken. Rows from before this migration have none, and a message matching one counts as
  redelivered.
* ``message_conflicts``: each conflicting message once, whole (``payload``), with its reason
  (``seq_reused``, ``sample_conflict``) and ``detail`` (what was stored under the key; the
  sample times already taken). Unique by ``(device_id, channel, seq, payload_crc32)``, so a
  redelivered conflicting message, or a batch written again, records nothing new. Brands
  reach it through ``devices.brand_id``; there is no foreign key, as for the ledgers, because
  ingest stores messages of devices the database no longer knows.
* ``devices``: ``seq_reused`` / ``seq_reused_at`` count messages that reused a seq and the
  latest one's receipt; ``seq_resets`` / ``seq_reset_at`` count runs of them (a run starts
  with a reuse after an hour without one, see ``services/ingest/conflicts.py``).
* ``galvani_drop_old_messages`` trims conflicts with the ledger: both are kept as long as raw
  samples.
"""

from services.common.migrations.ddl import execute

revision = "0008"
down_revision = "0007"

LEDGERS = ("telemetry_messages", "events", "state_reports")


def upgrade() -> None:
    # Nullable without a default: PostgreSQL changes the catalogue only, not the rows.
    for table in LEDGERS:
        execute(f"ALTER TABLE {table} ADD COLUMN payload_crc32 bigint")
    execute("""
    CREATE TABLE message_conflicts (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        device_id text NOT NULL,
        channel text NOT NULL CHECK (channel IN ('telemetry', 'events', 'state')),
        seq bigint NOT NULL,
        ts timestamptz,
        reason text NOT NULL CHECK (reason IN ('seq_reused', 'sample_conflict')),
        payload bytea NOT NULL,
        payload_crc32 bigint NOT NULL,
        received_at timestamptz NOT NULL,
        detail jsonb NOT NULL
    )""")
    execute(
        "CREATE UNIQUE INDEX message_conflicts_once_idx"
        " ON message_conflicts (device_id, channel, seq, payload_crc32)"
    )
    execute("CREATE INDEX message_conflicts_device_idx ON message_conflicts (device_id, id DESC)")
    execute("CREATE INDEX message_conflicts_received_idx ON message_conflicts (received_at)")
    # Constant defaults: PostgreSQL 11+ records them in the catalogue instead of rewriting.
    execute("""
    ALTER TABLE devices
        ADD COLUMN seq_reused bigint NOT NULL DEFAULT 0 CHECK (seq_reused >= 0),
        ADD COLUMN seq_reused_at timestamptz,
        ADD COLUMN seq_resets integer NOT NULL DEFAULT 0 CHECK (seq_resets >= 0),
        ADD COLUMN seq_reset_at timestamptz""")
    execute("""
    CREATE OR REPLACE FUNCTION galvani_drop_old_messages(older_than timestamptz)
    RETURNS integer LANGUAGE sql AS $$
        WITH gone AS (DELETE FROM telemetry_messages WHERE received_at < older_than RETURNING 1),
             conflicts AS (DELETE FROM message_conflicts WHERE received_at < older_than
                           RETURNING 1)
        SELECT ((SELECT count(*) FROM gone) + (SELECT count(*) FROM conflicts))::integer
    $$""")


def downgrade() -> None:
    execute("""
    CREATE OR REPLACE FUNCTION galvani_drop_old_messages(older_than timestamptz)
    RETURNS integer LANGUAGE sql AS $$
        WITH gone AS (DELETE FROM telemetry_messages WHERE received_at < older_than RETURNING 1)
        SELECT count(*)::integer FROM gone
    $$""")
    execute("""
    ALTER TABLE devices
        DROP COLUMN seq_reused, DROP COLUMN seq_reused_at,
        DROP COLUMN seq_resets, DROP COLUMN seq_reset_at""")
    execute("DROP TABLE message_conflicts")
    for table in LEDGERS:
        execute(f"ALTER TABLE {table} DROP COLUMN payload_crc32")
