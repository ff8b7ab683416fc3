"""Devices reported offline when they go silent, and online again when heard from.

A device's ``online`` follows its ``presence`` messages: ``online: true`` on connect, the
retained last will ``online: false`` that the broker publishes when the connection dies. A
broker killed -9 (Mosquitto, or the NATS node holding the connection) never publishes the
wills of the devices it held; devices that reconnect say ``online`` again, but one that never
comes back would stay online forever. An idle device sends a telemetry sample a minute (the
protocol's heartbeat), so a device from which nothing was received for ``silent_after_s`` is
marked offline here, with ``silent_since``, and a ``presence_log`` row as a will is logged
(``ts`` NULL). Ingest clears ``silent_since`` when the device's presence wins; a message
received after the mark (ingest catching up on a backlog) revives the device here.

The guard: when no device at all was heard within ``silent_after_s``, nothing is marked. That
is an outage of ours (ingest down or stalled, the database just restored), not a fleet gone
silent, and marking would report every device offline.
"""

from typing import Final, NamedTuple

from psycopg.rows import args_row

from services.common.db import Conn

# Five missed heartbeats (an idle device sends a telemetry sample a minute).
DEFAULT_SILENT_AFTER_S: Final = 300.0
# The least silence that may count: one heartbeat period, or an idle device between two
# heartbeats would be reported offline.
MIN_SILENT_AFTER_S: Final = 60.0

# Whether anything was received from any device within the window.
_HEARD_RECENTLY: Final = """
SELECT EXISTS (
    SELECT 1 FROM devices WHERE last_received_at >= now() - make_interval(secs => %(after)s)
)"""

# The rows are locked first, in id order as ingest locks them, skipping any a transaction
# holds: maintenance never waits on ingest (so the two cannot deadlock), and a device whose
# row ingest holds is being heard from right now. The condition is checked again on the
# locked row's newest version.
_MARK_SILENT: Final = """
WITH candidates AS (
    SELECT id FROM devices
    WHERE online AND last_received_at < now() - make_interval(secs => %(after)s)
    ORDER BY id FOR NO KEY UPDATE SKIP LOCKED
), marked AS (
    UPDATE devices d SET online = false, silent_since = now()
    FROM candidates c
    WHERE d.id = c.id
      AND d.online AND d.last_received_at < now() - make_interval(secs => %(after)s)
    RETURNING d.id
)
INSERT INTO presence_log (device_id, online, ts, received_at)
SELECT id, false, NULL, now() FROM marked"""

# Heard from after the mark: a message received after silent_since was stored (ingest
# catching up on a backlog) with no presence (which would have cleared silent_since).
_REVIVE: Final = """
WITH candidates AS (
    SELECT id FROM devices
    WHERE silent_since IS NOT NULL AND NOT online AND last_received_at > silent_since
    ORDER BY id FOR NO KEY UPDATE SKIP LOCKED
), revived AS (
    UPDATE devices d SET online = true, silent_since = NULL
    FROM candidates c
    WHERE d.id = c.id
      AND d.silent_since IS NOT NULL AND NOT d.online AND d.last_received_at > d.silent_since
    RETURNING d.id
)
INSERT INTO presence_log (device_id, online, ts, received_at)
SELECT id, true, NULL, now() FROM revived"""


class SilentChanges(NamedTuple):
    """What one pass changed: devices marked offline for silence, and revived."""

    marked: int
    revived: int


def _heard(value: bool) -> bool:
    return value


def mark_silent_devices(conn: Conn, silent_after_s: float) -> SilentChanges:
    """Mark devices silent for ``silent_after_s`` offline and revive marked ones heard from
    since, in one transaction (the caller's connection in autocommit mode, or nested)."""
    params = {"after": silent_after_s}
    with conn.transaction():
        revived = conn.execute(_REVIVE, params).rowcount
        with conn.cursor(row_factory=args_row(_heard)) as cur:
            heard = cur.execute(_HEARD_RECENTLY, params).fetchone()
        marked = conn.execute(_MARK_SILENT, params).rowcount if heard else 0
    return SilentChanges(marked=max(marked, 0), revived=max(revived, 0))
