"""Prometheus metrics of an ingest worker (no per-device labels: fleets are large)."""

from typing import Final

from prometheus_client import Counter, Histogram

from services.common.worker_metrics import WorkerMetrics

MESSAGES: Final = Counter(
    "galvani_ingest_messages_total",
    "Messages handled, by channel and outcome (stored, duplicate, seq_reused, invalid)",
    ["channel", "outcome"],
)
SAMPLES: Final = Counter(
    "galvani_ingest_samples_total",
    "Telemetry samples, by outcome (stored; conflicting: same device and time as a stored one;"
    " suspect: a suspect clock's, stored in suspect_samples)",
    ["outcome"],
)
CONFLICTS: Final = Counter(
    "galvani_ingest_conflicts_total",
    "Messages kept in message_conflicts, by reason (seq_reused: another payload under a stored "
    "seq; sample_conflict: samples at stored times with other readings)",
    ["reason"],
)
DEAD_LETTERS: Final = Counter(
    "galvani_ingest_dead_letters_total", "Messages stored as dead letters, by reason", ["reason"]
)
BATCH_SPLITS: Final = Counter(
    "galvani_ingest_batch_splits_total",
    "Batches the database refused and that were written again one message at a time (a valid "
    "message the schema cannot hold: every such split delays the whole batch)",
)
BATCH_MESSAGES: Final = Histogram(
    "galvani_ingest_batch_messages",
    "Messages per committed batch",
    buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000),
)
COMMIT_SECONDS: Final = Histogram(
    "galvani_ingest_commit_seconds",
    "Time to write and commit one batch",
    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
LAG_SECONDS: Final = Histogram(
    "galvani_ingest_lag_seconds",
    "Device time of a message to the commit that stored it",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600, 86400),
)
THROTTLED: Final = Counter(
    "galvani_ingest_devices_throttled_total",
    "Devices over their message budget, by action (banned from the broker, ban_failed, lifted:"
    " let back in when the ban ended, record_failed: banned but not written to device_throttles,"
    " so the brand gets no device_flooding alert for it; session_ended: a banned certificate"
    " device's session ended by takeover, session_end_failed: the takeover did not happen)",
    ["action"],
)
OVER_BUDGET_MESSAGES: Final = Counter(
    "galvani_ingest_over_budget_messages_total",
    "Messages committed from devices past their budget in the window (all stored)",
)
# Held messages, connection, database retries and MQTT session counters, as every worker.
WORKER: Final = WorkerMetrics("ingest", publishes=True)
