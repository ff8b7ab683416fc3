"""Samples with a suspect clock kept by receipt time, apart from the time-partitioned samples.

A device whose clock is wrong (unset after a reset, or set to year 2100) sends sample times
outside ``[received - 30 days, received + 5 minutes]`` (protocol.md, "Device time"). Stored
in ``samples`` (a hypertable, or daily partitions, by device time), one 1,000-sample message
one day apart made 1,000 chunks that retention by device time never dropped (far future), or
dropped on the next pass (far past, such as ts=1000), and a rollup hour to recompute for
every past-dated hour it touched.

* ``suspect_samples``: a plain table (no partitions, no chunks), written by ingest with COPY
  like ``samples``. Keyed by the message and the sample's place in it,
  ``(device_id, seq, idx)``, not by device time: a wrong clock repeats times (it restarts at
  every boot), and the telemetry ledger already stores each ``(device_id, seq)`` once, so a
  redelivered message adds nothing. Rollups never read it.
* ``galvani_drop_old_messages`` trims it by ``received_at``, with the ledger and the
  conflicts, on every storage flavour (the maintenance pass calls it first, the licensed
  TimescaleDB build included): a suspect sample is kept for the raw retention period after
  it arrived, whatever time its device gave it.
* ``devices.suspect_samples_at``: when ingest last stored a suspect-clock sample of the
  device (the device detail in the API shows it, beside where to read them).
* ``sessions``: the per-session sample counters become ``bigint``. A device can keep one
  session id for as long as it likes, and at 1,000 samples a message an ``integer`` sum
  overflows after about two million messages; from then on every batch holding that session
  failed.
"""

from services.common.migrations.ddl import execute

revision = "0010"
down_revision = "0009"

SESSION_COUNTERS = ("samples", "out_samples", "gel_ok_samples")


def upgrade() -> None:
    execute("""
    CREATE TABLE suspect_samples (
        device_id text NOT NULL,
        seq bigint NOT NULL,
        idx smallint NOT NULL CHECK (idx >= 0),
        ts timestamptz NOT NULL,
        session text,
        mode text,
        level smallint,
        out boolean,
        i_ua real,
        i_set_ua real,
        v_v real,
        z_ohm real,
        t_elec_c real,
        t_batt_c real,
        batt_pct smallint,
        charging boolean,
        received_at timestamptz NOT NULL,
        PRIMARY KEY (device_id, seq, idx)
    )""")
    # The API reads a device's suspect samples by receipt time; retention deletes by it, and
    # rows arrive in receipt order, which BRIN serves at a fraction of a B-tree's insert cost.
    execute(
        "CREATE INDEX suspect_samples_device_received_idx"
        " ON suspect_samples (device_id, received_at)"
    )
    execute(
        "CREATE INDEX suspect_samples_received_brin ON suspect_samples USING brin (received_at)"
    )
    execute(_drop_old_messages(with_suspect=True))
    execute("ALTER TABLE devices ADD COLUMN suspect_samples_at timestamptz")
    counters = ", ".join(f"ALTER COLUMN {c} TYPE bigint" for c in SESSION_COUNTERS)
    execute(f"ALTER TABLE sessions {counters}")


def downgrade() -> None:
    counters = ", ".join(f"ALTER COLUMN {c} TYPE integer" for c in SESSION_COUNTERS)
    execute(f"ALTER TABLE sessions {counters}")
    execute("ALTER TABLE devices DROP COLUMN suspect_samples_at")
    execute(_drop_old_messages(with_suspect=False))
    execute("DROP TABLE suspect_samples")


def _drop_old_messages(*, with_suspect: bool) -> str:
    suspect = (
        """,
             suspect AS (DELETE FROM suspect_samples WHERE received_at < older_than
                         RETURNING 1)"""
        if with_suspect
        else ""
    )
    counted = " + (SELECT count(*) FROM suspect)" if with_suspect else ""
    return f"""
    CREATE OR REPLACE FUNCTION galvani_drop_old_messages(older_than timestamptz)
    RETURNS integer LANGUAGE sql AS $$
        WITH gone AS (DELETE FROM telemetry_messages WHERE received_at < older_than RETURNING 1),
             conflicts AS (DELETE FROM message_conflicts WHERE received_at < older_than
                           RETURNING 1){suspect}
        SELECT ((SELECT count(*) FROM gone) + (SELECT count(*) FROM conflicts){counted})::integer
    $$"""
