"""Prometheus metrics of a rules worker (no per-device labels: fleets are large)."""

from typing import Final

from prometheus_client import Counter, Histogram

from services.common.worker_metrics import WorkerMetrics

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
SWEEPS: Final = Counter(
    "galvani_rules_sweeps_total", "Periodic checks run (offline, config_unacked, retention)"
)
# Held messages, connection, database retries and MQTT session counters, as every worker.
WORKER: Final = WorkerMetrics("rules", publishes=False)
