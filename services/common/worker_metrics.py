"""The Prometheus metrics every broker-fed worker keeps, named per service
(``galvani_<service>_...``); each service adds its own beside them."""

from prometheus_client import Counter, Gauge

from services.common.broker.source import InboundSource
from services.common.subscriber_metrics import SubscriberMetrics


class WorkerMetrics:
    """Held messages, the connection, database retries and the MQTT session's counters.

    Create one per service at import (Prometheus registers each name once).
    """

    def __init__(self, service: str, *, publishes: bool) -> None:
        prefix = f"galvani_{service}"
        self.inflight = Gauge(
            f"{prefix}_inflight_messages",
            "Messages received from the broker and not yet acknowledged",
        )
        self.connected = Gauge(
            f"{prefix}_connected", "1 while the worker is connected to the broker and subscribed"
        )
        self.db_retries = Counter(
            f"{prefix}_db_retries_total",
            "Batches retried because the database failed, by error",
            ["error"],
        )
        self.mqtt = SubscriberMetrics(service, publishes=publishes)

    def count_retry(self, exc: Exception) -> None:
        """Count one transaction retried after ``exc``."""
        self.db_retries.labels(type(exc).__name__).inc()

    def observe(self, subscriber: InboundSource) -> None:
        """Take the subscriber's state after a poll."""
        self.inflight.set(subscriber.unacked)
        self.connected.set(1 if subscriber.connected else 0)
        self.mqtt.update(subscriber.stats)
