"""The database's streaming replicas and how far behind they replay, as maintenance metrics.

Read on the primary from ``pg_stat_replication`` at every maintenance pass (one row per WAL
sender: each standby, and each ``pg_receivewal`` or base backup streaming WAL). Exported:

* ``galvani_db_replicas``: how many there are (0 on a database without replicas);
* ``galvani_db_replication_lag_seconds{replica}``: ``replay_lag``, the time between the
  primary's flushing a commit and the replica's applying it, which is how stale the replica's
  reads are. PostgreSQL shows NULL once a replica has caught up and no WAL has been sent for a
  while (the docs of pg_stat_replication); that is exported as 0. ``replica`` is the
  ``application_name`` the replica connected with (``primary_conninfo``; set it, or every
  standby is ``walreceiver``), made unique with the sender's pid when two share one.

PostgreSQL shows a WAL sender's details (state, lags) only to a superuser or a member of
``pg_read_all_stats`` (``pg_stat_get_wal_senders``, ``walsender.c``); to anyone else the row is
there with its details NULL. Such a replica is counted but has no lag series, and the pass
logs what to grant (``GRANT pg_monitor TO galvani_maintenance_login``).
"""

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import cast

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from services.common.db import Conn

log = logging.getLogger(__name__)

# state is NULL exactly when the details are hidden from this role; replay_lag is NULL also
# when a visible replica is idle and caught up.
REPLICATION_QUERY = """
SELECT pid, coalesce(application_name, ''), state IS NOT NULL,
       coalesce(extract(epoch FROM replay_lag), 0)::float8
FROM pg_stat_replication
ORDER BY application_name, pid
"""


@dataclass(frozen=True)
class Replication:
    """The replicas one read of ``pg_stat_replication`` saw."""

    replicas: int
    lag_s: dict[str, float]  # replica -> replay lag, for the replicas whose details are visible
    hidden: int  # replicas whose details this role may not see


def read_replication(conn: Conn) -> Replication:
    """The primary's replicas and their replay lag, read from ``pg_stat_replication``."""
    rows = conn.execute(REPLICATION_QUERY).fetchall()
    names = [str(row[1]) or f"pid-{row[0]}" for row in rows]
    lag_s: dict[str, float] = {}
    hidden = 0
    for (pid, _, visible, lag), name in zip(rows, names, strict=True):
        if not visible:
            hidden += 1
            continue
        label = name if names.count(name) == 1 else f"{name}#{pid}"
        lag_s[label] = cast(float, lag)  # ::float8 in the query
    return Replication(len(rows), lag_s, hidden)


class ReplicationCollector(Collector):
    """Serves the last :class:`Replication` read; nothing until the first pass has read one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: Replication | None = None
        self._warned = False

    def update(self, replication: Replication | None) -> None:
        """Keep ``replication`` (None: the database could not be read, so nothing is known)."""
        if replication is not None and replication.hidden and not self._warned:
            self._warned = True
            log.warning(
                "%d replica(s) without details in pg_stat_replication: maintenance's role may "
                "not see them, so no replication lag is exported for them; "
                "GRANT pg_monitor TO galvani_maintenance_login",
                replication.hidden,
            )
        with self._lock:
            self._last = replication

    def collect(self) -> Iterable[Metric]:
        """The replica count and each visible replica's replay lag."""
        with self._lock:
            last = self._last
        if last is None:
            return
        yield GaugeMetricFamily(
            "galvani_db_replicas",
            "Streaming replicas (WAL senders) connected to the primary, from pg_stat_replication",
            value=last.replicas,
        )
        lag = GaugeMetricFamily(
            "galvani_db_replication_lag_seconds",
            "How long after the primary a replica applies a commit (replay_lag; 0 once caught "
            "up and idle)",
            labels=["replica"],
        )
        for replica, seconds in sorted(last.lag_s.items()):
            lag.add_metric([replica], seconds)
        yield lag
