"""A rules worker: ``python -m services.rules.main``.

What rules does with each batch the shared worker loop (services.common.worker) hands it,
due after ``flush_interval_s`` (a few milliseconds: alerts are latency-bound): evaluate it in
one transaction, acknowledge it, then publish the mode tables the transaction recorded.
Between batches, on timers of their own, it sweeps and trims. Nothing is acknowledged before its
evaluation commits, so a crash means redelivery, and redelivery changes nothing (occurrences
are keyed); a table recorded but not published is published by the next sweep.
"""

import logging
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from functools import partial
from typing import Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from services.common.config_push import (
    Published,
    Push,
    PushError,
    connect_publisher,
    publish_push,
    unanswered_pushes,
    unpublished_pushes,
)
from services.common.db import Conn, describe_error
from services.common.protocol import ProtocolError, decode, parse_topic
from services.common.protocol.enums import Channel
from services.common.protocol.limits import DEVICE_TIME_MAX_MS
from services.common.protocol.models import Telemetry
from services.common.retrying import StoppedWaiting
from services.common.signing import load_or_create_key
from services.common.subscriber import Inbound
from services.common.worker import WorkerLoop, serve
from services.rules import metrics
from services.rules.alerts import Outcome
from services.rules.engine import Received, evaluate
from services.rules.settings import RulesSettings
from services.rules.sweeps import TRIM_BATCH, sweep, trim

log = logging.getLogger("galvani.rules")

# Trimming runs between batches, a short batch at a time, so it never holds up evaluation for
# long: at most TRIM_BATCH rows per table per pass, every TRIM_INTERVAL_S (sooner while busy).
TRIM_INTERVAL_S: Final = 5.0
TRIM_BUSY_INTERVAL_S: Final = 0.2


def to_received(message: Inbound) -> Received | None:
    """The valid device message in ``message``, or None (ingest dead-letters the rest)."""
    try:
        device_id, channel = parse_topic(message.topic)
        if channel is Channel.CONFIG:
            return None
        decoded = decode(channel, message.payload)
    except ProtocolError as exc:
        metrics.MESSAGES.labels("unknown", "invalid").inc()
        log.debug("skipping invalid message on %s: %s", message.topic, exc)
        return None
    # Past DEVICE_TIME_MAX_MS a time cannot anchor a 7-day window in Python's datetime.
    if latest_ms(decoded) > DEVICE_TIME_MAX_MS:
        metrics.MESSAGES.labels(channel.value, "invalid").inc()
        log.debug("skipping a message on %s: ts past what windows can hold", message.topic)
        return None
    return Received(device_id, channel, decoded, message.received_at)


def latest_ms(message: object) -> int:
    """The latest device time in a message (0 when it has none)."""
    if isinstance(message, Telemetry):
        return max(sample.ts for sample in message.samples)
    ts = getattr(message, "ts", None)
    return ts if isinstance(ts, int) else 0


class Publisher:
    """A client of its own for publishing tables, its network loop on a background thread.

    The subscriber's client is driven by the worker's loop and cannot wait for a PUBACK while
    the worker waits for it.
    """

    def __init__(self, settings: RulesSettings) -> None:
        self.client = connect_publisher(settings, f"{settings.client_id()}-publisher")

    def close(self) -> None:
        """Disconnect and stop the network thread."""
        self.client.disconnect()
        self.client.loop_stop()


class Worker:
    """Batches from the worker loop through the engine, acknowledged after commit."""

    def __init__(self, settings: RulesSettings, stop: threading.Event, key: Ed25519PrivateKey):
        self.settings = settings
        self.key = key
        self.loop = WorkerLoop(settings, metrics.WORKER, stop)
        self.subscriber = self.loop.subscriber
        self.db = self.loop.db
        self.publisher = Publisher(settings)
        self._next_sweep = time.monotonic()
        self._next_trim = time.monotonic()
        # Tables were left unpublished because the publisher was not connected: published
        # as soon as it is (a worker's first sweep runs before its TLS connection is up),
        # not only at the next sweep.
        self._deferred = False

    def run(self) -> None:
        """Consume until ``stop`` is set, then evaluate what is pending and disconnect."""
        self.loop.run(self.flush, between=self.between, close=self._close_publisher)

    def between(self) -> None:
        """Sweep and trim when their timers say (it republishes lost pushes)."""
        if time.monotonic() >= self._next_sweep:
            self.sweep()
        elif self._deferred and self.publisher.client.is_connected():
            self._deferred = False
            self.publish_unpublished()
        if time.monotonic() >= self._next_trim:
            self.trim()

    def _close_publisher(self) -> None:
        self.publisher.close()  # looked up now: _publish_one may have replaced it

    def flush(self, inbound: list[Inbound]) -> None:
        """Evaluate, commit, acknowledge and act on one batch, oldest message first."""
        received = [r for r in map(to_received, inbound) if r is not None]
        started = time.perf_counter()
        outcome = self._evaluate(received)
        committed = datetime.now(UTC)
        metrics.EVALUATION_SECONDS.observe(time.perf_counter() - started)
        metrics.BATCH_MESSAGES.observe(len(inbound))
        self.subscriber.ack(inbound)
        outcome.count()
        for message in received:
            if any(message is failed for failed in outcome.failed):
                continue
            metrics.MESSAGES.labels(message.channel.value, "evaluated").inc()
            metrics.RECEIPT_TO_COMMIT_SECONDS.observe(
                max(0.0, (committed - message.received_at).total_seconds())
            )
        self.publish(outcome.pushes)

    def _evaluate(self, received: Sequence[Received]) -> Outcome:
        if not received:
            return Outcome()
        try:
            return self.db.transaction(lambda conn: evaluate(conn, self.key, received))
        except StoppedWaiting:
            raise
        # The data's fault (other database errors were retried): isolate it.
        except Exception as exc:  # noqa: BLE001 - logged below, without its message
            if len(received) == 1:
                # One message the engine cannot evaluate, and retrying cannot help.
                # Acknowledge it rather than stall every device behind it; ingest has it.
                message = received[0]
                metrics.MESSAGES.labels(message.channel.value, "failed").inc()
                # No traceback: an exception's message can quote the payload.
                log.error(  # noqa: TRY400
                    "cannot evaluate a %s message of %s: %s",
                    message.channel.value,
                    message.device_id,
                    describe_error(exc),
                )
                return Outcome(failed=[message])
            log.warning("batch of %d failed; evaluating its messages one by one", len(received))
            outcome = Outcome()
            for message in received:
                outcome.extend(self._evaluate([message]))
            return outcome

    def sweep(self) -> None:
        """Run the periodic rules and publish what was recorded but not published."""
        self._next_sweep = time.monotonic() + self.settings.sweep_interval_s
        try:
            outcome = self.db.transaction(lambda conn: sweep(conn, self.key))
        except StoppedWaiting:
            raise
        except Exception:  # logged; the next sweep tries again
            log.exception("sweep failed")
        else:
            outcome.count()
            self.publish(outcome.pushes)
        if not self.publish_unpublished():
            return
        grace_s = self.settings.republish_grace_s
        try:
            unanswered = self.db.transaction(lambda conn: unanswered_pushes(conn, grace_s))
        except StoppedWaiting:
            raise
        except Exception:  # logged; the next sweep tries again
            log.exception("cannot list unanswered tables")
            return
        if unanswered:
            log.info("publishing %d unanswered tables again", len(unanswered))
        self.publish(unanswered)

    def publish_unpublished(self) -> bool:
        """Publish every table recorded and not yet published; False if they cannot be
        listed (logged; the next sweep tries again)."""
        try:
            pending = self.db.transaction(unpublished_pushes)
        except StoppedWaiting:
            raise
        except Exception:  # logged; the next sweep tries again
            log.exception("cannot list unpublished tables")
            return False
        self.publish(pending)
        return True

    def trim(self) -> None:
        """Delete one short batch of expired rules state; soon again while there is more."""
        try:
            deleted = self.db.transaction(trim)
        except StoppedWaiting:
            raise
        except Exception:  # logged; trimming is tried again on its timer
            log.exception("trimming rules state failed")
            deleted = 0
        if deleted:
            log.debug("trimmed %d rows of rules state", deleted)
        busy = deleted >= TRIM_BATCH
        self._next_trim = time.monotonic() + (TRIM_BUSY_INTERVAL_S if busy else TRIM_INTERVAL_S)

    def publish(self, pushes: Sequence[Push]) -> None:
        """Publish recorded tables; what cannot be published now is left for the next sweep."""
        for n, push in enumerate(pushes):
            if not self.publisher.client.is_connected():
                self._deferred = True
                metrics.PUBLISHED.labels("deferred").inc(len(pushes) - n)
                log.warning("broker unavailable: %d tables deferred", len(pushes) - n)
                return
            try:
                result = self.db.transaction(partial(self._publish_one, push=push))
            except StoppedWaiting:
                raise
            except Exception as exc:  # noqa: BLE001 - the broker or database is in trouble
                metrics.PUBLISHED.labels("failed").inc()
                log.warning("table v%d for %s not published: %s", push.version, push.device_id, exc)
                return  # the rest waits for the next sweep rather than 10 s each
            metrics.PUBLISHED.labels(result.value).inc()
            log.info("table v%d for %s: %s", push.version, push.device_id, result.value)

    def _publish_one(self, conn: Conn, push: Push) -> Published:
        try:
            return publish_push(conn, self.publisher.client, push)
        except (PushError, RuntimeError, ValueError):
            # Still holding the device's publish lock: drop the client, and with it the
            # message paho would otherwise resend (stale) when it reconnects.
            self.publisher.close()
            self.publisher = Publisher(self.settings)
            raise


def main() -> None:
    """Run one worker until SIGTERM or SIGINT."""
    settings = RulesSettings()

    def run(stop: threading.Event) -> None:
        key = load_or_create_key(settings.key_dir())
        Worker(settings, stop, key).run()

    serve(settings, run)


if __name__ == "__main__":
    main()
