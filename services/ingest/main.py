"""An ingest worker: ``python -m services.ingest.main``.

The loop: run the network until a batch is full or its oldest message is
``flush_interval_s`` old; decode it; store it in one transaction (retrying with capped
backoff while the database is away); acknowledge it; repeat. Nothing is acknowledged before
it is committed, so a crash anywhere means redelivery, and redelivery means a duplicate the
database ignores.
"""

import gc
import logging
import signal
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from types import FrameType
from typing import Final

import psycopg
from prometheus_client import start_http_server

from services.common.db import Conn, Storage, storage_of
from services.common.logs import configure_logging
from services.common.retrying import RetryingDatabase, StoppedWaiting
from services.common.subscriber import Inbound, Subscriber, SubscriberConfig
from services.ingest import metrics
from services.ingest.acks import stored_acks
from services.ingest.decode import (
    ROW_SUSPECT,
    ROW_TS,
    DeadLetter,
    Decoded,
    EventIn,
    PresenceIn,
    StateIn,
    TelemetryIn,
    dead_letter,
    decode_inbound,
)
from services.ingest.settings import IngestSettings
from services.ingest.writer import BatchOutcome, write_batch

log = logging.getLogger("galvani.ingest")

CHANNELS: Final = ("telemetry", "events", "state", "presence")
GC_THRESHOLD: Final = 50_000


def topic_filters(group: str) -> tuple[str, ...]:
    """The shared-subscription filters of one worker group, one per device channel."""
    return tuple(f"$share/{group}/galvani/v1/d/+/{channel}" for channel in CHANNELS)


class Store:
    """The worker's database, through which each batch is written in one transaction."""

    def __init__(self, url: str, *, wait: Callable[[float], None], stop: threading.Event):
        self._storage = Storage.PLAIN
        self.db = RetryingDatabase(
            url, wait=wait, stop=stop, on_retry=_count_retry, on_connect=self._learn_storage
        )

    def _learn_storage(self, conn: Conn) -> None:
        self._storage = storage_of(conn)

    def write(self, inbound: Sequence[Inbound], decoded: Sequence[Decoded]) -> BatchOutcome:
        """Store one batch, waiting out database failures; raise StoppedWaiting if asked to stop."""
        try:
            return self._retrying(decoded)
        except psycopg.Error as exc:  # a bad message: split, so only it is dead-lettered
            log.warning(
                "batch of %d refused (%s); storing its messages one by one", len(decoded), exc
            )
            return self._one_by_one(inbound, decoded)

    def _retrying(self, decoded: Sequence[Decoded]) -> BatchOutcome:
        return self.db.transaction(lambda conn: write_batch(conn, decoded, self._storage))

    def _one_by_one(self, inbound: Sequence[Inbound], decoded: Sequence[Decoded]) -> BatchOutcome:
        total = BatchOutcome()
        for raw, item in zip(inbound, decoded, strict=True):
            try:
                outcome = self._retrying([item])
            except psycopg.Error as exc:
                log.exception("message on %s cannot be stored", raw.topic)
                outcome = self._retrying([unstorable(raw, exc)])
            total.add(outcome)
        return total

    def close(self) -> None:
        """Close the connection (it is reopened on the next write)."""
        self.db.close()


def _count_retry(exc: Exception) -> None:
    metrics.DB_RETRIES.labels(type(exc).__name__).inc()


def unstorable(message: Inbound, exc: Exception) -> DeadLetter:
    """A dead letter for a valid-looking message the database refused."""
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return dead_letter(message, "unstorable", detail)


def observe(outcome: BatchOutcome, decoded: Sequence[Decoded], committed_at: datetime) -> None:
    """Record one committed batch in the metrics."""
    for channel, count in outcome.stored.items():
        metrics.MESSAGES.labels(channel, "stored").inc(count)
    for channel, count in outcome.duplicates.items():
        metrics.MESSAGES.labels(channel, "duplicate").inc(count)
    for channel, count in outcome.invalid.items():
        metrics.MESSAGES.labels(channel, "invalid").inc(count)
    for channel, count in outcome.reused.items():
        metrics.MESSAGES.labels(channel, "seq_reused").inc(count)
    for reason, count in outcome.conflicts.items():
        metrics.CONFLICTS.labels(reason).inc(count)
    metrics.SAMPLES.labels("stored").inc(outcome.samples_stored)
    if outcome.samples_conflicting:
        metrics.SAMPLES.labels("conflicting").inc(outcome.samples_conflicting)
    metrics.BATCH_MESSAGES.observe(len(decoded))
    for item in decoded:
        if isinstance(item, DeadLetter):
            metrics.DEAD_LETTERS.labels(item.reason).inc()
            continue
        ts = _device_time(item)
        if ts is not None:
            metrics.LAG_SECONDS.observe(max(0.0, (committed_at - ts).total_seconds()))


def _device_time(item: TelemetryIn | EventIn | StateIn | PresenceIn) -> datetime | None:
    if isinstance(item, TelemetryIn):
        last = item.rows[-1]
        return None if last[ROW_SUSPECT] else last[ROW_TS]
    if isinstance(item, PresenceIn) and item.ts is None:
        return None
    return None if item.ts_suspect else item.ts


class Worker:
    """Batches from the subscriber into the store, acknowledged after commit."""

    def __init__(self, settings: IngestSettings, stop: threading.Event):
        self.settings = settings
        self.stop = stop
        self.subscriber = Subscriber(
            SubscriberConfig(
                host=settings.mqtt_host,
                port=settings.mqtt_port,
                username=settings.mqtt_username,
                password=settings.mqtt_password.get_secret_value(),
                client_id=f"galvani-ingest-{settings.worker_id}",
                topic_filters=topic_filters(settings.share_group),
                receive_maximum=settings.receive_maximum,
                session_expiry_s=settings.session_expiry_s,
            )
        )
        self.store = Store(settings.database_url.get_secret_value(), wait=self.wait, stop=stop)

    def run(self) -> None:
        """Consume until ``stop`` is set, then store what is pending and disconnect."""
        interval = self.settings.flush_interval_s
        limit = self.settings.batch_max_messages
        try:
            while not self.stop.is_set():
                age = self.subscriber.oldest_age_s()
                if len(self.subscriber.pending) >= limit or (
                    self.subscriber.pending and age >= interval
                ):
                    self.flush(limit)
                else:
                    self.wait(interval - age if self.subscriber.pending else interval)
            while self.subscriber.pending:
                self.flush(limit)
        except StoppedWaiting:
            log.warning("stopping with %d messages unacknowledged", self.subscriber.unacked)
        finally:
            self.subscriber.close()
            self.store.close()

    def wait(self, timeout_s: float) -> None:
        """Run the network for ``timeout_s`` (also while the store waits for the database)."""
        self.subscriber.poll(timeout_s)
        metrics.INFLIGHT.set(self.subscriber.unacked)
        metrics.CONNECTED.set(1 if self.subscriber.connected else 0)
        metrics.MQTT.update(self.subscriber.stats)

    def flush(self, limit: int) -> None:
        """Store and acknowledge the oldest ``limit`` pending messages."""
        inbound = self.subscriber.take(limit)
        decoded = [decode_inbound(message) for message in inbound]
        with metrics.COMMIT_SECONDS.time():
            outcome = self.store.write(inbound, decoded)
        committed_at = datetime.now(UTC)
        if self.settings.stored_acks:
            # Queued first so that they leave in the same write as the PUBACKs.
            for topic, payload in stored_acks(inbound, decoded):
                self.subscriber.publish(topic, payload)
        self.subscriber.ack(inbound)
        observe(outcome, decoded, committed_at)
        for device_id in outcome.seq_resets:
            log.warning(
                "device %s is reusing seqs after an hour without: its seq counter restarted;"
                " its messages under used seqs are kept in message_conflicts",
                device_id,
            )
        for item in decoded:
            if isinstance(item, DeadLetter):
                log.info(
                    "dead letter on %s: %s: %s (payload %d bytes, starts %r)",
                    item.topic,
                    item.reason,
                    item.detail,
                    item.payload_size,
                    item.payload[:80],
                )


def tune_garbage_collector() -> None:
    """Collect cycles less often: a batch allocates tens of thousands of short-lived tuples
    and none of them form cycles, and at the default threshold (700 allocations) the
    collector took about a sixth of decoding's CPU (``make bench-ingest-floor``'s message,
    decoded in batches of 500: 18.1 against 15.1 µs per message). Objects from start-up are
    frozen out of its scans."""
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 10, 10)


def main() -> None:
    """Run one worker until SIGTERM or SIGINT."""
    settings = IngestSettings()
    tune_garbage_collector()
    configure_logging(settings.log_level)
    if settings.metrics_port:
        start_http_server(settings.metrics_port, addr=settings.metrics_host)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("ingest worker %s starting", settings.worker_id)
    Worker(settings, stop).run()
    log.info("ingest worker %s stopped", settings.worker_id)


if __name__ == "__main__":
    main()
