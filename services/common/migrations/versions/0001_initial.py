"""Initial schema: tenancy, devices, time series, sessions, alerts, mode tables, dead letters.

Time series (``samples`` and its minute/hour rollups) are stored one of three ways, chosen
here once and recorded in ``galvani_meta``:

* ``timescaledb``: hypertable, native compression, retention policy, continuous aggregates;
* ``timescaledb-apache`` (Debian's build): hypertable and ``time_bucket``; Galvani keeps
  rollup tables and drops old chunks itself (``galvani_refresh_rollups``,
  ``galvani_drop_old_samples``, run by the maintenance service);
* ``plain``: declarative range partitions by day and a ``time_bucket`` of our own with
  TimescaleDB's meaning, so every query is the same.
"""

from alembic import context

from services.common.migrations.ddl import execute, scalar

revision = "0001"
down_revision = None

DEVICE_ID_CHECK = "~ '^[a-z0-9][a-z0-9-]{2,63}$'"
BRAND_ID_CHECK = "~ '^[a-z0-9][a-z0-9-]{1,63}$'"
SEVERITIES = "('info', 'warning', 'critical')"
CONTRAINDICATIONS = "ARRAY['pacemaker','epilepsy','pregnancy','implant','skin_infection']"

# Per-bucket aggregates shared by the rollup tables and the continuous aggregates: the
# telemetry endpoints read min/avg/max of these columns whatever the storage.
ROLLUP_METRICS = ("i_ua", "i_set_ua", "v_v", "z_ohm", "t_elec_c", "t_batt_c", "batt_pct")
ROLLUP_SELECT = ",\n       ".join(
    ["count(*)::integer AS n", "(count(*) FILTER (WHERE out))::integer AS n_out"]
    + [
        f"min({m})::real AS {m}_min, avg({m})::real AS {m}_avg, max({m})::real AS {m}_max"
        for m in ROLLUP_METRICS
    ]
)
ROLLUP_COLUMNS = ",\n    ".join(
    ["n integer NOT NULL", "n_out integer NOT NULL"]
    + [f"{m}_{agg} real" for m in ROLLUP_METRICS for agg in ("min", "avg", "max")]
)
ROLLUPS = {"samples_1m": "1 minute", "samples_1h": "1 hour"}

RAW_RETENTION_DAYS = 90
PLAIN_PARTITIONS_BACK_DAYS = 35
PLAIN_PARTITIONS_AHEAD_DAYS = 7


def _choose_storage() -> str:
    requested = (
        context.config.attributes.get("storage")
        or context.get_x_argument(as_dictionary=True).get("storage")
        or "auto"
    )
    if requested not in ("auto", "plain"):
        raise ValueError(f"storage must be 'auto' or 'plain', not {requested!r}")
    if requested == "plain":
        return "plain"
    available = scalar("SELECT count(*) FROM pg_available_extensions WHERE name = 'timescaledb'")
    preloaded = "timescaledb" in str(scalar("SHOW shared_preload_libraries"))
    if not (available and preloaded):
        return "plain"
    execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
    license_ = str(scalar("SHOW timescaledb.license"))
    return "timescaledb" if license_ == "timescale" else "timescaledb-apache"


def upgrade() -> None:
    storage = _choose_storage()
    execute("CREATE TABLE galvani_meta (key text PRIMARY KEY, value text NOT NULL)")
    execute(f"INSERT INTO galvani_meta (key, value) VALUES ('storage', '{storage}')")
    _tenancy()
    _devices()
    _samples(storage)
    _messages()
    _sessions()
    _alerts()
    _mode_tables()
    _dead_letters()


def _tenancy() -> None:
    execute(f"""
    CREATE TABLE brands (
        id text PRIMARY KEY CHECK (id {BRAND_ID_CHECK}),
        name text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
        created_at timestamptz NOT NULL DEFAULT now()
    )""")
    # Keys are 256-bit random tokens: a SHA-256 digest is enough to store them safely (a slow
    # password hash protects low-entropy secrets, which these are not) and keeps lookups O(1).
    execute("""
    CREATE TABLE api_keys (
        id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        brand_id text REFERENCES brands(id),
        role text NOT NULL CHECK (role IN ('operator', 'admin', 'support', 'viewer')),
        name text NOT NULL,
        key_prefix text NOT NULL,
        key_hash bytea NOT NULL UNIQUE,
        created_at timestamptz NOT NULL DEFAULT now(),
        created_by uuid REFERENCES api_keys(id),
        revoked_at timestamptz,
        CHECK ((role = 'operator') = (brand_id IS NULL))
    )""")
    execute(f"""
    CREATE TABLE users (
        brand_id text NOT NULL REFERENCES brands(id),
        id text NOT NULL CHECK (length(id) BETWEEN 1 AND 128),
        stage text NOT NULL DEFAULT 'intro' CHECK (stage IN ('intro', 'maintenance')),
        contraindications text[] NOT NULL DEFAULT '{{}}'
            CHECK (contraindications <@ {CONTRAINDICATIONS}),
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (brand_id, id)
    )""")


def _devices() -> None:
    # Device ids are global: they name MQTT topics and broker accounts.
    execute(f"""
    CREATE TABLE devices (
        id text PRIMARY KEY CHECK (id {DEVICE_ID_CHECK}),
        brand_id text NOT NULL REFERENCES brands(id),
        model text NOT NULL CHECK (length(model) BETWEEN 1 AND 64),
        user_id text,
        credential_hash text,
        provisioned_at timestamptz NOT NULL DEFAULT now(),
        decommissioned_at timestamptz,
        online boolean NOT NULL DEFAULT false,
        presence_at timestamptz,
        last_seen timestamptz,
        last_received_at timestamptz,
        fw text,
        hw text,
        state_ts timestamptz,
        config_reported_version integer,
        config_reported_sha256 text,
        config_reported_status text CHECK (config_reported_status IN ('applied', 'rejected')),
        config_reported_reason text,
        config_desired_version integer,
        first_seq bigint,
        last_seq bigint,
        seq_count bigint NOT NULL DEFAULT 0,
        seq_gaps bigint NOT NULL DEFAULT 0 CHECK (seq_gaps >= 0),
        FOREIGN KEY (brand_id, user_id) REFERENCES users (brand_id, id)
    )""")
    execute("CREATE INDEX devices_brand_idx ON devices (brand_id, id)")
    execute(
        "CREATE INDEX devices_user_idx ON devices (brand_id, user_id) WHERE user_id IS NOT NULL"
    )


def _samples(storage: str) -> None:
    # One row per sample; (device_id, ts) is the idempotency key of telemetry, so a
    # redelivered batch stores once. It must contain the partitioning column (ts) for both
    # hypertables and declarative partitions, which it does.
    columns = """
        device_id text NOT NULL,
        ts timestamptz NOT NULL,
        seq bigint NOT NULL,
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
        ts_suspect boolean NOT NULL DEFAULT false,
        PRIMARY KEY (device_id, ts)"""
    if storage == "plain":
        execute(f"CREATE TABLE samples ({columns}) PARTITION BY RANGE (ts)")
        execute("CREATE TABLE samples_default PARTITION OF samples DEFAULT")
        _plain_functions()
        execute(
            "SELECT galvani_ensure_partitions("
            f"current_date - {PLAIN_PARTITIONS_BACK_DAYS}, "
            f"current_date + {PLAIN_PARTITIONS_AHEAD_DAYS})"
        )
    else:
        execute(f"CREATE TABLE samples ({columns})")
        execute("SELECT create_hypertable('samples', by_range('ts', INTERVAL '1 day'))")
    if storage == "timescaledb":
        _licensed_timescale()
    else:
        _rollup_tables(storage)
    execute(f"""
    INSERT INTO galvani_meta (key, value) VALUES
        ('raw_retention_days', '{RAW_RETENTION_DAYS}'),
        ('rollups_refreshed_to', '1970-01-01T00:00:00Z')""")


def _plain_functions() -> None:
    # TimescaleDB buckets timestamptz on an origin of Monday 2000-01-03 UTC; date_bin with that
    # origin gives the same buckets for the fixed-width intervals the API uses.
    execute("""
    CREATE FUNCTION time_bucket(bucket_width interval, ts timestamptz) RETURNS timestamptz
    LANGUAGE sql IMMUTABLE PARALLEL SAFE STRICT
    AS $$ SELECT date_bin(bucket_width, ts, TIMESTAMPTZ '2000-01-03 00:00:00+00') $$""")
    # Daily partitions. Rows with times outside the created range land in samples_default;
    # creating a partition later moves its rows out of the default first (PostgreSQL refuses
    # to attach a partition whose range the default partition already holds rows for).
    execute("""
    CREATE FUNCTION galvani_ensure_partitions(from_day date, to_day date) RETURNS integer
    LANGUAGE plpgsql AS $$
    DECLARE
        day date := from_day;
        name text;
        lo timestamptz;
        hi timestamptz;
        created integer := 0;
    BEGIN
        WHILE day <= to_day LOOP
            name := 'samples_p' || to_char(day, 'YYYYMMDD');
            lo := day::timestamp AT TIME ZONE 'UTC';
            hi := (day + 1)::timestamp AT TIME ZONE 'UTC';
            IF to_regclass(name) IS NULL THEN
                EXECUTE format('CREATE TABLE %I (LIKE samples INCLUDING DEFAULTS)', name);
                EXECUTE format(
                    'WITH moved AS (DELETE FROM samples_default WHERE ts >= %L AND ts < %L'
                    ' RETURNING *) INSERT INTO %I SELECT * FROM moved', lo, hi, name);
                EXECUTE format(
                    'ALTER TABLE samples ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                    name, lo, hi);
                created := created + 1;
            END IF;
            day := day + 1;
        END LOOP;
        RETURN created;
    END $$""")


def _rollup_tables(storage: str) -> None:
    for table in ROLLUPS:
        execute(f"""
        CREATE TABLE {table} (
            device_id text NOT NULL,
            bucket timestamptz NOT NULL,
            {ROLLUP_COLUMNS},
            PRIMARY KEY (device_id, bucket)
        )""")
    # Devices buffer while offline and ingest marks the hours that late samples touched, so
    # the refresh recomputes exactly those besides the recent window.
    execute("""
    CREATE TABLE rollup_dirty (
        device_id text NOT NULL,
        hour timestamptz NOT NULL,
        PRIMARY KEY (device_id, hour)
    )""")
    refill_minutes, refill_hours = (_refill(table, width) for table, width in ROLLUPS.items())
    execute(f"""
    CREATE FUNCTION galvani_refresh_rollups(from_ts timestamptz, to_ts timestamptz)
    RETURNS integer LANGUAGE plpgsql AS $$
    DECLARE
        lo timestamptz := time_bucket(INTERVAL '1 hour', from_ts);
        hi timestamptz := time_bucket(INTERVAL '1 hour', to_ts) + INTERVAL '1 hour';
        rows integer := 0;
        n integer;
    BEGIN
        -- Recompute whole hours: the recent window plus hours marked dirty by late data.
        CREATE TEMP TABLE IF NOT EXISTS _refresh (device_id text, hour timestamptz)
            ON COMMIT DROP;
        TRUNCATE _refresh;
        WITH dirty AS (DELETE FROM rollup_dirty RETURNING device_id, hour)
        INSERT INTO _refresh SELECT device_id, hour FROM dirty;
        INSERT INTO _refresh
            SELECT DISTINCT device_id, time_bucket(INTERVAL '1 hour', ts)
            FROM samples WHERE ts >= lo AND ts < hi;
        DELETE FROM samples_1m r USING _refresh d
            WHERE r.device_id = d.device_id
              AND r.bucket >= d.hour AND r.bucket < d.hour + INTERVAL '1 hour';
        DELETE FROM samples_1h r USING _refresh d
            WHERE r.device_id = d.device_id AND r.bucket = d.hour;
        {refill_minutes}
        GET DIAGNOSTICS n = ROW_COUNT;
        rows := rows + n;
        {refill_hours}
        GET DIAGNOSTICS n = ROW_COUNT;
        RETURN rows + n;
    END $$""")
    if storage == "plain":
        drop_body = """
        FOR part IN
            SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) AS bound
            FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
            WHERE i.inhparent = 'samples'::regclass AND c.relname ~ '^samples_p[0-9]{8}$'
        LOOP
            IF to_date(substr(part.relname, 10), 'YYYYMMDD') + 1
               <= (older_than AT TIME ZONE 'UTC')::date THEN
                EXECUTE format('DROP TABLE %I', part.relname);
                dropped := dropped + 1;
            END IF;
        END LOOP;
        DELETE FROM samples_default WHERE ts < older_than;"""
    else:
        drop_body = """
        SELECT count(*) INTO dropped FROM drop_chunks('samples', older_than => older_than);"""
    execute(f"""
    CREATE FUNCTION galvani_drop_old_samples(older_than timestamptz) RETURNS integer
    LANGUAGE plpgsql AS $$
    DECLARE
        dropped integer := 0;
        part record;
    BEGIN
        {drop_body}
        RETURN dropped;
    END $$""")
    if storage == "timescaledb-apache":
        # Debian's Apache-only build schedules a job-history retention job that needs the
        # Timescale license and so fails forever; stop scheduling it (superuser only).
        execute("""
        DO $$ BEGIN
            UPDATE _timescaledb_config.bgw_job SET scheduled = false
            WHERE proc_name = 'policy_job_stat_history_retention';
        EXCEPTION WHEN insufficient_privilege THEN NULL;
        END $$""")


def _refill(table: str, width: str) -> str:
    """The refresh's statement that recomputes one rollup for the hours listed in _refresh."""
    return f"""INSERT INTO {table}
            SELECT s.device_id, time_bucket(INTERVAL '{width}', s.ts) AS bucket,
                   {ROLLUP_SELECT}
            FROM samples s JOIN (SELECT DISTINCT device_id, hour FROM _refresh) d
              ON s.device_id = d.device_id
             AND s.ts >= d.hour AND s.ts < d.hour + INTERVAL '1 hour'
            GROUP BY 1, 2;"""


def _licensed_timescale() -> None:
    execute("""
    ALTER TABLE samples SET (timescaledb.compress,
        timescaledb.compress_segmentby = 'device_id', timescaledb.compress_orderby = 'ts')""")
    execute("SELECT add_compression_policy('samples', INTERVAL '7 days')")
    execute(f"SELECT add_retention_policy('samples', INTERVAL '{RAW_RETENTION_DAYS} days')")
    for table, width in ROLLUPS.items():
        execute(f"""
        CREATE MATERIALIZED VIEW {table} WITH (timescaledb.continuous) AS
        SELECT device_id, time_bucket(INTERVAL '{width}', ts) AS bucket,
               {ROLLUP_SELECT}
        FROM samples GROUP BY device_id, bucket WITH NO DATA""")
        execute(f"""
        SELECT add_continuous_aggregate_policy('{table}',
            start_offset => INTERVAL '7 days', end_offset => INTERVAL '{width}',
            schedule_interval => INTERVAL '{width}')""")


def _messages() -> None:
    # Events are few (a handful per session): a regular table, so (device_id, seq) can be
    # the primary key (a hypertable's unique keys must include its time column).
    execute("""
    CREATE TABLE events (
        device_id text NOT NULL,
        seq bigint NOT NULL,
        ts timestamptz NOT NULL,
        type text NOT NULL,
        session text,
        body jsonb NOT NULL,
        received_at timestamptz NOT NULL,
        ts_suspect boolean NOT NULL DEFAULT false,
        PRIMARY KEY (device_id, seq)
    )""")
    execute("CREATE INDEX events_device_ts_idx ON events (device_id, ts DESC)")
    execute("CREATE INDEX events_type_ts_idx ON events (type, ts DESC)")
    execute("""
    CREATE TABLE state_reports (
        device_id text NOT NULL,
        seq bigint NOT NULL,
        ts timestamptz NOT NULL,
        fw text,
        hw text,
        config_version integer,
        config_sha256 text,
        config_status text CHECK (config_status IN ('applied', 'rejected')),
        config_reason text,
        received_at timestamptz NOT NULL,
        PRIMARY KEY (device_id, seq)
    )""")
    # Presence has no seq (the broker publishes the last will), so it is a log, not a key.
    execute("""
    CREATE TABLE presence_log (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        device_id text NOT NULL,
        online boolean NOT NULL,
        ts timestamptz,
        received_at timestamptz NOT NULL
    )""")
    execute("CREATE INDEX presence_log_device_idx ON presence_log (device_id, received_at DESC)")


def _sessions() -> None:
    execute("""
    CREATE TABLE sessions (
        device_id text NOT NULL,
        session text NOT NULL,
        brand_id text NOT NULL REFERENCES brands(id),
        user_id text,
        mode text,
        level smallint,
        started_at timestamptz,
        ended_at timestamptz,
        duration_s real,
        end_reason text CHECK (end_reason IN ('completed', 'user_stopped', 'auto_shutoff',
                                              'fault', 'low_battery', 'no_contact')),
        output_s real NOT NULL DEFAULT 0,
        samples integer NOT NULL DEFAULT 0,
        gel_ok_samples integer NOT NULL DEFAULT 0,
        start_batt_pct smallint,
        updated_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (device_id, session)
    )""")
    execute("CREATE INDEX sessions_device_started_idx ON sessions (device_id, started_at DESC)")
    execute(
        "CREATE INDEX sessions_user_started_idx ON sessions (brand_id, user_id, started_at)"
        " WHERE user_id IS NOT NULL"
    )


def _alerts() -> None:
    execute(f"""
    CREATE TABLE alerts (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        brand_id text NOT NULL REFERENCES brands(id),
        device_id text NOT NULL REFERENCES devices(id),
        rule text NOT NULL,
        rule_version integer NOT NULL,
        severity text NOT NULL CHECK (severity IN {SEVERITIES}),
        state text NOT NULL DEFAULT 'open'
            CHECK (state IN ('open', 'acknowledged', 'resolved')),
        count integer NOT NULL DEFAULT 1 CHECK (count >= 1),
        first_seen timestamptz NOT NULL,
        last_seen timestamptz NOT NULL,
        explanation jsonb NOT NULL,
        acknowledged_at timestamptz,
        acknowledged_by text,
        resolved_at timestamptz,
        resolved_by text,
        resolution text,
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now(),
        CHECK (state <> 'resolved' OR resolved_at IS NOT NULL)
    )""")
    # At most one unresolved alert per (device, rule): the database decides, so concurrent
    # rule workers cannot both open one (INSERT ... ON CONFLICT against this index).
    execute(
        "CREATE UNIQUE INDEX alerts_one_open_idx ON alerts (device_id, rule)"
        " WHERE state <> 'resolved'"
    )
    execute("CREATE INDEX alerts_brand_idx ON alerts (brand_id, state, last_seen DESC)")
    execute("""
    CREATE TABLE alert_transitions (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        alert_id bigint NOT NULL REFERENCES alerts(id),
        from_state text,
        to_state text NOT NULL CHECK (to_state IN ('open', 'acknowledged', 'resolved')),
        actor text NOT NULL,
        at timestamptz NOT NULL DEFAULT now(),
        note text
    )""")
    execute("CREATE INDEX alert_transitions_alert_idx ON alert_transitions (alert_id, at)")


def _mode_tables() -> None:
    execute("""
    CREATE TABLE mode_tables (
        id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        brand_id text NOT NULL REFERENCES brands(id),
        name text NOT NULL,
        body jsonb NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now(),
        created_by text NOT NULL
    )""")
    execute("CREATE INDEX mode_tables_brand_idx ON mode_tables (brand_id, created_at DESC)")
    # Every table pushed to a device: the signed payload as published and the device's answer.
    # Versions strictly increase per device (protocol.md), which the key enforces.
    execute("""
    CREATE TABLE config_pushes (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        device_id text NOT NULL REFERENCES devices(id),
        version integer NOT NULL CHECK (version >= 1),
        mode_table_id uuid REFERENCES mode_tables(id),
        payload jsonb NOT NULL,
        sha256 text NOT NULL,
        reason text NOT NULL,
        source text NOT NULL CHECK (source IN ('rule', 'rollout', 'api')),
        source_ref text,
        issued_at timestamptz NOT NULL,
        expires_at timestamptz,
        published_at timestamptz,
        answer_status text CHECK (answer_status IN ('applied', 'rejected')),
        answer_reason text,
        answered_at timestamptz,
        UNIQUE (device_id, version)
    )""")


def _dead_letters() -> None:
    execute("""
    CREATE TABLE dead_letters (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        topic text NOT NULL,
        device_id text,
        channel text,
        payload bytea NOT NULL,
        payload_size integer NOT NULL,
        reason text NOT NULL,
        detail text NOT NULL,
        received_at timestamptz NOT NULL
    )""")
    execute("CREATE INDEX dead_letters_received_idx ON dead_letters (received_at DESC)")
    execute("CREATE INDEX dead_letters_device_idx ON dead_letters (device_id, received_at DESC)")


def downgrade() -> None:
    raise NotImplementedError("the initial schema has no downgrade: drop the database instead")
