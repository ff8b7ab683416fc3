"""Rules: the engine's own event-time state, the occurrences behind each alert, brand thresholds.

The rules engine consumes the device stream from the broker in a share group of its own, in
parallel with ingest, so it cannot read what ingest has not committed yet. It keeps what its
windows need itself, keyed so that a redelivered or duplicated message changes nothing:

* ``rule_samples``: every sample for two hours (by receipt), with a bitmask of the per-sample
  conditions it met, so a run ("for more than 2 s") is found in event time across messages
  that arrive in any order;
* ``rule_sessions`` and ``rule_reboots``: session starts and ends and reboots for the rolling
  24 h / 7 day / 10 minute windows (sessions kept eight days, reboots one);
* ``alert_triggers``: each occurrence an alert counts, with its idempotency key (the session,
  the event's seq, the pushed version) or, for runs of samples, its interval in event time;
  an alert's ``count`` is the number of its triggers, so a replay adds none;
* ``brand_rule_thresholds``: a brand's overrides of the catalogue's defaults;
* ``config_pushes.superseded_at``: a recorded table that was never published because a newer
  one was recorded for the device first (publishing it would roll the retained table back).
"""

from services.common.migrations.ddl import execute

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    execute("""
    CREATE TABLE rule_samples (
        device_id text NOT NULL,
        ts timestamptz NOT NULL,
        session text,
        mode text,
        out boolean NOT NULL,
        i_ua real,
        i_set_ua real,
        z_ohm real,
        t_elec_c real,
        t_batt_c real,
        batt_pct smallint,
        charging boolean NOT NULL,
        mask integer NOT NULL,
        received_at timestamptz NOT NULL,
        PRIMARY KEY (device_id, ts)
    )""")
    execute("CREATE INDEX rule_samples_session_idx ON rule_samples (device_id, session, ts)")
    execute("CREATE INDEX rule_samples_received_idx ON rule_samples USING brin (received_at)")
    execute("""
    CREATE TABLE rule_sessions (
        device_id text NOT NULL,
        session text NOT NULL,
        brand_id text NOT NULL,
        user_key text NOT NULL,
        mode text,
        level smallint,
        started_at timestamptz,
        ended_at timestamptz,
        duration_s integer,
        end_reason text,
        PRIMARY KEY (device_id, session)
    )""")
    execute(
        "CREATE INDEX rule_sessions_user_started_idx"
        " ON rule_sessions (brand_id, user_key, started_at)"
    )
    execute(
        "CREATE INDEX rule_sessions_user_ended_idx ON rule_sessions (brand_id, user_key, ended_at)"
    )
    execute("""
    CREATE TABLE rule_reboots (
        device_id text NOT NULL,
        seq bigint NOT NULL,
        ts timestamptz NOT NULL,
        reason text NOT NULL,
        PRIMARY KEY (device_id, seq)
    )""")
    execute("CREATE INDEX rule_reboots_device_ts_idx ON rule_reboots (device_id, ts)")
    execute("""
    CREATE TABLE alert_triggers (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        -- Set in the transaction that inserts the row: a keyed occurrence is claimed first
        -- (INSERT ... ON CONFLICT DO NOTHING), then its alert is raised.
        alert_id bigint REFERENCES alerts(id),
        device_id text NOT NULL,
        rule text NOT NULL,
        variant text NOT NULL DEFAULT '',
        key text,
        started_at timestamptz NOT NULL,
        ended_at timestamptz NOT NULL,
        observed jsonb NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now(),
        CHECK (started_at <= ended_at)
    )""")
    # Keyed occurrences are unique: the database, not a check-then-insert, makes a replayed
    # session start or fault event count once, whichever worker sees it.
    execute(
        "CREATE UNIQUE INDEX alert_triggers_key_idx ON alert_triggers (device_id, rule, key)"
        " WHERE key IS NOT NULL"
    )
    execute("CREATE INDEX alert_triggers_runs_idx ON alert_triggers (device_id, rule, started_at)")
    execute("CREATE INDEX alert_triggers_alert_idx ON alert_triggers (alert_id)")
    execute("""
    CREATE TABLE brand_rule_thresholds (
        brand_id text NOT NULL REFERENCES brands(id),
        rule text NOT NULL,
        params jsonb NOT NULL,
        updated_at timestamptz NOT NULL DEFAULT now(),
        updated_by text NOT NULL,
        PRIMARY KEY (brand_id, rule)
    )""")
    execute("ALTER TABLE config_pushes ADD COLUMN superseded_at timestamptz")


def downgrade() -> None:
    execute("ALTER TABLE config_pushes DROP COLUMN superseded_at")
    for table in (
        "brand_rule_thresholds",
        "alert_triggers",
        "rule_reboots",
        "rule_sessions",
        "rule_samples",
    ):
        execute(f"DROP TABLE {table}")
