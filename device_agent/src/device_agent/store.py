"""What a device agent keeps across restarts, in one SQLite database.

:class:`DeviceStore` is one device's view of the database (:mod:`device_agent.database`): its
``seq`` and outbox (:mod:`device_agent.outbox`), and here its small state (the applied mode
table, the last config answer, a session's progress) and its session history, which the
local limits on sessions a day, a week and the cooldown read.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from device_agent.database import open_database, total_backlog
from device_agent.outbox import (
    DROP_ORDER,
    RETAINED_CHANNEL,
    DropCounts,
    Outbox,
    OutboxLimits,
    Pending,
)

# The store's parts, importable from here as before they were split.
__all__ = [
    "DROP_ORDER",
    "RETAINED_CHANNEL",
    "DeviceStore",
    "DropCounts",
    "OutboxLimits",
    "Pending",
    "SessionRecord",
    "open_database",
    "total_backlog",
]

log = logging.getLogger("galvani.agent.store")


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """One session in the device's local history."""

    session_id: str
    mode: str
    started_ms: int
    ended_ms: int | None
    output_s: float


class DeviceStore(Outbox):
    """One device's seq, outbox, state and session history in a shared database."""

    # -- small state ---------------------------------------------------------------------

    def get(self, key: str) -> object | None:
        """The JSON value stored under key, or None."""
        row = self.conn.execute(
            "SELECT value FROM kv WHERE device_id = ? AND key = ?", (self.device_id, key)
        ).fetchone()
        return None if row is None else json.loads(row[0])

    def put(self, key: str, value: object) -> None:
        """Store value (JSON) under key, replacing what was there."""
        # Outside transaction(), one statement in autocommit mode is its own transaction.
        self.conn.execute(
            "INSERT INTO kv (device_id, key, value) VALUES (?, ?, ?) "
            "ON CONFLICT (device_id, key) DO UPDATE SET value = excluded.value",
            (self.device_id, key, json.dumps(value, separators=(",", ":"), allow_nan=False)),
        )

    # -- session history -----------------------------------------------------------------

    def record_session_start(self, session_id: str, mode: str, started_ms: int) -> None:
        """Note that a session started (it stays open until record_session_end)."""
        self.conn.execute(
            "INSERT INTO sessions (device_id, session_id, mode, started_ms) VALUES (?, ?, ?, ?)",
            (self.device_id, session_id, mode, started_ms),
        )

    def record_session_end(self, session_id: str, ended_ms: int, output_s: float) -> None:
        """Close a session with its end time and seconds of output."""
        cur = self.conn.execute(
            "UPDATE sessions SET ended_ms = ?, output_s = ? WHERE device_id = ? AND session_id = ?",
            (ended_ms, output_s, self.device_id, session_id),
        )
        if cur.rowcount == 0:
            log.warning("%s: end of unknown session %s not recorded", self.device_id, session_id)

    def sessions_since(self, since_ms: int) -> list[SessionRecord]:
        """Sessions that started at or after since_ms, oldest first."""
        return self._sessions("started_ms >= ? ORDER BY started_ms, rowid", since_ms)

    def last_session(self) -> SessionRecord | None:
        """The session that started last, if any."""
        found = self._sessions("1 ORDER BY started_ms DESC, rowid DESC LIMIT 1")
        return found[0] if found else None

    def open_session(self) -> SessionRecord | None:
        """The latest session never ended (a crash or reboot cut it short), if any."""
        found = self._sessions("ended_ms IS NULL ORDER BY started_ms DESC, rowid DESC LIMIT 1")
        return found[0] if found else None

    def prune_sessions(self, before_ms: int) -> None:
        """Forget sessions that started before before_ms."""
        self.conn.execute(
            "DELETE FROM sessions WHERE device_id = ? AND started_ms < ?",
            (self.device_id, before_ms),
        )

    def _sessions(self, condition: str, *params: int) -> list[SessionRecord]:
        rows = self.conn.execute(
            "SELECT session_id, mode, started_ms, ended_ms, output_s FROM sessions "  # noqa: S608
            f"WHERE device_id = ? AND {condition}",  # a constant of this class, never input
            (self.device_id, *params),
        ).fetchall()
        return [SessionRecord(*row) for row in rows]
