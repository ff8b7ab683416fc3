"""Ingest: a ledger of telemetry messages, session counters, a cheaper time index.

* ``telemetry_messages`` holds one row per telemetry message, keyed by ``(device_id, seq)``.
  Samples are keyed by ``(device_id, ts)``, which cannot tell a redelivered message from a
  new one with overlapping times; the ledger can, so ingest COPYs a new message's samples
  straight into ``samples`` and skips a redelivered one without touching it. It is also
  what counts each seq once for the gap counter.
* ``samples``: TimescaleDB creates a B-tree on ``ts`` for every hypertable. Rows arrive in
  time order, so a BRIN index answers the same range scans (the rollup refresh) at a
  fraction of the insert cost; per-device reads use the primary key.
* ``sessions`` gains the counters ingest maintains and the seqs of the start and end
  events, so a session converges to the same row whatever order its messages arrive in.
* ``presence_log``: a device's own presence messages carry ``ts`` and are stored once.
"""

from services.common.migrations.ddl import execute

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    execute("""
    CREATE TABLE telemetry_messages (
        device_id text NOT NULL,
        seq bigint NOT NULL,
        ts timestamptz NOT NULL,
        session text,
        samples smallint NOT NULL CHECK (samples >= 1),
        received_at timestamptz NOT NULL,
        ts_suspect boolean NOT NULL DEFAULT false,
        PRIMARY KEY (device_id, seq)
    )""")
    execute(
        "CREATE INDEX telemetry_messages_received_idx"
        " ON telemetry_messages USING brin (received_at)"
    )
    execute("DROP INDEX IF EXISTS samples_ts_idx")
    execute("CREATE INDEX samples_ts_brin ON samples USING brin (ts)")
    execute("""
    ALTER TABLE sessions
        ADD COLUMN start_seq bigint,
        ADD COLUMN end_seq bigint,
        ADD COLUMN out_samples integer NOT NULL DEFAULT 0,
        ADD COLUMN first_sample_at timestamptz,
        ADD COLUMN last_sample_at timestamptz""")
    execute(
        "CREATE UNIQUE INDEX presence_log_once_idx ON presence_log (device_id, ts, online)"
        " WHERE ts IS NOT NULL"
    )
    # The ledger only has to outlive redeliveries (a device's offline buffer is bounded by
    # age), so it is trimmed with the raw samples.
    execute("""
    CREATE OR REPLACE FUNCTION galvani_drop_old_messages(older_than timestamptz)
    RETURNS integer LANGUAGE sql AS $$
        WITH gone AS (DELETE FROM telemetry_messages WHERE received_at < older_than RETURNING 1)
        SELECT count(*)::integer FROM gone
    $$""")


def downgrade() -> None:
    execute("DROP FUNCTION galvani_drop_old_messages(timestamptz)")
    execute("DROP INDEX presence_log_once_idx")
    execute("""
    ALTER TABLE sessions
        DROP COLUMN start_seq, DROP COLUMN end_seq, DROP COLUMN out_samples,
        DROP COLUMN first_sample_at, DROP COLUMN last_sample_at""")
    execute("DROP INDEX samples_ts_brin")
    execute("CREATE INDEX samples_ts_idx ON samples (ts DESC)")
    execute("DROP TABLE telemetry_messages")
