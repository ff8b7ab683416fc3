"""Alert notifications: channels per brand and a transactional outbox of what to send them.

* ``notification_channels``: where a brand wants its alerts sent (``kind``: only ``webhook``
  for now), the HMAC secret encrypted (``services/common/secret_box.py``), and the filter: the
  rules (NULL: every rule), the lowest severity, the devices' models (NULL: every model) and
  the transitions it is told of. A deleted channel keeps its row (``deleted_at``), so its
  delivery log still names it.
* ``notifications``: the outbox. One row per (channel, alert, transition, change), written by
  ``galvani_alert_outbox`` in the very transaction that changes the alert, whoever changes it
  (the rules worker, the API's acknowledge and resolve): the notification exists exactly when
  the transition committed. ``alert_change`` is the alert's ``change_seq`` at the transition
  (taken by the BEFORE trigger of migration 0005, so the AFTER trigger sees it), which orders
  one alert's notifications; ``idempotency_key`` names the delivery the receiver may see more
  than once. The dispatcher (``services/notify``) reads pending rows by ``next_attempt_at``.
* ``galvani_alert_outbox``: AFTER INSERT (``opened``) and AFTER UPDATE (state became
  ``acknowledged`` or ``resolved``, else ``count`` rose: ``count_raised``; any other change
  writes nothing) on alerts. It runs as its owner (SECURITY DEFINER with a fixed
  ``search_path``, set by ``grants.apply``), so the roles that change alerts need no grant on
  the channels or the outbox. The UPDATE trigger's WHEN clause skips the updates that can
  never notify (``last_seen`` only, a merge lowering ``count``) without calling the function.
* ``galvani_notification_queued``: ``pg_notify('galvani_notifications', '')`` after each new
  outbox row, delivered at commit (never for a rollback, and once per transaction: PostgreSQL
  folds identical notifications of one transaction), so a dispatcher listening wakes at once
  instead of waiting for its next poll.
"""

from services.common.migrations.ddl import execute

revision = "0014"
down_revision = "0013"

# RFC 3339 in UTC, whatever the session's TimeZone: jsonb renders a timestamptz in the
# session's zone, and the payload must not depend on who changed the alert.
_UTC = '\'YYYY-MM-DD"T"HH24:MI:SS.US"Z"\''


def _rfc3339(expression: str) -> str:
    return f"to_char({expression} AT TIME ZONE 'UTC', {_UTC})"


def upgrade() -> None:
    execute("""
    CREATE TABLE notification_channels (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        brand_id text NOT NULL REFERENCES brands (id),
        name text NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
        kind text NOT NULL CHECK (kind IN ('webhook')),
        url text NOT NULL,
        secret_ciphertext bytea NOT NULL,
        rules text[],
        min_severity text NOT NULL DEFAULT 'info'
            CHECK (min_severity IN ('info', 'warning', 'critical')),
        models text[],
        transitions text[] NOT NULL DEFAULT '{opened,count_raised,acknowledged,resolved}'
            CHECK (transitions <@ '{opened,count_raised,acknowledged,resolved}'::text[]),
        max_concurrency integer NOT NULL DEFAULT 4 CHECK (max_concurrency BETWEEN 1 AND 64),
        created_at timestamptz NOT NULL DEFAULT now(),
        deleted_at timestamptz
    )""")
    # The trigger's lookup on every alert change: a brand's live channels.
    execute(
        "CREATE INDEX notification_channels_brand_idx ON notification_channels (brand_id)"
        " WHERE deleted_at IS NULL"
    )
    execute("""
    CREATE TABLE notifications (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        channel_id bigint NOT NULL REFERENCES notification_channels (id),
        brand_id text NOT NULL REFERENCES brands (id),
        alert_id bigint REFERENCES alerts (id),
        transition text NOT NULL
            CHECK (transition IN ('opened', 'count_raised', 'acknowledged', 'resolved', 'test')),
        alert_change bigint NOT NULL,
        idempotency_key text NOT NULL UNIQUE,
        payload jsonb NOT NULL,
        status text NOT NULL DEFAULT 'pending'
            CHECK (status IN ('pending', 'delivered', 'failed')),
        attempts integer NOT NULL DEFAULT 0,
        next_attempt_at timestamptz NOT NULL DEFAULT now(),
        last_error text,
        last_status_code integer,
        created_at timestamptz NOT NULL DEFAULT now(),
        delivered_at timestamptz,
        CHECK (status <> 'delivered' OR delivered_at IS NOT NULL)
    )""")
    # The dispatcher's queue (pending rows by due time), the per-alert order lookup, and the
    # delivery log of a channel, newest first.
    execute(
        "CREATE INDEX notifications_due_idx ON notifications (next_attempt_at)"
        " WHERE status = 'pending'"
    )
    execute(
        "CREATE INDEX notifications_alert_idx ON notifications (channel_id, alert_id, alert_change)"
        " WHERE status = 'pending'"
    )
    execute("CREATE INDEX notifications_channel_idx ON notifications (channel_id, id DESC)")
    execute(f"""
    CREATE FUNCTION galvani_alert_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
        change_kind text;
        device_model text;
    BEGIN
        IF TG_OP = 'INSERT' THEN
            change_kind := 'opened';
        ELSIF NEW.state IS DISTINCT FROM OLD.state AND NEW.state = 'acknowledged' THEN
            change_kind := 'acknowledged';
        ELSIF NEW.state IS DISTINCT FROM OLD.state AND NEW.state = 'resolved' THEN
            change_kind := 'resolved';
        ELSIF NEW.count > OLD.count THEN
            change_kind := 'count_raised';
        ELSE
            RETURN NULL;
        END IF;
        SELECT d.model INTO device_model FROM devices d WHERE d.id = NEW.device_id;
        INSERT INTO notifications
            (channel_id, brand_id, alert_id, transition, alert_change, idempotency_key, payload)
        SELECT c.id, NEW.brand_id, NEW.id, change_kind, NEW.change_seq, k.key,
               jsonb_build_object(
                   'v', 1,
                   'idempotency_key', k.key,
                   'event', 'alert.' || change_kind,
                   'occurred_at', {_rfc3339("now()")},
                   'brand', NEW.brand_id,
                   'alert', jsonb_build_object(
                       'id', NEW.id,
                       'device_id', NEW.device_id,
                       'model', device_model,
                       'rule', NEW.rule,
                       'rule_version', NEW.rule_version,
                       'severity', NEW.severity,
                       'state', NEW.state,
                       'count', NEW.count,
                       'first_seen', {_rfc3339("NEW.first_seen")},
                       'last_seen', {_rfc3339("NEW.last_seen")},
                       'explanation', NEW.explanation,
                       'acknowledged_by', NEW.acknowledged_by,
                       'resolved_by', NEW.resolved_by,
                       'resolution', NEW.resolution),
                   'dashboard_url', NULL)
        FROM notification_channels c
        CROSS JOIN LATERAL (SELECT 'ntf_' || c.id || '_' || NEW.id || '_' || change_kind || '_'
                                   || NEW.change_seq AS key) k
        WHERE c.brand_id = NEW.brand_id
          AND c.deleted_at IS NULL
          AND change_kind = ANY (c.transitions)
          AND (c.rules IS NULL OR NEW.rule = ANY (c.rules))
          AND (c.models IS NULL OR device_model = ANY (c.models))
          AND array_position('{{info,warning,critical}}'::text[], NEW.severity)
              >= array_position('{{info,warning,critical}}'::text[], c.min_severity)
        ORDER BY c.id
        ON CONFLICT (idempotency_key) DO NOTHING;
        RETURN NULL;
    END $$""")
    execute("""
    CREATE TRIGGER alerts_outbox_opened AFTER INSERT ON alerts
        FOR EACH ROW EXECUTE FUNCTION galvani_alert_outbox()""")
    execute("""
    CREATE TRIGGER alerts_outbox_changed AFTER UPDATE ON alerts
        FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state OR NEW.count > OLD.count)
        EXECUTE FUNCTION galvani_alert_outbox()""")
    execute("""
    CREATE FUNCTION galvani_notification_queued() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('galvani_notifications', '');
        RETURN NULL;
    END $$""")
    execute("""
    CREATE TRIGGER notifications_queued AFTER INSERT ON notifications
        FOR EACH ROW EXECUTE FUNCTION galvani_notification_queued()""")


def downgrade() -> None:
    execute("DROP TRIGGER notifications_queued ON notifications")
    execute("DROP FUNCTION galvani_notification_queued()")
    execute("DROP TRIGGER alerts_outbox_changed ON alerts")
    execute("DROP TRIGGER alerts_outbox_opened ON alerts")
    execute("DROP FUNCTION galvani_alert_outbox()")
    execute("DROP TABLE notifications")
    execute("DROP TABLE notification_channels")
