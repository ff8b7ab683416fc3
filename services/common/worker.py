"""The loop every broker-fed worker runs (ingest and rules), and its process around it.

Run the network until a batch is full (``batch_max_messages``) or its oldest message is
``flush_interval_s`` old; hand the batch to the service, which commits what it does with it
in one transaction (through :attr:`WorkerLoop.db`, retried with capped backoff while the
database is away) and only then acknowledges it; repeat. Nothing is acknowledged before its
transaction commits, so a crash anywhere means redelivery (persistent session, same client
id), and each service makes a redelivered message change nothing. While the database is
waited for, the network keeps running (:meth:`WorkerLoop.wait`), so the broker session and
its keepalive stay up. On SIGTERM or SIGINT the loop handles what it holds, then disconnects
normally, which keeps the session (and whatever is unacknowledged) on the broker.

The broker session is an :class:`~services.common.broker.source.InboundSource`: the MQTT 5
:class:`~services.common.subscriber.Subscriber` on Mosquitto, or a JetStream pull consumer
(:mod:`services.common.broker.jetstream`) with ``GALVANI_BROKER=nats``, where what is
unacknowledged at a crash is redelivered after the consumer's ack wait instead.
"""

import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType

from services.common.broker import BrokerKind
from services.common.broker.jetstream import JetStreamSource, jetstream_config
from services.common.broker.source import InboundSource
from services.common.db import Conn
from services.common.logs import configure_logging
from services.common.metrics_server import WORKER_READINESS, start_metrics_server
from services.common.protocol.topics import shared_filters
from services.common.retrying import RetryingDatabase, StoppedWaiting
from services.common.settings import WorkerSettings
from services.common.subscriber import Inbound, Subscriber, SubscriberConfig
from services.common.worker_metrics import WorkerMetrics

log = logging.getLogger(__name__)

# What a service does with one batch: commit it, then acknowledge it on the subscriber.
HandleBatch = Callable[[list[Inbound]], None]


def subscriber_config(settings: WorkerSettings) -> SubscriberConfig:
    """The MQTT session of one worker: its client id, the four device channels shared
    with the other workers of its group, and TLS unless the settings turn it off."""
    return SubscriberConfig(
        host=settings.mqtt_host,
        port=settings.mqtt_port,
        username=settings.mqtt_username,
        password=settings.mqtt_password.get_secret_value(),
        client_id=settings.client_id(),
        topic_filters=shared_filters(settings.share_group),
        receive_maximum=settings.receive_maximum,
        session_expiry_s=settings.session_expiry_s,
        tls=settings.mqtt_tls_context(),
    )


def inbound_source(settings: WorkerSettings) -> InboundSource:
    """The worker's broker session: an MQTT 5 shared subscription on Mosquitto, a JetStream
    pull consumer of its group on NATS."""
    if settings.broker is BrokerKind.NATS:
        return JetStreamSource(jetstream_config(settings))
    return Subscriber(subscriber_config(settings))


class WorkerLoop:
    """One worker's broker session and database connection, and the loop that batches one
    into the other. Single-threaded: the service's handler runs on the loop's thread."""

    def __init__(
        self,
        settings: WorkerSettings,
        metrics: WorkerMetrics,
        stop: threading.Event,
        *,
        on_connect: Callable[[Conn], None] | None = None,
    ) -> None:
        """``on_connect`` runs on each new database connection (and is committed)."""
        self.settings = settings
        self.metrics = metrics
        self.stop = stop
        self.subscriber = inbound_source(settings)
        self.db = RetryingDatabase(
            settings.database_url.get_secret_value(),
            wait=self.wait,
            stop=stop,
            on_retry=metrics.count_retry,
            on_connect=on_connect,
        )

    def run(
        self,
        handle: HandleBatch,
        *,
        between: Callable[[], None] | None = None,
        close: Callable[[], None] | None = None,
    ) -> None:
        """Feed batches to ``handle`` until ``stop`` is set, then handle what is pending and
        disconnect. ``between`` runs before each look at the batch (periodic work on its own
        timer, so a backlog cannot starve it); ``close`` releases the service's own clients."""
        interval = self.settings.flush_interval_s
        limit = self.settings.batch_max_messages
        subscriber = self.subscriber
        try:
            while not self.stop.is_set():
                if between is not None:
                    between()
                age = subscriber.oldest_age_s()
                if len(subscriber.pending) >= limit or (subscriber.pending and age >= interval):
                    handle(subscriber.take(limit))
                else:
                    self.wait(interval - age if subscriber.pending else interval)
            while subscriber.pending:
                handle(subscriber.take(limit))
        except StoppedWaiting:
            log.warning("stopping with %d messages unacknowledged", subscriber.unacked)
        finally:
            WORKER_READINESS.stopped()
            subscriber.close()
            if close is not None:
                close()
            self.db.close()

    def wait(self, timeout_s: float) -> None:
        """Run the network for ``timeout_s`` (also while waiting for the database)."""
        self.subscriber.poll(timeout_s)
        self.metrics.observe(self.subscriber)
        WORKER_READINESS.observe(self.subscriber)


def stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT, for a service's loop to end on."""
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return stop


def serve(settings: WorkerSettings, run: Callable[[threading.Event], None]) -> None:
    """Run one worker process until SIGTERM or SIGINT: logging, the metrics endpoint (when
    ``metrics_port`` is set: ``/metrics``, and ``/ready``, 200 while the broker session is
    subscribed, services.common.metrics_server), then ``run`` with the event that asks it to
    stop."""
    configure_logging(settings.log_level)
    if settings.metrics_port:
        start_metrics_server(settings.metrics_port, settings.metrics_host)
    stop = stop_on_signals()
    service_log = logging.getLogger(f"galvani.{settings.service}")
    service_log.info("%s worker %s starting", settings.service, settings.worker_id)
    run(stop)
    service_log.info("%s worker %s stopped", settings.service, settings.worker_id)
