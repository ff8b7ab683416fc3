"""A worker's messages from NATS JetStream: a durable pull consumer, each message acknowledged
after the transaction that stored it commits.

The drop-in for :class:`services.common.subscriber.Subscriber` when ``GALVANI_BROKER=nats``
(both are :class:`services.common.broker.source.InboundSource`); the worker loop cannot tell
them apart.

* The workers of one group (``ingest``, ``rules``) pull from one durable consumer named after
  the group on the stream GALVANI_DEVICES (services.common.broker.subjects), which deals each
  message to one of them, as a ``$share`` group does on Mosquitto. The stream and the
  consumer are created, idempotently, on every connection.
* Bounded memory: a worker asks for at most ``receive_maximum`` messages it has not
  acknowledged (pull requests whose batches add up to the room it has), so, unlike
  Mosquitto's Receive Maximum, the bound holds at the server.
* Acknowledged after commit: :meth:`JetStreamSource.ack` publishes an empty message to each
  message's ``$JS.ACK...`` reply subject, all of a batch in one write. An ack names the
  stream sequence, not the connection, so a message that arrived on an earlier connection is
  acknowledged too (sent at the next connection when none is up); the server would otherwise
  redeliver it after ``ack_wait``, a duplicate the database ignores. A message held longer
  than a third of ``ack_wait`` (a batch waiting out a database outage) is kept by a ``+WPI``
  ("working on it") every third of ``ack_wait``, so it is redelivered only if the worker dies.
* Failover: pull requests carry ``idle_heartbeat``; while one is open and neither a message
  nor a heartbeat has come for MISSED_HEARTBEAT_FACTOR heartbeats, the requests are dropped
  and made again, and after MISSES_TO_RECONNECT such misses in a row (the node is cut off
  from the cluster, or stopped) the worker connects to the next server. What the old
  connection delivered and was not acknowledged comes again after ``ack_wait``.
* Publishes (ingest's stored acks, on MQTT topics) are core NATS messages on the mapped
  subject, at most once, leaving in the same write as the acknowledgements.

``Inbound.mid`` is a local counter (the key of the message's ack subject here), ``qos`` is 1.
"""

import json
import logging
import random
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from services.common.broker.nats_client import (
    ConnectionLost,
    NatsClient,
    NatsMessage,
    new_inbox_prefix,
)
from services.common.broker.subjects import (
    ACK_WAIT_S,
    NS_PER_S,
    STREAM_SUBJECTS,
    JetStreamError,
    ensure_consumer,
    ensure_stream,
    next_subject,
    subject_to_topic,
    topic_to_subject,
)
from services.common.broker_session import (
    RECONNECT_MAX_DELAY_S,
    RECONNECT_MIN_DELAY_S,
    SubscriberStats,
    jittered,
)
from services.common.settings import WorkerSettings
from services.common.subscriber import Inbound

log = logging.getLogger("services.common.subscriber")

# TCP, TLS, CONNECT and its PONG: above the auth callout's own timeout (5 s in
# deploy/stack/nats_cluster.py), so a slow responder fails the login there, not here.
CONNECT_TIMEOUT_S: Final = 10.0
# A pull request waits this long for its batch to fill, then ends with a 408.
PULL_EXPIRES_S: Final = 5.0
IDLE_HEARTBEAT_S: Final = 1.0
MISSED_HEARTBEAT_FACTOR: Final = 2.5
MISSES_TO_RECONNECT: Final = 2
# Open pull requests per worker: a second one is made, for the room acknowledgements freed,
# once that room is half the window; the first keeps waiting meanwhile.
MAX_OPEN_PULLS: Final = 2
ACK: Final = b""  # an empty message on the reply subject is +ACK
IN_PROGRESS: Final = b"+WPI"
JS_ACK_PREFIX: Final = "$JS.ACK."


@dataclass(frozen=True)
class JetStreamConfig:
    """Where to connect, as whom, and which consumer to pull from."""

    servers: tuple[str, ...]
    user: str
    password: str
    tls: ssl.SSLContext | None
    name: str  # the connection's name in the server's monitoring (the worker's client id)
    durable: str
    receive_maximum: int
    ack_wait_s: float = ACK_WAIT_S
    replicas: int | None = None  # None: 3 in a cluster, 1 on a lone server


def jetstream_config(settings: WorkerSettings) -> JetStreamConfig:
    """The consumer of one worker: its group's durable, its account, its window."""
    return JetStreamConfig(
        servers=tuple(settings.nats_servers()),
        user=settings.mqtt_username,
        password=settings.mqtt_password.get_secret_value(),
        tls=settings.mqtt_tls_context(),
        name=settings.client_id(),
        durable=settings.share_group,
        receive_maximum=settings.receive_maximum,
        ack_wait_s=settings.nats_ack_wait_s,
    )


class _Pull:
    """One open pull request: its reply subject and the messages it may still bring."""

    __slots__ = ("remaining", "reply")

    def __init__(self, reply: str, remaining: int) -> None:
        self.reply = reply
        self.remaining = remaining


class JetStreamSource:
    """One worker's pull consumer and the messages it holds but has not acknowledged.

    Single-threaded, like the Subscriber: the worker calls :meth:`poll` and :meth:`ack` from
    its loop.
    """

    def __init__(
        self, config: JetStreamConfig, *, draw: Callable[[], float] = random.random
    ) -> None:
        """``draw`` gives the uniform [0, 1) numbers that jitter reconnect delays."""
        self.config = config
        self.pending: deque[tuple[Inbound, float]] = deque()
        self.unacked = 0
        self.stats = SubscriberStats()
        self.connected = False
        self._client = NatsClient(
            list(config.servers),
            user=config.user,
            password=config.password,
            tls=config.tls,
            name=config.name,
        )
        self._pull_prefix = new_inbox_prefix(config.user)
        self._client.subscribe(f"{self._pull_prefix}.*")
        self._next_subject = next_subject(config.durable)
        self._pulls: deque[_Pull] = deque()
        self._outstanding = 0
        self._pull_count = 0
        # mid -> (ack subject, monotonic arrival): every message not yet acknowledged.
        self._replies: dict[int, tuple[str, float]] = {}
        self._mid = 0
        self._generation = 0
        self._unsent: list[str] = []  # ack subjects to send once connected again
        self._draw = draw
        self._ever_connected = False
        self._next_attempt = 0.0
        self._delay = RECONNECT_MIN_DELAY_S
        self._last_activity = 0.0
        self._misses = 0
        self._next_progress = 0.0

    # -- the loop's side ------------------------------------------------------------------

    def poll(self, timeout_s: float) -> None:
        """Run the network for up to ``timeout_s``: pull, read, keep alive, reconnect."""
        if not self.connected and not self._try_connect():
            time.sleep(min(timeout_s, max(0.0, self._next_attempt - time.monotonic())))
            return
        try:
            self._pull()
            self._keep_in_progress()
            self._receive(self._client.poll(timeout_s))
            self._watch_heartbeats()
        except ConnectionLost as exc:
            self._lose(str(exc))

    def full(self) -> bool:
        """Whether the worker holds as many messages as it allows itself."""
        limit = self.config.receive_maximum
        return self.unacked >= limit or len(self.pending) >= limit

    def oldest_age_s(self) -> float:
        """Seconds since the oldest pending message arrived (0 when none is pending)."""
        return time.monotonic() - self.pending[0][1] if self.pending else 0.0

    def take(self, limit: int) -> list[Inbound]:
        """Remove and return up to ``limit`` pending messages, oldest first."""
        count = min(limit, len(self.pending))
        return [self.pending.popleft()[0] for _ in range(count)]

    def ack(self, messages: list[Inbound]) -> int:
        """Acknowledge stored messages in arrival order, in one write; returns how many
        acknowledgements were sent (or kept for the next connection)."""
        replies = self._replies
        generation = self._generation
        subjects: list[str] = []
        current = 0
        for message in messages:
            entry = replies.pop(message.mid, None)
            if entry is None:
                continue
            subjects.append(entry[0])
            if message.generation == generation:
                current += 1
        if not subjects:
            return 0
        self.unacked = max(0, self.unacked - current)
        if not self.connected:
            self._unsent.extend(subjects)
            return len(subjects)
        client = self._client
        try:
            client.publish_each(subjects, ACK)
            client.flush()
        except ConnectionLost as exc:
            # Some may have left; a second ack is ignored, a lost one costs a redelivery.
            self._unsent.extend(subjects)
            self._lose(str(exc))
        return len(subjects)

    def publish(self, topic: str, payload: bytes) -> None:
        """Queue a core NATS message on the subject of MQTT ``topic``, to leave with the next
        write. At most once: dropped (and counted) without a connection."""
        if not self.connected:
            self.stats.publishes_dropped += 1
            return
        try:
            self._client.publish(topic_to_subject(topic), payload)
        except ValueError:
            self.stats.publishes_too_large += 1
            log.warning(
                "not publishing %d bytes on %s: over the server's max_payload", len(payload), topic
            )
        except ConnectionLost:
            self.stats.publishes_dropped += 1

    def close(self) -> None:
        """Send what is queued (acknowledgements) and disconnect. What is not acknowledged is
        redelivered, to this group's other workers or a later one, after ``ack_wait``."""
        if self.connected:
            self._client.close()
            log.info("disconnected from NATS")
        self.connected = False

    # -- connection -------------------------------------------------------------------------

    def _try_connect(self) -> bool:
        now = time.monotonic()
        if now < self._next_attempt:
            return False
        client = self._client
        try:
            client.connect(CONNECT_TIMEOUT_S)
            ensure_stream(client, replicas=self.config.replicas)
            created = ensure_consumer(
                client, self.config.durable, ack_wait_s=self.config.ack_wait_s
            )
        except ConnectionLost as exc:
            delay = self._retry_later()
            log.warning("cannot reach NATS: %s; trying again in %.2f s", exc, delay)
            return False
        except JetStreamError as exc:
            client.close()
            self.stats.subscribe_failures += 1
            delay = self._retry_later()
            log.error(  # noqa: TRY400 - the reason is the message
                "cannot set up consumer %s: %s; trying again in %.2f s",
                self.config.durable,
                exc,
                delay,
            )
            return False
        if self._ever_connected:
            self.stats.reconnects += 1
            if created:
                # The consumer and its acknowledgement state were gone (deleted by an
                # operator): what it had not delivered is delivered again from the stream.
                self.stats.sessions_lost += 1
                log.warning("consumer %s was missing and was created again", self.config.durable)
        self._ever_connected = True
        self._generation = client.generation
        self.unacked = 0
        self._pulls.clear()
        self._outstanding = 0
        self._misses = 0
        self._last_activity = time.monotonic()
        self._delay = RECONNECT_MIN_DELAY_S
        self.connected = True
        if self._unsent:
            try:
                client.publish_each(self._unsent, ACK)
            except ConnectionLost as exc:
                self._lose(str(exc))
                return False
            self._unsent.clear()
        log.info(
            "subscribed to %s (JetStream consumer %s at %s) as %s",
            ", ".join(STREAM_SUBJECTS),
            self.config.durable,
            client.server,
            self.config.name,
        )
        return True

    def _retry_later(self) -> float:
        delay = jittered(self._delay, self._draw())
        self._next_attempt = time.monotonic() + delay
        self._delay = min(self._delay * 2, RECONNECT_MAX_DELAY_S)
        return delay

    def _lose(self, why: str) -> None:
        """Close the connection and schedule the next attempt (on the next server)."""
        self._client.close()
        self.connected = False
        self._pulls.clear()
        self._outstanding = 0
        delay = self._retry_later()
        log.warning("lost NATS: %s; reconnecting in %.2f s", why, delay)

    # -- consuming --------------------------------------------------------------------------

    def _pull(self) -> None:
        """Ask for as many messages as the window has room for (see MAX_OPEN_PULLS)."""
        limit = self.config.receive_maximum
        room = limit - max(self.unacked, len(self.pending)) - self._outstanding
        if room <= 0:
            return
        if self._pulls and (len(self._pulls) >= MAX_OPEN_PULLS or room < limit // 2):
            return
        self._pull_count += 1
        reply = f"{self._pull_prefix}.{self._pull_count}"
        request = {
            "batch": room,
            "expires": int(PULL_EXPIRES_S * NS_PER_S),
            "idle_heartbeat": int(IDLE_HEARTBEAT_S * NS_PER_S),
        }
        self._client.publish(
            self._next_subject, json.dumps(request, separators=(",", ":")).encode(), reply=reply
        )
        if not self._pulls:
            self._last_activity = time.monotonic()
        self._pulls.append(_Pull(reply, room))
        self._outstanding += room

    def _receive(self, messages: list[NatsMessage]) -> None:
        if not messages:
            return
        now = time.monotonic()
        received_at = datetime.now(UTC)
        generation = self._generation
        pending = self.pending
        replies = self._replies
        pulls = self._pulls
        for message in messages:
            status = message.status
            if status is None:
                if not message.reply.startswith(JS_ACK_PREFIX):
                    log.warning("ignoring a message on %s without an ack subject", message.subject)
                    continue
                self._mid += 1
                mid = self._mid
                inbound = Inbound(
                    subject_to_topic(message.subject),
                    message.payload,
                    mid,
                    1,
                    received_at,
                    generation,
                )
                pending.append((inbound, now))
                replies[mid] = (message.reply, now)
                self.unacked += 1
                if pulls:
                    # The server fills pull requests in the order they came.
                    oldest = pulls[0]
                    oldest.remaining -= 1
                    self._outstanding -= 1
                    if oldest.remaining <= 0:
                        pulls.popleft()
            elif status == 100:
                pass  # idle heartbeat: the pull is alive
            elif status in (404, 408, 409):
                self._end_pull(message.subject)
                if status == 409:
                    log.info("pull request ended: %s", message.headers.get("Description", "409"))
            elif status == 503:
                raise ConnectionLost("JetStream did not answer the pull request (503)")
            else:
                log.warning("unexpected status %d on %s", status, message.subject)
        self._last_activity = now
        self._misses = 0

    def _end_pull(self, reply: str) -> None:
        for pull in self._pulls:
            if pull.reply == reply:
                self._pulls.remove(pull)
                self._outstanding -= pull.remaining
                return

    def _watch_heartbeats(self) -> None:
        if not self._pulls:
            return
        now = time.monotonic()
        if now - self._last_activity < MISSED_HEARTBEAT_FACTOR * IDLE_HEARTBEAT_S:
            return
        self._misses += 1
        self._pulls.clear()
        self._outstanding = 0
        self._last_activity = now
        if self._misses >= MISSES_TO_RECONNECT:
            raise ConnectionLost(f"no heartbeat for {self._misses} pull requests in a row")
        log.info("no heartbeat from the pull request; asking again")

    def _keep_in_progress(self) -> None:
        """Tell the server the messages held longer than a third of ack_wait are being
        worked on, so that it does not redeliver them while a batch waits for the database."""
        now = time.monotonic()
        if now < self._next_progress:
            return
        period = self.config.ack_wait_s / 3
        self._next_progress = now + period
        held = [reply for reply, arrived in self._replies.values() if now - arrived >= period]
        if held:
            self._client.publish_each(held, IN_PROGRESS)
