"""Notification channels of every kind, quiet hours, and the dispatcher's lease.

* ``notification_channels.kind``: ``webhook``, ``slack``, ``pagerduty`` or ``email``. What
  ``url`` and ``secret_ciphertext`` (Fernet, ``services/common/secret_box.py``) hold depends on
  it: a webhook's target and its HMAC key (``whsec_…``); for Slack a masked display form of
  the incoming-webhook URL and the real URL (the secret); for PagerDuty the Events API v2
  endpoint and the routing key; for e-mail neither (both NULL) but ``recipients`` (1 to 20
  addresses). The CHECKs tie each column's presence to the kind.
* Quiet hours: ``quiet_hours_start``, ``quiet_hours_end`` (local times, different; a window
  with start after end wraps past midnight) and ``quiet_hours_time_zone`` (an IANA name), all
  three or none. The zone must be one PostgreSQL's tz database knows (a CHECK converts a time
  with it), so the outbox trigger can never fail an alert's transition on a bad zone.
* ``notifications.held_until``: set by ``galvani_alert_outbox`` when a channel's quiet hours
  held back a notification that is not ``critical``: ``next_attempt_at`` is the same instant,
  the end of the window (the channel's local end time, the next day's when now is before
  midnight in a wrapping window). ``critical`` is never held, nor a test notification (the
  API writes those, not the trigger). The payload carries it too (``held_until``, RFC 3339 in
  UTC, or null).
* ``notifications.leased_until``: the dispatcher's claim of a row, cleared when it records
  the outcome; a pending row with ``leased_until > now()`` is in flight. Counting those per
  channel (``notifications_leased_idx``) is the channel's in-flight count across every
  dispatcher.
* ``galvani_alert_outbox`` is replaced by the same function with quiet hours. CREATE OR
  REPLACE keeps its grants but resets SECURITY DEFINER and its ``search_path``;
  ``grants.apply``, which runs after every upgrade, sets them again.
"""

from services.common.migrations.ddl import execute

revision = "0015"
down_revision = "0014"

# RFC 3339 in UTC, whatever the session's TimeZone (as in migration 0014).
_UTC = '\'YYYY-MM-DD"T"HH24:MI:SS.US"Z"\''


def _rfc3339(expression: str) -> str:
    return f"to_char({expression} AT TIME ZONE 'UTC', {_UTC})"


# The end of the quiet window the channel's local time is in, as a timestamptz; NULL when the
# alert is critical, the channel has no quiet hours, or its local time is outside them. The
# local date plus the end time, a day later when that is not after now (before midnight in a
# window that wraps it); a local end time a DST change skips is read as PostgreSQL reads any
# such time (shifted by the gap).
_HELD_UNTIL = """
    CASE WHEN NEW.severity <> 'critical' AND c.quiet_hours_start IS NOT NULL
              AND CASE WHEN c.quiet_hours_start < c.quiet_hours_end
                       THEN l.local_now::time >= c.quiet_hours_start
                            AND l.local_now::time < c.quiet_hours_end
                       ELSE l.local_now::time >= c.quiet_hours_start
                            OR l.local_now::time < c.quiet_hours_end END
         THEN (l.local_now::date + c.quiet_hours_end
               + CASE WHEN l.local_now::time >= c.quiet_hours_end
                      THEN interval '1 day' ELSE interval '0' END)
              AT TIME ZONE c.quiet_hours_time_zone
    END"""


def _outbox_function(quiet_hours: bool) -> str:
    """``galvani_alert_outbox``: with quiet hours (this migration) or as migration 0014 made
    it (its downgrade)."""
    held = (
        f"""
        CROSS JOIN LATERAL (SELECT now() AT TIME ZONE c.quiet_hours_time_zone AS local_now) l
        CROSS JOIN LATERAL (SELECT {_HELD_UNTIL} AS held_until) h"""
        if quiet_hours
        else ""
    )
    columns = ", held_until, next_attempt_at" if quiet_hours else ""
    values = ", h.held_until, coalesce(h.held_until, now())" if quiet_hours else ""
    held_key = (
        f"""
                   'held_until', {_rfc3339("h.held_until")},"""
        if quiet_hours
        else ""
    )
    return f"""
    CREATE OR REPLACE FUNCTION galvani_alert_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
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
            (channel_id, brand_id, alert_id, transition, alert_change, idempotency_key,
             payload{columns})
        SELECT c.id, NEW.brand_id, NEW.id, change_kind, NEW.change_seq, k.key,
               jsonb_build_object(
                   'v', 1,
                   'idempotency_key', k.key,
                   'event', 'alert.' || change_kind,
                   'occurred_at', {_rfc3339("now()")},{held_key}
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
                   'dashboard_url', NULL){values}
        FROM notification_channels c
        CROSS JOIN LATERAL (SELECT 'ntf_' || c.id || '_' || NEW.id || '_' || change_kind || '_'
                                   || NEW.change_seq AS key) k{held}
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
    END $$"""


def upgrade() -> None:
    execute("""
    ALTER TABLE notification_channels
        DROP CONSTRAINT notification_channels_kind_check,
        ADD CONSTRAINT notification_channels_kind_check
            CHECK (kind IN ('webhook', 'slack', 'pagerduty', 'email')),
        ALTER COLUMN url DROP NOT NULL,
        ALTER COLUMN secret_ciphertext DROP NOT NULL,
        ADD COLUMN recipients text[]
            CHECK (cardinality(recipients) BETWEEN 1 AND 20),
        ADD COLUMN quiet_hours_start time,
        ADD COLUMN quiet_hours_end time,
        ADD COLUMN quiet_hours_time_zone text,
        ADD CONSTRAINT notification_channels_time_zone_check
            CHECK (('2000-01-01 00:00'::timestamp AT TIME ZONE quiet_hours_time_zone) IS NOT NULL
                   OR quiet_hours_time_zone IS NULL),
        ADD CONSTRAINT notification_channels_quiet_hours_check
            CHECK ((quiet_hours_start IS NULL) = (quiet_hours_end IS NULL)
                   AND (quiet_hours_start IS NULL) = (quiet_hours_time_zone IS NULL)
                   AND quiet_hours_start <> quiet_hours_end),
        ADD CONSTRAINT notification_channels_email_recipients_check
            CHECK ((kind = 'email') = (recipients IS NOT NULL)),
        ADD CONSTRAINT notification_channels_email_url_check
            CHECK ((kind = 'email') = (url IS NULL)),
        ADD CONSTRAINT notification_channels_email_secret_check
            CHECK ((kind = 'email') = (secret_ciphertext IS NULL))""")
    execute("""
    ALTER TABLE notifications
        ADD COLUMN held_until timestamptz,
        ADD COLUMN leased_until timestamptz""")
    execute(
        "CREATE INDEX notifications_leased_idx ON notifications (channel_id)"
        " WHERE leased_until IS NOT NULL"
    )
    execute(_outbox_function(quiet_hours=True))


def downgrade() -> None:
    execute(_outbox_function(quiet_hours=False))
    execute("DROP INDEX notifications_leased_idx")
    execute("ALTER TABLE notifications DROP COLUMN leased_until, DROP COLUMN held_until")
    # What 0014 cannot hold goes: the channels of the new kinds and what was queued for them.
    execute("""
    DELETE FROM notifications WHERE channel_id IN
        (SELECT id FROM notification_channels WHERE kind <> 'webhook')""")
    execute("DELETE FROM notification_channels WHERE kind <> 'webhook'")
    execute("""
    ALTER TABLE notification_channels
        DROP CONSTRAINT notification_channels_email_secret_check,
        DROP CONSTRAINT notification_channels_email_url_check,
        DROP CONSTRAINT notification_channels_email_recipients_check,
        DROP CONSTRAINT notification_channels_quiet_hours_check,
        DROP CONSTRAINT notification_channels_time_zone_check,
        DROP COLUMN quiet_hours_time_zone,
        DROP COLUMN quiet_hours_end,
        DROP COLUMN quiet_hours_start,
        DROP COLUMN recipients,
        ALTER COLUMN secret_ciphertext SET NOT NULL,
        ALTER COLUMN url SET NOT NULL,
        DROP CONSTRAINT notification_channels_kind_check,
        ADD CONSTRAINT notification_channels_kind_check CHECK (kind IN ('webhook'))""")
