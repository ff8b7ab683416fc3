"""The dispatcher's Prometheus metrics (served on ``metrics_port`` as the other workers')."""

from prometheus_client import Counter, Gauge, Histogram

DELIVERIES = Counter(
    "galvani_notify_deliveries_total",
    "Delivery attempts by outcome: delivered, retried (to be tried again), failed (given up)",
    ["outcome"],
)
for _outcome in ("delivered", "retried", "failed"):
    DELIVERIES.labels(_outcome)
# From the outbox row's creation (the alert's transition) to the receiver's 2xx.
DELIVERY_LATENCY = Histogram(
    "galvani_notify_delivery_latency_seconds",
    "Time from a notification's creation (the alert transition) to its delivery",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600, 6 * 3600, 24 * 3600),
)
QUEUE_DEPTH = Gauge(
    "galvani_notify_queue_depth", "Notifications pending (not yet delivered nor failed)"
)
OLDEST_PENDING_AGE = Gauge(
    "galvani_notify_oldest_pending_age_seconds",
    "Age of the oldest pending notification that is due, from its creation or the end of its"
    " quiet hours (0 when none)",
)
IN_FLIGHT = Gauge("galvani_notify_in_flight", "Deliveries under way in this process")
