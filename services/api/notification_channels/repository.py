"""A brand's notification channels and their notifications. Never commits: the request's unit
of work owns the transaction."""

from dataclasses import dataclass
from typing import Any, Final

import psycopg
from psycopg import sql
from psycopg.rows import class_row, scalar_row
from psycopg.types.json import Jsonb

from services.api.notification_channels.schemas import (
    Channel,
    ChannelCreate,
    Delivery,
    EmailChannelCreate,
    QueuedNotification,
    QuietHours,
)
from services.api.repository import Repository
from services.common.errors import GalvaniError

# A channel as the API shows it: quiet hours as one object (HH:MM in their zone) or null.
COLUMNS: Final = """
id, name, kind, url, recipients, rules, min_severity, models, transitions, max_concurrency,
CASE WHEN quiet_hours_start IS NOT NULL THEN jsonb_build_object(
    'start', to_char(quiet_hours_start, 'HH24:MI'),
    'end', to_char(quiet_hours_end, 'HH24:MI'),
    'time_zone', quiet_hours_time_zone) END AS quiet_hours,
created_at
"""
# Creates of one brand's channels wait for each other (a transaction-scoped advisory lock),
# so two at once cannot both pass the count at the limit.
LOCK_BRAND: Final = (
    "SELECT pg_advisory_xact_lock(hashtextextended('galvani-notification-channels:' || %s, 0))"
)
LIVE_COUNT: Final = """
SELECT count(*) FROM notification_channels WHERE brand_id = %s AND deleted_at IS NULL
"""
INSERT: Final = f"""
INSERT INTO notification_channels
  (brand_id, name, kind, url, secret_ciphertext, recipients, rules, min_severity, models,
   transitions, max_concurrency, quiet_hours_start, quiet_hours_end, quiet_hours_time_zone)
VALUES (%(brand)s, %(name)s, %(kind)s, %(url)s, %(secret)s, %(recipients)s, %(rules)s,
        %(min_severity)s, %(models)s, %(transitions)s, %(max_concurrency)s,
        %(quiet_start)s, %(quiet_end)s, %(quiet_zone)s)
RETURNING {COLUMNS}
"""  # noqa: S608 - a constant column list
GET: Final = f"""
SELECT {COLUMNS}
FROM notification_channels
WHERE id = %s AND brand_id = %s AND deleted_at IS NULL
"""  # noqa: S608 - a constant column list
# The channel a PATCH changes, locked until the request's transaction ends.
GET_FOR_UPDATE: Final = GET + "FOR UPDATE"
PAGE: Final = f"""
SELECT {COLUMNS}
FROM notification_channels
WHERE brand_id = %(brand)s AND deleted_at IS NULL
  AND (%(after)s::bigint IS NULL OR id > %(after)s)
ORDER BY id LIMIT %(limit)s
"""  # noqa: S608 - a constant column list
DELETE: Final = """
UPDATE notification_channels SET deleted_at = now()
WHERE id = %s AND brand_id = %s AND deleted_at IS NULL RETURNING id
"""
# Newest first on notifications_channel_idx (channel_id, id DESC).
DELIVERIES: Final = """
SELECT id, alert_id, transition, idempotency_key, status, attempts, next_attempt_at,
       held_until, last_error, last_status_code, created_at, delivered_at,
       (extract(epoch FROM delivered_at - coalesce(held_until, created_at)) * 1000)::float8
           AS latency_ms
FROM notifications
WHERE channel_id = %(channel)s AND brand_id = %(brand)s
  AND (%(status)s::text IS NULL OR status = %(status)s)
  AND (%(before)s::bigint IS NULL OR id < %(before)s)
ORDER BY id DESC LIMIT %(limit)s
"""
INSERT_TEST: Final = """
INSERT INTO notifications
  (channel_id, brand_id, alert_id, transition, alert_change, idempotency_key, payload)
VALUES (%(channel)s, %(brand)s, NULL, 'test', %(change)s, %(key)s, %(payload)s)
RETURNING id, idempotency_key, status
"""
# A test notification's alert_change: microseconds since the epoch, so test notifications of
# a channel are in time order; two in the same microsecond take the next one.
NEXT_TEST_CHANGE: Final = "SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint"
TEST_KEY_ATTEMPTS: Final = 5


@dataclass(frozen=True)
class NewChannel:
    """What the API stores for a new channel: the request, what its ``url`` column shows
    (None for e-mail) and its encrypted secret (None for e-mail)."""

    request: ChannelCreate
    url: str | None
    secret_ciphertext: bytes | None


class ChannelLimitReached(GalvaniError):
    """The brand has as many live channels as it may."""


# What a PATCH may set (the endpoint names them; nothing else reaches the SQL).
UPDATABLE: Final = frozenset(
    {
        "name",
        "url",
        "secret_ciphertext",
        "recipients",
        "rules",
        "min_severity",
        "models",
        "transitions",
        "max_concurrency",
        "quiet_hours_start",
        "quiet_hours_end",
        "quiet_hours_time_zone",
    }
)


def idempotency_key(channel_id: int, alert_id: int | None, transition: str, change: int) -> str:
    """A notification's key, as migration 0014's trigger makes it."""
    return f"ntf_{channel_id}_{alert_id or 0}_{transition}_{change}"


def quiet_hours_columns(quiet_hours: QuietHours | None) -> dict[str, str | None]:
    """The three quiet-hours columns of ``quiet_hours`` (all None for none)."""
    if quiet_hours is None:
        return dict.fromkeys(("quiet_hours_start", "quiet_hours_end", "quiet_hours_time_zone"))
    return {
        "quiet_hours_start": quiet_hours.start,
        "quiet_hours_end": quiet_hours.end,
        "quiet_hours_time_zone": quiet_hours.time_zone,
    }


class NotificationChannelRepository(Repository):
    """The brand's live (not deleted) channels, and what was sent to them."""

    def add(self, brand_id: str, channel: NewChannel, *, limit: int) -> Channel:
        """Store a new channel, or raise :class:`ChannelLimitReached` when the brand has
        ``limit`` live channels already."""
        self.conn.execute(LOCK_BRAND, [brand_id])
        row = self.one(LIVE_COUNT, [brand_id], scalar_row)
        if row is not None and int(row) >= limit:
            raise ChannelLimitReached(
                f"a brand may have at most {limit} notification channels and this one has "
                f"{row}: delete one it no longer needs first"
            )
        body = channel.request
        quiet = quiet_hours_columns(body.quiet_hours)
        params: dict[str, Any] = {
            "brand": brand_id,
            "name": body.name,
            "kind": body.kind,
            "url": channel.url,
            "secret": channel.secret_ciphertext,
            "recipients": list(body.recipients) if isinstance(body, EmailChannelCreate) else None,
            "rules": body.rules,
            "min_severity": body.min_severity.value,
            "models": body.models,
            "transitions": [t.value for t in body.transitions],
            "max_concurrency": body.max_concurrency,
            "quiet_start": quiet["quiet_hours_start"],
            "quiet_end": quiet["quiet_hours_end"],
            "quiet_zone": quiet["quiet_hours_time_zone"],
        }
        made = self.one(INSERT, params, class_row(Channel))
        assert made is not None  # INSERT ... RETURNING returns the row
        return made

    def get_for_update(self, brand_id: str, channel_id: int) -> Channel | None:
        """The brand's live channel, locked until the request's transaction ends."""
        return self.one(GET_FOR_UPDATE, [channel_id, brand_id], class_row(Channel))

    def update(self, brand_id: str, channel_id: int, columns: dict[str, Any]) -> Channel | None:
        """Set ``columns`` (names of :data:`UPDATABLE`) of the brand's live channel; what is
        already queued for it keeps its schedule."""
        unknown = set(columns) - UPDATABLE
        if unknown:
            raise ValueError(f"not columns a channel's update sets: {sorted(unknown)}")
        assignments = sql.SQL(", ").join(
            sql.SQL("{} = {}").format(sql.Identifier(name), sql.Placeholder(name))
            for name in columns
        )
        query = sql.SQL(
            "UPDATE notification_channels SET {} WHERE id = %(id)s AND brand_id = %(brand)s"
            " AND deleted_at IS NULL RETURNING {}"
        ).format(assignments, sql.SQL(COLUMNS))
        params = {**columns, "id": channel_id, "brand": brand_id}
        return self.conn.cursor(row_factory=class_row(Channel)).execute(query, params).fetchone()

    def get(self, brand_id: str, channel_id: int) -> Channel | None:
        """The brand's channel, or None (another brand's, or a deleted one, too)."""
        return self.one(GET, [channel_id, brand_id], class_row(Channel))

    def page(self, brand_id: str, *, after_id: int | None, limit: int) -> list[Channel]:
        """The brand's channels in id order, after ``after_id``."""
        params = {"brand": brand_id, "after": after_id, "limit": limit}
        return self.all(PAGE, params, class_row(Channel))

    def delete(self, brand_id: str, channel_id: int) -> bool:
        """Mark the channel deleted (its notifications stay); False if the brand has no such
        live channel."""
        return self.conn.execute(DELETE, [channel_id, brand_id]).fetchone() is not None

    def deliveries(
        self,
        brand_id: str,
        channel_id: int,
        *,
        status: str | None,
        before_id: int | None,
        limit: int,
    ) -> list[Delivery]:
        """The channel's notifications, newest first, before ``before_id``."""
        params = {
            "channel": channel_id,
            "brand": brand_id,
            "status": status,
            "before": before_id,
            "limit": limit,
        }
        return self.all(DELIVERIES, params, class_row(Delivery))

    def queue_test(
        self, brand_id: str, channel_id: int, payload: dict[str, Any]
    ) -> QueuedNotification:
        """Queue a test notification (``payload`` without its key, which this adds) for the
        dispatcher, in the request's transaction."""
        row = self.one(NEXT_TEST_CHANGE, [], scalar_row)
        assert row is not None
        change: int = row
        for _ in range(TEST_KEY_ATTEMPTS):
            key = idempotency_key(channel_id, None, "test", change)
            params = {
                "channel": channel_id,
                "brand": brand_id,
                "change": change,
                "key": key,
                "payload": Jsonb({**payload, "idempotency_key": key}),
            }
            try:
                with self.conn.transaction():  # a savepoint: a taken key leaves the rest
                    queued = self.one(INSERT_TEST, params, class_row(QueuedNotification))
            except psycopg.errors.UniqueViolation:
                change += 1
                continue
            assert queued is not None
            return queued
        raise RuntimeError("no free idempotency key for a test notification")
