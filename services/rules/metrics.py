"""Prometheus metrics of a rules worker (no per-device labels: fleets are large)."""

import dataclasses
from typing import Final

from prometheus_client import Counter, Gauge, Histogram

from services.common.subscriber import SubscriberStats

MESSAGES: Final = Counter(
    "galvani_rules_messages_total",
    "Messages, by channel and outcome (evaluated; invalid: skipped; failed: could not be "
    "evaluated, acknowledged and logged)",
    ["channel", "outcome"],
)
ALERTS: Final = Counter(
    "galvani_rules_alerts_total",
    "New occurrences raised (an alert opened, or its count raised), by rule and severity",
    ["rule", "severity"],
)
RESOLVED: Final = Counter(
    "galvani_rules_resolved_total", "Alerts the rules resolved themselves", ["how"]
)
PUSHES: Final = Counter(
    "galvani_rules_pushes_total",
    "Restricted mode tables recorded for signing and publishing, by rule and kind",
    ["rule", "kind"],
)
PUBLISHED: Final = Counter(
    "galvani_rules_published_total",
    "Pushed tables the broker acknowledged, by outcome",
    ["outcome"],
)
EVALUATION_SECONDS: Final = Histogram(
    "galvani_rules_evaluation_seconds",
    "Time to evaluate and commit one batch",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
RECEIPT_TO_COMMIT_SECONDS: Final = Histogram(
    "galvani_rules_receipt_to_commit_seconds",
    "From a message's receipt by the worker to the commit of its evaluation",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
BATCH_MESSAGES: Final = Histogram(
    "galvani_rules_batch_messages",
    "Messages per evaluated batch",
    buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000),
)
ROLLOUTS_PAUSED: Final = Counter(
    "galvani_rules_rollouts_paused_total",
    "Canary rollouts paused because the canary's critical-alert rate tripped the guard",
)
INFLIGHT: Final = Gauge(
    "galvani_rules_inflight_messages", "Messages received from the broker and not yet acknowledged"
)
CONNECTED: Final = Gauge(
    "galvani_rules_connected", "1 while the worker is connected to the broker and subscribed"
)
MQTT_RECONNECTS: Final = Counter(
    "galvani_rules_mqtt_reconnects_total", "Reconnections to the broker after the first"
)
MQTT_SUBSCRIBE_FAILURES: Final = Counter(
    "galvani_rules_mqtt_subscribe_failures_total",
    "Connections closed because the broker refused a subscription, granted it QoS 0, or "
    "answered with other than one reason code per filter",
)
MQTT_SESSIONS_LOST: Final = Counter(
    "galvani_rules_mqtt_sessions_lost_total",
    "Reconnections on which the broker had lost the worker's session and what it queued",
)
DB_RETRIES: Final = Counter(
    "galvani_rules_db_retries_total", "Batches retried because the database failed", ["error"]
)
SWEEPS: Final = Counter(
    "galvani_rules_sweeps_total", "Periodic checks run (offline, config_unacked, retention)"
)


class SubscriberCounters:
    """Adds what the worker's Subscriber counted since the last update to the counters above.

    Rules workers publish through their own client (services.common.config_push), not the
    Subscriber, so its publish counts stay zero here.
    """

    def __init__(self) -> None:
        self._seen = SubscriberStats()

    def update(self, stats: SubscriberStats) -> None:
        """Count the increase of ``stats`` since the previous call."""
        seen = self._seen
        if stats == seen:
            return
        MQTT_RECONNECTS.inc(stats.reconnects - seen.reconnects)
        MQTT_SUBSCRIBE_FAILURES.inc(stats.subscribe_failures - seen.subscribe_failures)
        MQTT_SESSIONS_LOST.inc(stats.sessions_lost - seen.sessions_lost)
        self._seen = dataclasses.replace(stats)
