"""The Grafana dashboards of deploy/grafana, written from the definitions below.

Usage: ``python -m tools.grafana_dashboards`` writes every ``deploy/grafana/<uid>.json``;
``--check`` writes nothing and fails when a committed file differs from what it would write
(``tests/test_grafana_dashboards.py`` runs the same comparison). The JSON is what Grafana's
"Import dashboard" takes (its ``__inputs`` ask for the Prometheus data source, referred to as
``${DS_PROMETHEUS}``); a ``DS_PROMETHEUS`` data-source variable makes the same file work when
provisioned from disk, where no import step replaces the input.

Definitions are kept here rather than as hand-edited JSON because a dashboard is mostly layout
and boilerplate that every panel repeats; a panel is its queries, title, description and unit.
Every query names only ``galvani_*`` metrics the services export, and parses as PromQL: the
test holds each file to both.
"""

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

REPO_ROOT: Final = Path(__file__).resolve().parent.parent
OUT_DIR: Final = REPO_ROOT / "deploy" / "grafana"
SCHEMA_VERSION: Final = 39  # Grafana 10.4 / 11
GRID_WIDTH: Final = 24
DS: Final = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
RATE: Final = "$__rate_interval"


@dataclass(frozen=True)
class Query:
    """One PromQL query of a panel and how its series are named in the legend."""

    expr: str
    legend: str = ""


@dataclass(frozen=True)
class Panel:
    """A time series (or, with ``kind="stat"``, a single figure) of one or more queries."""

    title: str
    description: str
    queries: Sequence[Query]
    unit: str = "short"
    kind: str = "timeseries"
    width: int = 12
    height: int = 8
    stacked: bool = False
    # Value -> text shown instead (a stat's "up"/"down"), coloured by ``thresholds``.
    mappings: dict[int, str] = field(default_factory=dict)
    # (from value, colour), the first from -inf; a stat's background or a graph's line colour.
    thresholds: Sequence[tuple[float | None, str]] = ((None, "green"),)


@dataclass(frozen=True)
class Row:
    """A full-width heading that groups the panels after it."""

    title: str


@dataclass(frozen=True)
class Dashboard:
    """One dashboard file."""

    uid: str
    title: str
    description: str
    items: Sequence[Panel | Row]


def _quantiles(metric: str, by: str = "", qs: Iterable[float] = (0.5, 0.99)) -> list[Query]:
    """``histogram_quantile`` queries of a histogram's buckets, summed over processes."""
    group = f"{by}, le" if by else "le"
    prefix = f"{{{{{by}}}}} " if by else ""
    return [
        Query(
            f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket[{RATE}])))",
            f"{prefix}p{q * 100:g}",
        )
        for q in qs
    ]


def _rate(metric: str, by: str, selector: str = "") -> Query:
    """Per-second rate of a counter summed over processes, one series per ``by``."""
    legend = " ".join(f"{{{{{label.strip()}}}}}" for label in by.split(",")) if by else "all"
    grouped = f"sum by ({by}) " if by else "sum "
    return Query(f"{grouped}(rate({metric}{selector}[{RATE}]))", legend)


def _worker_health(service: str) -> list[Panel | Row]:
    """The panels every broker-fed worker has (services/common/worker_metrics.py)."""
    p = f"galvani_{service}"
    return [
        Row("Workers"),
        Panel(
            "Workers connected",
            "Workers connected to the broker and subscribed (galvani_*_connected), out of those"
            " scraped. Fewer than expected: a worker is down or cannot reach the broker.",
            [Query(f"sum({p}_connected)", "connected"), Query(f"count({p}_connected)", "scraped")],
            width=6,
        ),
        Panel(
            "Messages held, by worker",
            "Received from the broker and not acknowledged yet. Growing and not falling: the"
            " worker's commits are stuck (database) and the broker stops delivering to it.",
            [Query(f"{p}_inflight_messages", "{{instance}}")],
            width=6,
        ),
        Panel(
            "Database retries",
            "Batches retried because the database failed, by error class.",
            [_rate(f"{p}_db_retries_total", "error")],
            unit="ops",
            width=6,
        ),
        Panel(
            "Broker sessions",
            "Reconnections, reconnections on which the broker had lost the worker's session"
            " (and what it queued), and connections closed for a refused subscription.",
            [
                Query(f"sum(rate({p}_mqtt_reconnects_total[{RATE}]))", "reconnects"),
                Query(f"sum(rate({p}_mqtt_sessions_lost_total[{RATE}]))", "sessions lost"),
                Query(
                    f"sum(rate({p}_mqtt_subscribe_failures_total[{RATE}]))", "subscribe failures"
                ),
            ],
            unit="ops",
            width=6,
        ),
    ]


def _consumer_backlog(consumer: str) -> Panel:
    """The JetStream consumer's backlog, from maintenance's cluster watch (NATS only)."""
    selector = f'{{consumer="{consumer}"}}'
    return Panel(
        f"JetStream backlog ({consumer})",
        f"On the NATS cluster: messages in GALVANI_DEVICES not yet given to the {consumer}"
        " workers (pending) and given but not acknowledged (ack pending), as the consumer's"
        " leader reports them. Empty with Mosquitto.",
        [
            Query(f"max(galvani_broker_consumer_pending_messages{selector})", "pending"),
            Query(f"max(galvani_broker_consumer_ack_pending_messages{selector})", "ack pending"),
        ],
    )


INGEST: Final = Dashboard(
    "galvani-ingest",
    "Galvani / Ingest",
    "The ingest workers: what they store, how late, how fast the database commits, and what"
    " they refuse (services/ingest/metrics.py).",
    [
        Row("Throughput"),
        Panel(
            "Messages by channel and outcome",
            "Messages handled per second. stored: new; duplicate: a redelivery already stored;"
            " seq_reused: another payload under a stored seq; invalid: a dead letter.",
            [_rate("galvani_ingest_messages_total", "channel, outcome")],
            unit="ops",
            stacked=True,
        ),
        Panel(
            "Samples by outcome",
            "Telemetry samples per second. conflicting: same device and time as a stored sample"
            " with other readings; suspect: from a device whose clock is not trusted.",
            [_rate("galvani_ingest_samples_total", "outcome")],
            unit="ops",
            stacked=True,
        ),
        Row("Latency"),
        Panel(
            "Lag: device time to commit",
            "From the time a device gave a message to the commit that stored it. The median is"
            " what GalvaniIngestLagHigh watches (over 60 s for 10 minutes); the p99 includes"
            " messages replayed from outboxes after a device was offline.",
            _quantiles("galvani_ingest_lag_seconds"),
            unit="s",
        ),
        Panel(
            "Commit time per batch",
            "Time to write and commit one batch. Rising with the load: the database is the"
            " bottleneck.",
            _quantiles("galvani_ingest_commit_seconds"),
            unit="s",
            width=6,
        ),
        Panel(
            "Messages per batch",
            "Mean messages per committed batch (larger batches under load: fewer commits).",
            [
                Query(
                    f"sum(rate(galvani_ingest_batch_messages_sum[{RATE}]))"
                    f" / sum(rate(galvani_ingest_batch_messages_count[{RATE}]))",
                    "mean",
                )
            ],
            width=6,
        ),
        _consumer_backlog("ingest"),
        Panel(
            "Stored acks not sent",
            "Stored acks (QoS 0) the worker could not send: disconnected, or over the broker's"
            " maximum packet size. The device sends the message again and it is stored once.",
            [_rate("galvani_ingest_mqtt_publishes_dropped_total", "reason")],
            unit="ops",
        ),
        Row("Refused and held back"),
        Panel(
            "Dead letters by reason",
            "Messages kept as dead letters instead of data (GET /v1/dead-letters lists them)."
            " GalvaniDeadLetterRate fires above 1% of messages.",
            [_rate("galvani_ingest_dead_letters_total", "reason")],
            unit="ops",
            width=8,
        ),
        Panel(
            "Dead-letter ratio",
            "Dead letters over messages handled, the ratio GalvaniDeadLetterRate watches.",
            [
                Query(
                    f"sum(rate(galvani_ingest_dead_letters_total[{RATE}]))"
                    f" / sum(rate(galvani_ingest_messages_total[{RATE}]))",
                    "dead letters",
                )
            ],
            unit="percentunit",
            width=8,
            thresholds=((None, "green"), (0.01, "red")),
        ),
        Panel(
            "Conflicts and batch splits",
            "Messages kept in message_conflicts, by reason; batches the database refused and"
            " that were written again one message at a time (each delays the whole batch).",
            [
                _rate("galvani_ingest_conflicts_total", "reason"),
                Query(f"sum(rate(galvani_ingest_batch_splits_total[{RATE}]))", "batch splits"),
            ],
            unit="ops",
            width=8,
        ),
        Panel(
            "Devices throttled",
            "Devices over their message budget, by action (banned, lifted, ban_failed, ...);"
            " GalvaniDeviceFlooding fires on banned and ban_failed.",
            [_rate("galvani_ingest_devices_throttled_total", "action")],
            unit="ops",
        ),
        Panel(
            "Messages over budget",
            "Messages committed from devices past their budget in the window (all stored).",
            [Query(f"sum(rate(galvani_ingest_over_budget_messages_total[{RATE}]))", "all")],
            unit="ops",
        ),
        *_worker_health("ingest"),
    ],
)

RULES: Final = Dashboard(
    "galvani-rules",
    "Galvani / Rules and notifications",
    "The rules workers (alerts, pushed mode tables, rollouts; services/rules/metrics.py) and the"
    " notification dispatchers that tell people of the alerts (services/notify/metrics.py).",
    [
        Row("Evaluation"),
        Panel(
            "Messages by channel and outcome",
            "Messages evaluated per second. invalid: skipped; failed: could not be evaluated,"
            " acknowledged and logged.",
            [_rate("galvani_rules_messages_total", "channel, outcome")],
            unit="ops",
            stacked=True,
        ),
        Panel(
            "Receipt to commit",
            "From a message's receipt by the worker to the commit of its evaluation.",
            _quantiles("galvani_rules_receipt_to_commit_seconds"),
            unit="s",
            width=6,
        ),
        Panel(
            "Evaluation time per batch",
            "Time to evaluate and commit one batch.",
            _quantiles("galvani_rules_evaluation_seconds"),
            unit="s",
            width=6,
        ),
        _consumer_backlog("rules"),
        Panel(
            "Messages per batch",
            "Mean messages per evaluated batch.",
            [
                Query(
                    f"sum(rate(galvani_rules_batch_messages_sum[{RATE}]))"
                    f" / sum(rate(galvani_rules_batch_messages_count[{RATE}]))",
                    "mean",
                )
            ],
        ),
        Row("Alerts and pushes"),
        Panel(
            "Alerts raised by severity",
            "New occurrences per second (an alert opened, or its count raised).",
            [_rate("galvani_rules_alerts_total", "severity")],
            unit="ops",
            stacked=True,
            width=8,
        ),
        Panel(
            "Rules raising the most alerts (1 h)",
            "The ten rules with the most occurrences in the last hour.",
            [
                Query(
                    "topk(10, sum by (rule) (increase(galvani_rules_alerts_total[1h])))", "{{rule}}"
                )
            ],
            width=8,
        ),
        Panel(
            "Alerts resolved",
            "Alerts the rules resolved themselves, by how.",
            [_rate("galvani_rules_resolved_total", "how")],
            unit="ops",
            width=8,
        ),
        Panel(
            "Mode tables pushed",
            "Restricted mode tables recorded for signing and publishing (by kind), and pushed"
            " tables the broker acknowledged (by outcome).",
            [
                _rate("galvani_rules_pushes_total", "kind"),
                Query(
                    f"sum by (outcome) (rate(galvani_rules_published_total[{RATE}]))",
                    "published {{outcome}}",
                ),
            ],
            unit="ops",
            width=8,
        ),
        Panel(
            "Rollouts paused and sweeps",
            "Canary rollouts paused by the critical-alert guard (1 h), and periodic sweeps run.",
            [
                Query("sum(increase(galvani_rules_rollouts_paused_total[1h]))", "rollouts paused"),
                Query("sum(increase(galvani_rules_sweeps_total[1h]))", "sweeps"),
            ],
            width=8,
        ),
        Row("Notifications"),
        Panel(
            "Oldest due notification",
            "Age of the oldest due notification (quiet hours count from their end);"
            " GalvaniNotificationBacklog fires above 10 minutes for 5 minutes.",
            [Query("max(galvani_notify_oldest_pending_age_seconds)", "oldest")],
            unit="s",
            width=8,
            thresholds=((None, "green"), (600, "red")),
        ),
        Panel(
            "Deliveries by outcome",
            "delivered; retried: to be tried again; failed: given up"
            " (GalvaniNotificationsFailing).",
            [_rate("galvani_notify_deliveries_total", "outcome")],
            unit="ops",
            stacked=True,
            width=8,
        ),
        Panel(
            "Alert to delivery",
            "From a notification's creation (the alert's transition) to the receiver's answer.",
            _quantiles("galvani_notify_delivery_latency_seconds"),
            unit="s",
            width=8,
        ),
        Panel(
            "Queue and in flight",
            "Notifications pending (the same figure from every dispatcher), and deliveries under"
            " way, summed over dispatchers.",
            [
                Query("max(galvani_notify_queue_depth)", "pending"),
                Query("sum(galvani_notify_in_flight)", "in flight"),
            ],
        ),
        *_worker_health("rules"),
    ],
)

API: Final = Dashboard(
    "galvani-api",
    "Galvani / API",
    "The REST API's requests by route template (services/api/metrics.py). Its server processes"
    " share one port and keep their own counters, so each scrape reads one of them: rates are"
    " a sample of the traffic.",
    [
        Row("Requests"),
        Panel(
            "Requests by status",
            "Requests answered per second, by HTTP status.",
            [_rate("galvani_api_requests_total", "status")],
            unit="reqps",
            stacked=True,
        ),
        Panel(
            "Server errors",
            "The share of answers that were 5xx.",
            [
                Query(
                    f'sum(rate(galvani_api_requests_total{{status=~"5.."}}[{RATE}]))'
                    f" / sum(rate(galvani_api_requests_total[{RATE}]))",
                    "5xx",
                )
            ],
            unit="percentunit",
            thresholds=((None, "green"), (0.01, "red")),
        ),
        Panel(
            "Latency (all routes)",
            "Time to the response's first byte (an event stream counts until its headers).",
            _quantiles("galvani_api_request_seconds"),
            unit="s",
        ),
        Panel(
            "p99 latency by route",
            "The slowest route templates.",
            [
                Query(
                    "topk(10, histogram_quantile(0.99, sum by (route, le)"
                    f" (rate(galvani_api_request_seconds_bucket[{RATE}]))))",
                    "{{route}}",
                )
            ],
            unit="s",
        ),
        Panel(
            "Busiest routes",
            "Requests per second by route template and method.",
            [
                Query(
                    f"topk(10, sum by (route, method) (rate(galvani_api_requests_total[{RATE}])))",
                    "{{method}} {{route}}",
                )
            ],
            unit="reqps",
        ),
        Panel(
            "Client errors by route",
            "4xx answers per second by route: refused keys (401, 403), rate limits (429),"
            " validation (422).",
            [
                Query(
                    "topk(10, sum by (route, status)"
                    f' (rate(galvani_api_requests_total{{status=~"4.."}}[{RATE}])))',
                    "{{status}} {{route}}",
                )
            ],
            unit="reqps",
        ),
        Row("Publishing and certificates"),
        Panel(
            "Tables published",
            "Mode tables the API published to devices, by outcome.",
            [_rate("galvani_api_config_published_total", "outcome")],
            unit="ops",
        ),
        Panel(
            "Revocation list expires in",
            "Time left before the device CA's newest revocation list expires; past it the"
            " broker refuses every certificate device (GalvaniRevocationListExpiring: under 6"
            " days for an hour). Empty without a device CA.",
            [Query("max(galvani_api_device_crl_next_update_seconds) - time()", "left")],
            unit="s",
            kind="stat",
            thresholds=((None, "red"), (6 * 86400, "green")),
        ),
    ],
)

FLEET: Final = Dashboard(
    "galvani-fleet",
    "Galvani / Fleet",
    "The devices as the backend sees them: connections, what they send, the alerts they raise"
    " and the tables pushed to them.",
    [
        Row("Devices"),
        Panel(
            "Connected clients",
            "Clients connected to the broker, devices and backend: Mosquitto's count, or the sum"
            " over the NATS cluster's nodes.",
            [
                Query("sum(galvani_broker_clients_connected)", "Mosquitto"),
                Query("sum(galvani_broker_node_connections)", "NATS cluster"),
            ],
        ),
        Panel(
            "Offline sessions (Mosquitto)",
            "Persistent sessions whose client is not connected; their QoS 1 messages queue.",
            [Query("sum(galvani_broker_clients_disconnected)", "offline sessions")],
        ),
        Panel(
            "Messages stored by channel",
            "What devices send, per second, once stored: telemetry, events, state, presence.",
            [
                Query(
                    "sum by (channel)"
                    f' (rate(galvani_ingest_messages_total{{outcome="stored"}}[{RATE}]))',
                    "{{channel}}",
                )
            ],
            unit="ops",
            stacked=True,
        ),
        Panel(
            "Samples stored",
            "Telemetry samples stored per second, and those from devices whose clock is suspect.",
            [
                Query(
                    f'sum(rate(galvani_ingest_samples_total{{outcome="stored"}}[{RATE}]))',
                    "stored",
                ),
                Query(
                    f'sum(rate(galvani_ingest_samples_total{{outcome="suspect"}}[{RATE}]))',
                    "suspect clock",
                ),
            ],
            unit="ops",
        ),
        Row("Health"),
        Panel(
            "Alerts raised by severity",
            "New alert occurrences across the fleet per second.",
            [_rate("galvani_rules_alerts_total", "severity")],
            unit="ops",
            stacked=True,
            width=8,
        ),
        Panel(
            "Devices banned for flooding (1 h)",
            "Devices over their message budget and banned from the broker in the last hour.",
            [
                Query(
                    "sum(increase(galvani_ingest_devices_throttled_total"
                    '{action=~"banned|ban_failed"}[1h]))',
                    "banned",
                )
            ],
            width=8,
        ),
        Panel(
            "Dead letters (1 h)",
            "Messages from devices that could not be stored as data in the last hour, by reason.",
            [
                Query(
                    "sum by (reason) (increase(galvani_ingest_dead_letters_total[1h]))",
                    "{{reason}}",
                )
            ],
            width=8,
        ),
        Row("Configuration"),
        Panel(
            "Mode tables pushed by the rules",
            "Restricted mode tables the rules pushed, by kind.",
            [_rate("galvani_rules_pushes_total", "kind")],
            unit="ops",
        ),
        Panel(
            "Tables published by the API",
            "Tables published through the API (rollouts, support), by outcome.",
            [_rate("galvani_api_config_published_total", "outcome")],
            unit="ops",
        ),
    ],
)

PLATFORM: Final = Dashboard(
    "galvani-platform",
    "Galvani / Broker and database",
    "The broker (the NATS cluster's nodes and JetStream consumers, or Mosquitto's statistics)"
    " and the database's replicas and maintenance, from the maintenance process"
    " (services/maintenance).",
    [
        Row("NATS cluster"),
        Panel(
            "Nodes up",
            "Nodes whose monitoring port reports them healthy with JetStream, out of those"
            " watched. GalvaniBrokerNodeDown fires for a node down a minute.",
            [
                Query("sum(max by (node) (galvani_broker_node_up))", "up"),
                Query("count(max by (node) (galvani_broker_node_up))", "watched"),
            ],
            kind="stat",
            width=6,
        ),
        Panel(
            "Node health",
            "1 up, 0 down, per node.",
            [Query("max by (node) (galvani_broker_node_up)", "{{node}}")],
            width=6,
            mappings={0: "down", 1: "up"},
            thresholds=((None, "red"), (1, "green")),
        ),
        Panel(
            "Connections by node",
            "Client connections per node (devices and services). After a node is lost its"
            " clients appear on the others.",
            [Query("max by (node) (galvani_broker_node_connections)", "{{node}}")],
            stacked=True,
        ),
        Panel(
            "Routes by node",
            "Each node's links to the others: nodes - 1 when the cluster is whole; fewer on"
            " one node is a partition.",
            [Query("max by (node) (galvani_broker_node_routes)", "{{node}}")],
            width=8,
        ),
        Panel(
            "Slow consumers",
            "Clients each node cut off or skipped for reading too slowly, per second.",
            [
                Query(
                    f"sum by (node) (rate(galvani_broker_node_slow_consumers_total[{RATE}]))",
                    "{{node}}",
                )
            ],
            unit="ops",
            width=8,
        ),
        Panel(
            "Stream messages",
            "Messages held in each stream (interest retention: until every consumer acked).",
            [Query("max by (stream) (galvani_broker_stream_messages)", "{{stream}}")],
            width=8,
        ),
        Panel(
            "Consumer backlog",
            "Per JetStream consumer (ingest, rules): messages not yet delivered.",
            [
                Query(
                    "max by (consumer) (galvani_broker_consumer_pending_messages)",
                    "{{consumer}} pending",
                )
            ],
        ),
        Panel(
            "Consumer messages in flight",
            "Delivered to a worker and not acknowledged; held until ack_wait (30 s) after a"
            " worker dies.",
            [
                Query(
                    "max by (consumer) (galvani_broker_consumer_ack_pending_messages)",
                    "{{consumer}} ack pending",
                )
            ],
        ),
        Panel(
            "Logins decided (auth callout)",
            "Every MQTT and NATS login on the cluster, decided by Galvani's responders"
            " (services/broker_access) from the database, per second by kind and outcome. A"
            " burst of device logins follows a node's loss: its devices reconnect elsewhere.",
            [_rate("galvani_broker_access_decisions_total", "kind, outcome")],
            unit="ops",
            stacked=True,
            width=8,
        ),
        Panel(
            "Login answer time",
            "Time for a responder to decide and sign one login (a database round trip and a"
            " password check); the broker waits for it on every CONNECT.",
            _quantiles("galvani_broker_access_answer_seconds"),
            unit="s",
            width=8,
        ),
        Panel(
            "Logins failed by the responders",
            "Device logins refused because the database could not be asked"
            " (GalvaniBrokerLoginsFailing), and malformed requests on the callout subject.",
            [
                Query(
                    f"sum(rate(galvani_broker_access_database_errors_total[{RATE}]))",
                    "database errors",
                ),
                Query(
                    f"sum(rate(galvani_broker_access_bad_requests_total[{RATE}]))",
                    "bad requests",
                ),
            ],
            unit="ops",
            width=8,
        ),
        Row("Mosquitto"),
        Panel(
            "Messages dropped",
            "Copies Mosquitto did not queue for a subscriber whose queue was full (per 5 minutes);"
            " GalvaniBrokerDroppingMessages fires on any.",
            [Query("sum(increase(galvani_broker_messages_dropped_total[5m]))", "dropped")],
            width=6,
        ),
        Panel(
            "Stored messages and subscriptions",
            "Messages in Mosquitto's store (queued, in flight, retained) and subscriptions.",
            [
                Query("sum(galvani_broker_stored_messages)", "stored messages"),
                Query("sum(galvani_broker_subscriptions)", "subscriptions"),
                Query("sum(galvani_broker_shared_subscriptions)", "shared subscriptions"),
            ],
            width=6,
        ),
        Panel(
            "Stored bytes",
            "Payload bytes of the messages in Mosquitto's store.",
            [Query("sum(galvani_broker_stored_bytes)", "stored")],
            unit="bytes",
            width=4,
        ),
        Panel(
            "Mosquitto uptime",
            "Time since the broker started; a drop is a restart, after which shared"
            " subscriptions are not restored until each worker resubscribes.",
            [Query("max(galvani_broker_uptime_seconds)", "uptime")],
            unit="s",
            kind="stat",
            width=4,
        ),
        Panel(
            "Watch",
            "1 while maintenance is connected to Mosquitto and subscribed to its statistics.",
            [
                Query("max(galvani_broker_watch_connected)", "connected"),
                Query(
                    "time() - max(galvani_broker_watch_last_message_timestamp_seconds) < bool 60",
                    "hearing",
                ),
            ],
            width=4,
        ),
        Row("Database"),
        Panel(
            "Replicas",
            "Streaming replicas connected to the primary (pg_stat_replication).",
            [Query("max(galvani_db_replicas)", "replicas")],
            kind="stat",
            width=6,
        ),
        Panel(
            "Replication lag",
            "How long after the primary each replica applies a commit (replay_lag);"
            " GalvaniDbReplicationLag fires above 30 s for 5 minutes.",
            [Query("max by (replica) (galvani_db_replication_lag_seconds)", "{{replica}}")],
            unit="s",
            width=6,
            thresholds=((None, "green"), (30, "red")),
        ),
        Panel(
            "Maintenance passes",
            "Passes (rollups, retention, partitions) per hour, by outcome.",
            [
                Query(
                    "sum by (outcome) (increase(galvani_maintenance_passes_total[1h]))",
                    "{{outcome}}",
                )
            ],
            width=6,
        ),
        Panel(
            "Pass time, rollup rows, drops",
            "Mean time of a pass; rollup rows recomputed and chunks or partitions dropped per"
            " hour.",
            [
                Query(
                    f"sum(rate(galvani_maintenance_pass_seconds_sum[{RATE}]))"
                    f" / sum(rate(galvani_maintenance_pass_seconds_count[{RATE}]))",
                    "pass seconds",
                ),
                Query("sum(increase(galvani_maintenance_rollup_rows_total[1h]))", "rollup rows"),
                Query("sum(increase(galvani_maintenance_dropped_total[1h]))", "dropped"),
            ],
            width=6,
        ),
        Panel(
            "Devices reported offline for silence",
            "Devices maintenance reported offline per hour because nothing was received from"
            " them for GALVANI_MAINTENANCE_SILENT_AFTER_S (300 s: the wills a broker killed -9"
            " never sent), and reported online again when a message from them was stored"
            " later. None are marked while no device at all was heard within that time (an"
            " outage of ingest or the database, not of the fleet).",
            [
                Query(
                    "sum by (change) (increase(galvani_maintenance_devices_silent_total[1h]))",
                    "{{change}}",
                )
            ],
            width=12,
        ),
    ],
)

DASHBOARDS: Final = (INGEST, RULES, API, FLEET, PLATFORM)


def _panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    steps = [{"color": color, "value": value} for value, color in panel.thresholds]
    defaults: dict[str, Any] = {
        "unit": panel.unit,
        "thresholds": {"mode": "absolute", "steps": steps},
        "mappings": [
            {"type": "value", "options": {str(v): {"text": t, "index": i}}}
            for i, (v, t) in enumerate(sorted(panel.mappings.items()))
        ],
    }
    if panel.kind == "timeseries":
        defaults["color"] = {"mode": "palette-classic"}
        defaults["custom"] = {
            "drawStyle": "line",
            "fillOpacity": 20 if panel.stacked else 5,
            "lineWidth": 1,
            "showPoints": "never",
            "spanNulls": False,
            "stacking": {"group": "A", "mode": "normal" if panel.stacked else "none"},
        }
        options: dict[str, Any] = {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    else:
        defaults["color"] = {"mode": "thresholds"}
        options = {
            "colorMode": "value",
            "graphMode": "area",
            "justifyMode": "auto",
            "orientation": "auto",
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "textMode": "auto",
        }
    return {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DS,
        "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options,
        "targets": [
            {
                "refId": chr(ord("A") + n),
                "datasource": DS,
                "expr": query.expr,
                "legendFormat": query.legend,
                "range": True,
            }
            for n, query in enumerate(panel.queries)
        ],
    }


def _layout(items: Sequence[Panel | Row]) -> list[dict[str, Any]]:
    """Panels left to right, wrapping at the grid's width; a row starts a new line."""
    panels: list[dict[str, Any]] = []
    x = y = line_height = 0
    for panel_id, item in enumerate(items, start=1):
        if isinstance(item, Row):
            y += line_height
            x, line_height = 0, 0
            panels.append(
                {
                    "id": panel_id,
                    "type": "row",
                    "title": item.title,
                    "collapsed": False,
                    "gridPos": {"h": 1, "w": GRID_WIDTH, "x": 0, "y": y},
                    "panels": [],
                }
            )
            y += 1
            continue
        if x + item.width > GRID_WIDTH:
            y += line_height
            x, line_height = 0, 0
        panels.append(_panel_json(item, panel_id, x, y))
        x += item.width
        line_height = max(line_height, item.height)
    return panels


def render(dashboard: Dashboard) -> dict[str, Any]:
    """The dashboard's JSON model, as Grafana's import takes it."""
    panel_types = sorted({item.kind for item in dashboard.items if isinstance(item, Panel)})
    return {
        "__inputs": [
            {
                "name": "DS_PROMETHEUS",
                "label": "Prometheus",
                "description": "The Prometheus that scrapes Galvani's services",
                "type": "datasource",
                "pluginId": "prometheus",
                "pluginName": "Prometheus",
            }
        ],
        "__requires": [
            {"type": "grafana", "id": "grafana", "name": "Grafana", "version": "10.4.0"},
            {"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"},
            *(
                {"type": "panel", "id": kind, "name": kind.capitalize(), "version": ""}
                for kind in panel_types
            ),
        ],
        "uid": dashboard.uid,
        "title": dashboard.title,
        "description": dashboard.description,
        "tags": ["galvani"],
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "time": {"from": "now-6h", "to": "now"},
        "timezone": "browser",
        "refresh": "30s",
        "annotations": {"list": []},
        "links": [
            {
                "type": "dashboards",
                "tags": ["galvani"],
                "asDropdown": True,
                "title": "Galvani",
                "includeVars": False,
                "keepTime": True,
            }
        ],
        "templating": {
            "list": [
                {
                    # Resolves ${DS_PROMETHEUS} when the file is provisioned rather than imported.
                    "name": "DS_PROMETHEUS",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "hide": 0,
                    "refresh": 1,
                    "current": {},
                    "options": [],
                }
            ]
        },
        "panels": _layout(dashboard.items),
    }


def dump(dashboard: Dashboard) -> str:
    """The file's text: stable key order, two-space indent, a final newline."""
    return json.dumps(render(dashboard), indent=2, ensure_ascii=False) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Write the dashboards, or with --check report the files that differ."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="compare only; write nothing")
    args = parser.parse_args(argv)
    stale = []
    for dashboard in DASHBOARDS:
        path = OUT_DIR / f"{dashboard.uid}.json"
        text = dump(dashboard)
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(path)
        else:
            OUT_DIR.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    for path in stale:
        print(f"{path.relative_to(REPO_ROOT)} differs from tools/grafana_dashboards.py")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
