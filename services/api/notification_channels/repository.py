"""A brand's notification channels and their notifications. Never commits: the request's unit
of work owns the transaction."""

from dataclasses import dataclass
from typing import Any, Final

import psycopg
from psycopg.rows import class_row, scalar_row
from psycopg.types.json import Jsonb

from services.api.notification_channels.schemas import (
    Channel,
    ChannelCreate,
    Delivery,
    QueuedNotification,
)
from services.api.repository import Repository

INSERT: Final = """
INSERT INTO notification_channels
  (brand_id, name, kind, url, secret_ciphertext, rules, min_severity, models, transitions,
   max_concurrency)
VALUES (%(brand)s, %(name)s, %(kind)s, %(url)s, %(secret)s, %(rules)s, %(min_severity)s,
        %(models)s, %(transitions)s, %(max_concurrency)s)
RETURNING id, name, kind, url, rules, min_severity, models, transitions, max_concurrency,
          created_at
"""
GET: Final = """
SELECT id, name, kind, url, rules, min_severity, models, transitions, max_concurrency,
       created_at
FROM notification_channels
WHERE id = %s AND brand_id = %s AND deleted_at IS NULL
"""
PAGE: Final = """
SELECT id, name, kind, url, rules, min_severity, models, transitions, max_concurrency,
       created_at
FROM notification_channels
WHERE brand_id = %(brand)s AND deleted_at IS NULL
  AND (%(after)s::bigint IS NULL OR id > %(after)s)
ORDER BY id LIMIT %(limit)s
"""
DELETE: Final = """
UPDATE notification_channels SET deleted_at = now()
WHERE id = %s AND brand_id = %s AND deleted_at IS NULL RETURNING id
"""
# Newest first on notifications_channel_idx (channel_id, id DESC).
DELIVERIES: Final = """
SELECT id, alert_id, transition, idempotency_key, status, attempts, next_attempt_at,
       last_error, last_status_code, created_at, delivered_at,
       (extract(epoch FROM delivered_at - created_at) * 1000)::float8 AS latency_ms
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
    """What the API stores for a new channel: the request, its checked URL and its
    encrypted secret."""

    request: ChannelCreate
    url: str
    secret_ciphertext: bytes


def idempotency_key(channel_id: int, alert_id: int | None, transition: str, change: int) -> str:
    """A notification's key, as migration 0014's trigger makes it."""
    return f"ntf_{channel_id}_{alert_id or 0}_{transition}_{change}"


class NotificationChannelRepository(Repository):
    """The brand's live (not deleted) channels, and what was sent to them."""

    def add(self, brand_id: str, channel: NewChannel) -> Channel:
        """Store a new channel."""
        body = channel.request
        params: dict[str, Any] = {
            "brand": brand_id,
            "name": body.name,
            "kind": body.kind,
            "url": channel.url,
            "secret": channel.secret_ciphertext,
            "rules": body.rules,
            "min_severity": body.min_severity.value,
            "models": body.models,
            "transitions": [t.value for t in body.transitions],
            "max_concurrency": body.max_concurrency,
        }
        row = self.one(INSERT, params, class_row(Channel))
        assert row is not None  # INSERT ... RETURNING returns the row
        return row

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
