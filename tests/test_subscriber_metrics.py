"""The Subscriber's counts reach Prometheus as increases, once each."""

from prometheus_client import CollectorRegistry

from services.common.subscriber import SubscriberStats
from services.common.subscriber_metrics import SubscriberMetrics

# A registry of the test's own: the default one is what the services serve, and the
# dashboards' test holds every metric in it to a panel.
REGISTRY = CollectorRegistry()
METRICS = SubscriberMetrics("metricstest", publishes=True, registry=REGISTRY)


def value(name: str, labels: dict[str, str] | None = None) -> float:
    found = REGISTRY.get_sample_value(f"galvani_metricstest_mqtt_{name}", labels or {})
    assert found is not None, name
    return found


def test_each_update_adds_only_what_was_counted_since_the_last() -> None:
    METRICS.update(SubscriberStats(reconnects=2, sessions_lost=1, publishes_dropped=3))
    METRICS.update(SubscriberStats(reconnects=2, sessions_lost=1, publishes_dropped=3))
    METRICS.update(
        SubscriberStats(reconnects=5, subscribe_failures=1, sessions_lost=1, publishes_dropped=4)
    )
    assert value("reconnects_total") == 5
    assert value("subscribe_failures_total") == 1
    assert value("sessions_lost_total") == 1
    assert value("publishes_dropped_total", {"reason": "disconnected"}) == 4
    assert value("publishes_dropped_total", {"reason": "too_large"}) == 0
