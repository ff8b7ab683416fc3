"""A worker's database connection: each transaction retried with capped backoff while the
database is unwell, and reopened when the connection is lost.

Only errors that blame the data (:func:`services.common.db.is_bad_message`) are raised to the
caller, which splits its batch; every other failure is waited out, with the worker's network
kept running through ``wait`` so its broker session stays alive.
"""

import logging
import threading
from collections.abc import Callable
from typing import Final, TypeVar

import psycopg

from services.common.db import Conn, connect, is_bad_message
from services.common.errors import DatabaseUnavailable, GalvaniError

log = logging.getLogger(__name__)

RETRY_MIN_DELAY_S: Final = 0.1
RETRY_MAX_DELAY_S: Final = 5.0

T = TypeVar("T")


class StoppedWaiting(GalvaniError):
    """The worker was asked to stop while it waited for the database; nothing was acked."""


class RetryingDatabase:
    """One connection, reopened with capped backoff when it fails."""

    def __init__(
        self,
        url: str,
        *,
        wait: Callable[[float], None],
        stop: threading.Event,
        on_retry: Callable[[Exception], None],
        on_connect: Callable[[Conn], None] | None = None,
    ) -> None:
        self.url = url
        self.wait = wait
        self.stop = stop
        self.on_retry = on_retry
        self.on_connect = on_connect
        self._conn: Conn | None = None

    def transaction(self, work: Callable[[Conn], T]) -> T:
        """Run ``work`` in one transaction, retrying while the database is unwell; raise
        :class:`StoppedWaiting` if asked to stop meanwhile."""
        delay = RETRY_MIN_DELAY_S
        while True:
            try:
                conn = self._connection()
                with conn.transaction():
                    return work(conn)
            except (psycopg.Error, DatabaseUnavailable) as exc:
                if is_bad_message(exc):
                    raise
                self.on_retry(exc)
                log.warning("database transaction failed, retrying in %.1f s: %s", delay, exc)
                if isinstance(exc, psycopg.OperationalError | DatabaseUnavailable):
                    self.close()
            if self.stop.is_set():
                raise StoppedWaiting("stopped while the database was unavailable")
            self.wait(delay)
            delay = min(delay * 2, RETRY_MAX_DELAY_S)

    def _connection(self) -> Conn:
        if self._conn is None or self._conn.closed:
            conn = connect(self.url)
            if self.on_connect is not None:
                self.on_connect(conn)
                conn.commit()
            self._conn = conn
        return self._conn

    def close(self) -> None:
        """Close the connection (it is reopened on the next transaction)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
