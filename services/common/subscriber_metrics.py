"""Prometheus counters of a worker's MQTT session (services.common.subscriber), per service."""

import dataclasses

from prometheus_client import REGISTRY, CollectorRegistry, Counter

from services.common.subscriber import SubscriberStats


class SubscriberMetrics:
    """``galvani_<service>_mqtt_*`` counters, fed from the Subscriber's own counts.

    Create one per service at import (Prometheus registers each name once) and call
    :meth:`update` from the worker loop; it adds what the Subscriber counted since the last call.
    """

    def __init__(
        self, service: str, *, publishes: bool, registry: CollectorRegistry = REGISTRY
    ) -> None:
        """``registry``: where the counters are registered (the served default; a test's own)."""
        prefix = f"galvani_{service}_mqtt"
        self.reconnects = Counter(
            f"{prefix}_reconnects_total",
            "Reconnections to the broker after the first",
            registry=registry,
        )
        self.subscribe_failures = Counter(
            f"{prefix}_subscribe_failures_total",
            "Connections closed because the broker refused a subscription, granted it QoS 0, "
            "or answered with other than one reason code per filter",
            registry=registry,
        )
        self.sessions_lost = Counter(
            f"{prefix}_sessions_lost_total",
            "Reconnections on which the broker had lost the worker's session and what it queued",
            registry=registry,
        )
        # Only a worker that publishes through its Subscriber (ingest's stored acks) has these.
        self.publishes_dropped = (
            Counter(
                f"{prefix}_publishes_dropped_total",
                "QoS 0 publishes (stored acks) not sent, by reason (disconnected; too_large: over "
                "the broker's Maximum Packet Size)",
                ["reason"],
                registry=registry,
            )
            if publishes
            else None
        )
        self._seen = SubscriberStats()

    def update(self, stats: SubscriberStats) -> None:
        """Count the increase of ``stats`` since the previous call."""
        seen = self._seen
        if stats == seen:
            return
        self.reconnects.inc(stats.reconnects - seen.reconnects)
        self.subscribe_failures.inc(stats.subscribe_failures - seen.subscribe_failures)
        self.sessions_lost.inc(stats.sessions_lost - seen.sessions_lost)
        if self.publishes_dropped is not None:
            self.publishes_dropped.labels("disconnected").inc(
                stats.publishes_dropped - seen.publishes_dropped
            )
            self.publishes_dropped.labels("too_large").inc(
                stats.publishes_too_large - seen.publishes_too_large
            )
        self._seen = dataclasses.replace(stats)
