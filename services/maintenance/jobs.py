"""One maintenance pass; each job is a function of (connection, now) in its own transaction."""

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import LiteralString

from psycopg.abc import Params
from psycopg.rows import args_row

from services.common.db import Conn, Storage, storage_of
from services.maintenance.silent_devices import DEFAULT_SILENT_AFTER_S, mark_silent_devices

log = logging.getLogger(__name__)

PARTITIONS_AHEAD_DAYS = 7


@dataclass(frozen=True)
class PassResult:
    """What one pass did, for logs and metrics."""

    rollup_rows: int
    dropped: int
    partitions_created: int
    # Devices reported offline for silence, and reported online again (silent_devices.py).
    silent_marked: int = 0
    silent_revived: int = 0


def _count(count: int) -> int:
    return count


def retention_days(conn: Conn) -> int:
    """Days of raw samples kept (``galvani_meta.raw_retention_days``)."""
    # galvani_meta's values are text: the row factory parses this one.
    with conn.cursor(row_factory=args_row(int)) as cur:
        days = cur.execute(
            "SELECT value FROM galvani_meta WHERE key = 'raw_retention_days'"
        ).fetchone()
    return 90 if days is None else days


def _counted(conn: Conn, query: LiteralString, params: Params) -> int:
    """What a maintenance function returns: how many rows or partitions it touched."""
    with conn.cursor(row_factory=args_row(_count)) as cur:
        return cur.execute(query, params).fetchone() or 0


def run_pass(
    conn: Conn,
    now: datetime,
    lookback: timedelta,
    *,
    silent_after_s: float = DEFAULT_SILENT_AFTER_S,
) -> PassResult:
    """Refresh rollups, drop expired samples and (plain storage) create partitions ahead.

    The first job runs on every storage: it trims, by receipt time, the telemetry ledger, the
    recorded conflicts and the suspect-clock samples (``galvani_drop_old_messages``), and the
    recorded bans of flooding devices (``device_throttles``). A sample
    whose device time was a suspect clock is kept for the retention period after it arrived,
    whatever time its device gave it (``samples`` is trimmed by device time, where a clock at
    1970 would have been dropped on the next pass and one at 2100 never). The licensed
    TimescaleDB build does the other sample jobs with its own policies, so a pass there ends
    after this one.

    The second, on every storage too, reports devices silent for ``silent_after_s`` offline
    and marked ones heard from since online again (``silent_devices.py``), by the database's
    clock (``now()``), not ``now``.
    """
    storage = storage_of(conn)
    with conn.transaction():
        cutoff = now - timedelta(days=retention_days(conn))
        conn.execute("SELECT galvani_drop_old_messages(%s)", [cutoff])
        conn.execute("DELETE FROM device_throttles WHERE banned_at < %s", [cutoff])
    silent = mark_silent_devices(conn, silent_after_s)
    if storage is Storage.TIMESCALEDB:
        return PassResult(0, 0, 0, silent.marked, silent.revived)
    created = 0
    if storage is Storage.PLAIN:
        with conn.transaction():
            created = _counted(
                conn,
                "SELECT galvani_ensure_partitions(%s::date, %s::date)",
                [now.date(), (now + timedelta(days=PARTITIONS_AHEAD_DAYS)).date()],
            )
    with conn.transaction():
        rollup_rows = _counted(
            conn, "SELECT galvani_refresh_rollups(%s, %s)", [now - lookback, now]
        )
        conn.execute(
            "UPDATE galvani_meta SET value = %s WHERE key = 'rollups_refreshed_to'",
            [now.isoformat()],
        )
    with conn.transaction():
        cutoff = now - timedelta(days=retention_days(conn))
        dropped = _counted(conn, "SELECT galvani_drop_old_samples(%s)", [cutoff])
    return PassResult(
        rollup_rows=rollup_rows,
        dropped=dropped,
        partitions_created=created,
        silent_marked=silent.marked,
        silent_revived=silent.revived,
    )
