"""Every metric name the Galvani services export, for the tests that hold alert rules and
dashboards to real metrics.

The names come from the services' own registrations, not from a list kept here: importing each
service's metrics module registers its counters, gauges and histograms in prometheus_client's
default registry (the one each service serves), and maintenance's custom collectors are run on
states that make them yield every family they can.
"""

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.registry import Collector

import services.api.metrics
import services.api.publisher
import services.broker_access.metrics
import services.ingest.metrics
import services.maintenance.main
import services.notify.metrics
import services.rules.metrics  # noqa: F401 (each import registers the service's metrics)
from services.maintenance.broker_watch import (
    DROPPED_TOPIC,
    GAUGES,
    BrokerCollector,
    BrokerStats,
)
from services.maintenance.cluster_watch import (
    ClusterCollector,
    ClusterStats,
    ConsumerState,
    NodeState,
)
from services.maintenance.replication import Replication, ReplicationCollector

# The series a family of each type is exposed as (the text format of prometheus_client 0.x).
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "enum": ("",),
    "unknown": ("",),
}


def _maintenance_collectors() -> list[Collector]:
    """Maintenance's custom collectors, each in a state in which it yields every family."""
    broker = BrokerStats()
    broker.set_connected(True)
    for topic in (*(gauge.topic for gauge in GAUGES), DROPPED_TOPIC):
        broker.update(topic, b"1")
    cluster = ClusterStats(["http://127.0.0.1:8222"])
    consumer = ConsumerState("GALVANI_DEVICES", "ingest", pending=1, ack_pending=1)
    cluster.record(
        NodeState("127.0.0.1:8222", True, 1, 2, 0, (("GALVANI_DEVICES", 1),), (consumer,))
    )
    replication = ReplicationCollector()
    replication.update(Replication(replicas=1, lag_s={"replica-a": 0.5}, hidden=0))
    return [BrokerCollector(broker), ClusterCollector(cluster), replication]


def exported_metrics() -> tuple[set[str], set[str]]:
    """(series names, family names) of every ``galvani_*`` metric the services export.

    A series name is what a PromQL query names (``galvani_ingest_lag_seconds_bucket``); a family
    name is the metric as documented (``galvani_ingest_lag_seconds``).
    """
    extra = CollectorRegistry()
    for collector in _maintenance_collectors():
        extra.register(collector)
    series: set[str] = set()
    families: set[str] = set()
    for registry in (REGISTRY, extra):
        for family in registry.collect():
            if not family.name.startswith("galvani_"):
                continue
            families.add(family.name)
            series.update(family.name + suffix for suffix in SUFFIXES[family.type])
            # A family with children already made also names its series itself.
            series.update(sample.name for sample in family.samples)
    # The module's own name for its metric is what the docs quote (a counter's with _total).
    families.update(name for name in series if name.endswith("_total"))
    return series, families
