"""An ingest worker: ``python -m services.ingest.main``.

What ingest does with each batch the shared worker loop (services.common.worker) hands it:
decode it; store it in one transaction (split message by message when the database refuses
the data, so that only the bad one becomes a dead letter); queue the stored acks; acknowledge
it. Nothing is acknowledged before it is committed, so a crash anywhere means redelivery, and
redelivery means a duplicate the database ignores.
"""

import gc
import logging
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Final

import psycopg

from services.common.broker import BrokerKind
from services.common.broker.nats_access import DatabaseBans, NatsDeviceAccess
from services.common.broker_certificates import end_device_session
from services.common.db import Conn, Storage, describe_error, storage_of
from services.common.protocol import ProtocolError, parse_topic
from services.common.subscriber import Inbound
from services.common.worker import WorkerLoop, serve
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
from services.ingest.throttle import Budget, Throttle, senders
from services.ingest.writer import BatchOutcome, write_batch

log = logging.getLogger("galvani.ingest")

GC_THRESHOLD: Final = 50_000


def unstorable(message: Inbound, exc: Exception) -> DeadLetter:
    """A dead letter for a valid-looking message the database refused, under the device its
    topic names, so the device's brand sees it among its dead letters."""
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    try:
        device_id, _ = parse_topic(message.topic)
    except ProtocolError:
        return dead_letter(message, "unstorable", detail)
    return dead_letter(message, "unstorable", detail, device_id=device_id)


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
    if outcome.samples_suspect:
        metrics.SAMPLES.labels("suspect").inc(outcome.samples_suspect)
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


def session_ender(settings: IngestSettings) -> Callable[[str], bool]:
    """Ends a device's session by takeover with the worker's own account on the service
    listener (a banned certificate device: throttle.py); on NATS, through the first node of
    ``mqtt_nodes`` that answers, in MQTT 3.1.1 (any banned device)."""
    if settings.broker is BrokerKind.NATS:
        nodes = NatsDeviceAccess.from_settings(settings)
        nodes.timeout_s = settings.throttle_takeover_timeout_s
        return nodes.end_session
    password = settings.mqtt_password.get_secret_value()
    tls = settings.mqtt_tls_context()

    def end(device_id: str) -> bool:
        return end_device_session(
            settings.mqtt_host,
            settings.mqtt_port,
            settings.mqtt_username,
            password,
            tls,
            device_id,
            settings.throttle_takeover_timeout_s,
        )

    return end


class Worker:
    """Batches from the worker loop into the database, acknowledged after commit."""

    def __init__(self, settings: IngestSettings, stop: threading.Event):
        self.settings = settings
        self._storage = Storage.PLAIN
        self.loop = WorkerLoop(settings, metrics.WORKER, stop, on_connect=self._learn_storage)
        self.subscriber = self.loop.subscriber
        # The ban is Mosquitto's password file and a takeover on its service listener; on NATS
        # a device_bans row the auth-callout responder reads (services/broker_access) and a
        # takeover through a node's MQTT port.
        on_nats = settings.broker is BrokerKind.NATS
        self.throttle = (
            Throttle(
                Budget(settings.throttle_messages, settings.throttle_window_s),
                settings.throttle_ban_s,
                settings.mosquitto_dir(),
                self.loop.db.transaction,
                end_session=session_ender(settings),
                takeover_interval_s=settings.throttle_takeover_interval_s,
                store=DatabaseBans() if on_nats else None,
            )
            if settings.throttle
            else None
        )

    def run(self) -> None:
        """Consume until ``stop`` is set, then store what is pending and disconnect."""
        throttle = self.throttle
        self.loop.run(
            self.flush,
            between=throttle.tick if throttle else None,
            close=throttle.close if throttle else None,
        )

    def _learn_storage(self, conn: Conn) -> None:
        self._storage = storage_of(conn)

    def write(self, inbound: Sequence[Inbound], decoded: Sequence[Decoded]) -> BatchOutcome:
        """Store one batch, waiting out database failures; raise StoppedWaiting if asked to stop."""
        try:
            return self._retrying(decoded)
        except psycopg.Error as exc:  # a bad message: split, so only it is dead-lettered
            metrics.BATCH_SPLITS.inc()
            log.warning(
                "batch of %d refused (%s); storing its messages one by one",
                len(decoded),
                describe_error(exc),
            )
            return self._one_by_one(inbound, decoded)

    def _retrying(self, decoded: Sequence[Decoded]) -> BatchOutcome:
        return self.loop.db.transaction(lambda conn: write_batch(conn, decoded, self._storage))

    def _one_by_one(self, inbound: Sequence[Inbound], decoded: Sequence[Decoded]) -> BatchOutcome:
        total = BatchOutcome()
        for raw, item in zip(inbound, decoded, strict=True):
            try:
                outcome = self._retrying([item])
            except psycopg.Error as exc:
                log.warning(
                    "message on %s (%d bytes) cannot be stored: %s",
                    raw.topic,
                    len(raw.payload),
                    describe_error(exc),
                )
                outcome = self._retrying([unstorable(raw, exc)])
            total.add(outcome)
        return total

    def flush(self, inbound: list[Inbound]) -> None:
        """Store and acknowledge one batch, oldest message first."""
        decoded = [decode_inbound(message) for message in inbound]
        if self.throttle is not None:
            # Before the commit, so a flooder is banned a commit sooner; the batch is stored
            # all the same (a ban drops nothing the broker acknowledged).
            self.throttle.observe(senders(decoded))
        with metrics.COMMIT_SECONDS.time():
            outcome = self.write(inbound, decoded)
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
                # The reason and size only: the payload and the detail (which can quote it)
                # are in dead_letters, for the device's brand.
                log.info(
                    "dead letter on %s: %s (payload %d bytes)",
                    item.topic,
                    item.reason,
                    item.payload_size,
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
    serve(settings, lambda stop: Worker(settings, stop).run())


if __name__ == "__main__":
    main()
