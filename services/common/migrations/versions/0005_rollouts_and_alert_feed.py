"""Rollouts of mode tables, and the feed of alert changes behind ``GET /v1/alerts/stream``.

* ``rollouts``: a brand's mode table pushed to a set of its devices, optionally to a canary
  share first. ``status`` is what the rollout does now: ``canary`` (the canary devices have
  the table, the rest wait for a promotion), ``running`` (every target has it), ``paused``
  (from ``paused_from``; by a person or by the canary guard, ``status_reason`` says which),
  ``aborted``.
* ``rollout_devices``: the targets, fixed when the rollout is created, and the version each
  was pushed (``NULL`` until then). Progress joins ``config_pushes`` for the device's answer.
* ``alerts.change_seq``: a number taken from a sequence on every insert and update, so a
  stream client that reconnects with ``Last-Event-ID`` gets the alerts changed since. After
  each change, ``pg_notify('galvani_alerts', …)`` tells listening API processes which alert
  changed; PostgreSQL delivers it when the transaction commits, and not at all on rollback.
"""

from services.common.migrations.ddl import execute

revision = "0005"
down_revision = "0004"


def upgrade() -> None:
    execute("""
    CREATE TABLE rollouts (
        id uuid PRIMARY KEY,
        brand_id text NOT NULL REFERENCES brands(id),
        mode_table_id uuid NOT NULL REFERENCES mode_tables(id),
        target jsonb NOT NULL,
        canary_share double precision CHECK (canary_share > 0 AND canary_share < 1),
        status text NOT NULL CHECK (status IN ('canary', 'running', 'paused', 'aborted')),
        paused_from text CHECK (paused_from IN ('canary', 'running')),
        status_reason text,
        expires_at timestamptz,
        created_at timestamptz NOT NULL DEFAULT now(),
        created_by text NOT NULL,
        updated_at timestamptz NOT NULL DEFAULT now(),
        canary_started_at timestamptz,
        fleet_started_at timestamptz,
        CHECK ((status = 'paused') = (paused_from IS NOT NULL))
    )""")
    execute("CREATE INDEX rollouts_brand_idx ON rollouts (brand_id, created_at DESC, id DESC)")
    execute("CREATE INDEX rollouts_canary_idx ON rollouts (status) WHERE status = 'canary'")
    execute("""
    CREATE TABLE rollout_devices (
        rollout_id uuid NOT NULL REFERENCES rollouts(id),
        device_id text NOT NULL REFERENCES devices(id),
        canary boolean NOT NULL,
        version integer,
        PRIMARY KEY (rollout_id, device_id),
        FOREIGN KEY (device_id, version) REFERENCES config_pushes (device_id, version)
    )""")
    execute("CREATE INDEX rollout_devices_device_idx ON rollout_devices (device_id)")

    execute("CREATE SEQUENCE alert_changes")
    execute("ALTER TABLE alerts ADD COLUMN change_seq bigint")
    execute("UPDATE alerts SET change_seq = nextval('alert_changes')")
    execute("ALTER TABLE alerts ALTER COLUMN change_seq SET NOT NULL")
    execute("CREATE INDEX alerts_change_idx ON alerts (brand_id, change_seq)")
    execute("""
    CREATE FUNCTION galvani_alert_changed() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        NEW.change_seq := nextval('alert_changes');
        RETURN NEW;
    END $$""")
    execute("""
    CREATE TRIGGER alerts_change_seq BEFORE INSERT OR UPDATE ON alerts
        FOR EACH ROW EXECUTE FUNCTION galvani_alert_changed()""")
    execute("""
    CREATE FUNCTION galvani_alert_notify() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('galvani_alerts', json_build_object(
            'id', NEW.id, 'brand', NEW.brand_id, 'seq', NEW.change_seq)::text);
        RETURN NULL;
    END $$""")
    execute("""
    CREATE TRIGGER alerts_notify AFTER INSERT OR UPDATE ON alerts
        FOR EACH ROW EXECUTE FUNCTION galvani_alert_notify()""")


def downgrade() -> None:
    execute("DROP TRIGGER alerts_notify ON alerts")
    execute("DROP FUNCTION galvani_alert_notify()")
    execute("DROP TRIGGER alerts_change_seq ON alerts")
    execute("DROP FUNCTION galvani_alert_changed()")
    execute("ALTER TABLE alerts DROP COLUMN change_seq")
    execute("DROP SEQUENCE alert_changes")
    execute("DROP TABLE rollout_devices")
    execute("DROP TABLE rollouts")
