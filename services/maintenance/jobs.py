"""One maintenance pass; each job is a function of (connection, now) in its own transaction."""

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from services.common.db import Conn, Storage, storage_of

log = logging.getLogger(__name__)

PARTITIONS_AHEAD_DAYS = 7


@dataclass(frozen=True)
class PassResult:
    """What one pass did, for logs and metrics."""

    rollup_rows: int
    dropped: int
    partitions_created: int


def retention_days(conn: Conn) -> int:
    """Days of raw samples kept (``galvani_meta.raw_retention_days``)."""
    row = conn.execute("SELECT value FROM galvani_meta WHERE key = 'raw_retention_days'").fetchone()
    return int(str(row[0])) if row else 90


def run_pass(conn: Conn, now: datetime, lookback: timedelta) -> PassResult:
    """Refresh rollups, drop expired samples and (plain storage) create partitions ahead.

    The licensed TimescaleDB build does the sample jobs with its own policies, so a pass there
    only trims the telemetry ledger.
    """
    storage = storage_of(conn)
    with conn.transaction():
        cutoff = now - timedelta(days=retention_days(conn))
        conn.execute("SELECT galvani_drop_old_messages(%s)", [cutoff])
    if storage is Storage.TIMESCALEDB:
        return PassResult(0, 0, 0)
    created = 0
    if storage is Storage.PLAIN:
        with conn.transaction():
            row = conn.execute(
                "SELECT galvani_ensure_partitions(%s::date, %s::date)",
                [now.date(), (now + timedelta(days=PARTITIONS_AHEAD_DAYS)).date()],
            ).fetchone()
            created = int(str(row[0])) if row else 0
    with conn.transaction():
        row = conn.execute(
            "SELECT galvani_refresh_rollups(%s, %s)", [now - lookback, now]
        ).fetchone()
        rollup_rows = int(str(row[0])) if row else 0
        conn.execute(
            "UPDATE galvani_meta SET value = %s WHERE key = 'rollups_refreshed_to'",
            [now.isoformat()],
        )
    with conn.transaction():
        cutoff = now - timedelta(days=retention_days(conn))
        row = conn.execute("SELECT galvani_drop_old_samples(%s)", [cutoff]).fetchone()
        dropped = int(str(row[0])) if row else 0
    return PassResult(rollup_rows=rollup_rows, dropped=dropped, partitions_created=created)
