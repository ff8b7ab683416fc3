"""The maintenance loop: ``python -m services.maintenance.main``."""

import logging
import threading
from datetime import UTC, datetime, timedelta

from prometheus_client import REGISTRY, Counter, Histogram, start_http_server

from services.common.db import connect
from services.common.errors import DatabaseUnavailable
from services.common.logs import configure_logging
from services.common.worker import stop_on_signals
from services.maintenance.broker_watch import (
    BrokerAddress,
    BrokerCollector,
    BrokerStats,
    BrokerWatch,
)
from services.maintenance.cluster_watch import ClusterCollector, ClusterStats, ClusterWatch
from services.maintenance.jobs import run_pass
from services.maintenance.replication import ReplicationCollector, read_replication
from services.maintenance.settings import MaintenanceSettings

log = logging.getLogger("galvani.maintenance")

PASSES = Counter("galvani_maintenance_passes_total", "Maintenance passes", ["outcome"])
PASS_SECONDS = Histogram("galvani_maintenance_pass_seconds", "Duration of one pass")
ROLLUP_ROWS = Counter("galvani_maintenance_rollup_rows_total", "Rollup rows recomputed")
DROPPED = Counter("galvani_maintenance_dropped_total", "Chunks or partitions dropped")
SILENT = Counter(
    "galvani_maintenance_devices_silent_total",
    "Devices reported offline for silence (change=offline), and online again when heard from"
    " (change=online)",
    ["change"],
)
REPLICATION = ReplicationCollector()
REGISTRY.register(REPLICATION)


def start_broker_watch(settings: MaintenanceSettings) -> BrokerWatch | None:
    """Watch the broker's statistics and serve them with the metrics, when configured."""
    if settings.mqtt_password is None:
        return None
    stats = BrokerStats()
    REGISTRY.register(BrokerCollector(stats))
    watch = BrokerWatch(
        BrokerAddress(
            settings.mqtt_host,
            settings.mqtt_port,
            settings.mqtt_username,
            settings.mqtt_password.get_secret_value(),
            settings.mqtt_tls_context(),
        ),
        stats,
    )
    watch.start()
    return watch


def start_cluster_watch(settings: MaintenanceSettings) -> ClusterWatch | None:
    """Poll the NATS cluster's monitoring ports and serve what they say, when configured."""
    urls = settings.nats_monitor_url_list()
    if not urls:
        return None
    stats = ClusterStats(urls)
    REGISTRY.register(ClusterCollector(stats))
    watch = ClusterWatch(urls, stats)
    watch.start()
    return watch


def main() -> None:
    """Run a pass every ``interval_s`` until SIGTERM or SIGINT."""
    settings = MaintenanceSettings()
    configure_logging(settings.log_level)
    stop = stop_on_signals()
    if settings.metrics_port:
        start_http_server(settings.metrics_port, addr=settings.metrics_host)
    watch = start_broker_watch(settings)
    cluster_watch = start_cluster_watch(settings)
    try:
        run_passes(settings, stop)
    finally:
        if watch is not None:
            watch.close()
        if cluster_watch is not None:
            cluster_watch.close()


def run_passes(settings: MaintenanceSettings, stop: threading.Event) -> None:
    """Run a pass every ``interval_s`` until ``stop`` is set."""
    lookback = timedelta(seconds=settings.rollup_lookback_s)
    while not stop.is_set():
        with PASS_SECONDS.time():
            try:
                with connect(settings.database_url.get_secret_value(), autocommit=True) as conn:
                    result = run_pass(
                        conn, datetime.now(UTC), lookback, silent_after_s=settings.silent_after_s
                    )
                    REPLICATION.update(read_replication(conn))
            except DatabaseUnavailable as exc:
                REPLICATION.update(None)
                PASSES.labels("database_unavailable").inc()
                log.warning("maintenance pass skipped: %s", exc)
            else:
                PASSES.labels("ok").inc()
                ROLLUP_ROWS.inc(result.rollup_rows)
                DROPPED.inc(result.dropped)
                SILENT.labels("offline").inc(result.silent_marked)
                SILENT.labels("online").inc(result.silent_revived)
                log.info("maintenance pass: %s", result)
        stop.wait(settings.interval_s)


if __name__ == "__main__":
    main()
