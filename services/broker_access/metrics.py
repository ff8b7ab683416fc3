"""The responder's Prometheus metrics (served on ``metrics_port``)."""

from prometheus_client import Counter, Histogram

DECISIONS = Counter(
    "galvani_broker_access_decisions_total",
    "Logins decided, by kind of client (device, service) and outcome (granted, refused)",
    ["kind", "outcome"],
)
for _kind in ("device", "service"):
    for _outcome in ("granted", "refused"):
        DECISIONS.labels(_kind, _outcome)
# From the request's arrival at the responder to its answer being queued: the part of a
# CONNECT's login the responder adds (a database round trip and a PBKDF2 check).
ANSWER_SECONDS = Histogram(
    "galvani_broker_access_answer_seconds",
    "Time to decide and sign one authorization answer",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
BAD_REQUESTS = Counter(
    "galvani_broker_access_bad_requests_total",
    "Requests on the callout subject that were not valid authorization requests (unanswered)",
)
DATABASE_ERRORS = Counter(
    "galvani_broker_access_database_errors_total",
    "Device logins refused because the database could not be asked",
)
