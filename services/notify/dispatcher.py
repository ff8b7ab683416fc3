"""The dispatcher: claims due notifications from the outbox and delivers them.

A claim is one short transaction: due rows (``status = 'pending' AND next_attempt_at <= now()``)
are locked with ``FOR UPDATE SKIP LOCKED`` (so several dispatchers never take the same row),
each gets ``attempts + 1`` and a lease (``next_attempt_at = now() + lease_s``), and the
transaction commits before anything is sent. The attempt is therefore counted even if the
process dies during it, and a row whose process died is due again when its lease ends, sent
with the same idempotency key (at-least-once). The outcome is recorded afterwards: delivered,
due again after a backoff, or failed once ``give_up_after_s`` have passed since the row was
written.

Order per alert: a row is claimed only when no pending row of the same (channel, alert) has a
lower ``alert_change``; an undelivered ``opened`` (in flight or waiting for its retry) holds
back the ``resolved`` after it.

Per channel, at most ``max_concurrency`` deliveries are in flight across every dispatcher: the
claim sets ``leased_until`` (the lease's end, migration 0015) and recording the outcome clears
it, so the rows with ``leased_until > now()`` are the channel's deliveries in flight anywhere
(a dead process's stop counting when their lease ends). Claims are serialised across
dispatchers by a transaction-scoped advisory lock taken first in the claim's transaction, so
the count a claim reads (a snapshot taken after the lock) includes every earlier claim's
committed leases and two dispatchers never exceed a channel's limit together.

A notification held back by its channel's quiet hours has ``next_attempt_at = held_until``:
it is simply not due until then; its give-up time and its delivery latency count from
``coalesce(held_until, created_at)``.
"""

import logging
import random
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from services.common.db import CONNECT_TIMEOUT_S, Conn, connect, describe_error
from services.common.errors import DatabaseUnavailable
from services.common.outbound_urls import CheckedUrl, RefusedUrl, check_url, system_resolver
from services.common.secret_box import SecretBox, SecretBoxError
from services.notify import http_post, messages, metrics, pagerduty, slack, smtp, webhook
from services.notify.settings import NotifySettings
from services.notify.webhook import Outcome

log = logging.getLogger("galvani.notify")

# Rows looked at per claim: more than the free capacity, so that rows of a channel reaching
# its limit in this claim do not leave the claim empty (channels already at their limit, and
# rows held back by an earlier one of their alert, are left out by the query itself).
SCAN_FACTOR = 4
# pg_advisory_xact_lock's key for claims (any fixed bigint no other part of Galvani uses:
# "notify" in ASCII).
CLAIM_LOCK_KEY = 0x6E6F74696679
# Under load, claim only once this share of the pool is free: a claim per finished delivery
# would be a claiming transaction per row on top of its outcome's.
CLAIM_BATCH_SHARE = 0.25
DATABASE_RETRY_S = 1.0
RECORD_CONNECTIONS = 4
# Threads writing delivered outcomes in batches (two: one commits while the other gathers).
RECORDERS = 2
# How long a finished delivery waits for a connection to record its outcome on.
RECORD_WAIT_S = 10.0
# The channel the outbox's insert trigger notifies (migration 0014).
QUEUED_CHANNEL = "galvani_notifications"
LISTEN_TIMEOUT_S = 1.0

_CLAIM_LOCK = "SELECT pg_advisory_xact_lock(%(key)s)"

# One statement: each channel's free slots (its limit less its rows in flight in any
# dispatcher, on notifications_leased_idx), due rows of channels with a free slot, at most
# ``free`` of each channel and ``capacity`` in all, leased. The claim is then one round trip
# (BEGIN, the lock, this, COMMIT pipelined): as four statements it took 25 ms a claim on a busy
# 2-core machine, each round trip waiting for the server to be scheduled, and claims (16 rows
# each) became the limit at about 640 deliveries/s.
#
# The candidates are read from notifications alone (the channels' limits are joined after
# the LIMIT): joined first, PostgreSQL hash-joined every due row and sorted them (46 ms a claim
# with 24,000 queued). Full channels are an array computed once, a filter PostgreSQL applies
# before the costlier order check. The order check is a scalar subquery, evaluated per due row with
# notifications_alert_idx, not NOT EXISTS: PostgreSQL turns that into an anti-join, and with
# statistics taken before a burst (a few rows due) it chose a nested loop over a sequential
# scan, 0.5 s per claim with 2,000 rows pending (72 deliveries/s).
#
# Ordered by next_attempt_at alone, which notifications_due_idx gives, so the scan stops after
# ``scan`` rows: with ``n.id`` as a second key the rows of one due time (an alert burst's, one
# transaction's now()) were all read, order-checked and sorted first: 35-65 ms a claim with
# 16,000 queued.
#
# The lease: the row is due again when it ends (its process died) and counts as in flight
# until then.
_CLAIM = """
WITH busy AS MATERIALIZED (
  SELECT channel_id, count(*)::integer AS n FROM notifications
  WHERE leased_until IS NOT NULL AND leased_until > now()
  GROUP BY channel_id
), candidates AS MATERIALIZED (
  SELECT n.id, n.channel_id, n.next_attempt_at
  FROM notifications n
  WHERE n.status = 'pending' AND n.next_attempt_at <= now()
    AND NOT n.channel_id = ANY(ARRAY(
      SELECT f.channel_id FROM busy f JOIN notification_channels l ON l.id = f.channel_id
      WHERE f.n >= l.max_concurrency))
    AND n.alert_change <= coalesce((
      SELECT min(e.alert_change) FROM notifications e
      WHERE e.status = 'pending' AND e.channel_id = n.channel_id AND e.alert_id = n.alert_id),
      n.alert_change)
  ORDER BY n.next_attempt_at
  LIMIT %(scan)s
  FOR UPDATE SKIP LOCKED
), chosen AS (
  SELECT id FROM (
    SELECT a.id, a.next_attempt_at, c.max_concurrency - coalesce(b.n, 0) AS free,
      row_number() OVER (PARTITION BY a.channel_id ORDER BY a.next_attempt_at, a.id) AS place
    FROM candidates a
    JOIN notification_channels c ON c.id = a.channel_id
    LEFT JOIN busy b ON b.channel_id = a.channel_id
  ) ranked
  WHERE place <= free
  ORDER BY next_attempt_at, id
  LIMIT %(capacity)s
)
UPDATE notifications n
SET attempts = n.attempts + 1,
  leased_until = now() + make_interval(secs => %(lease_s)s),
  next_attempt_at = now() + make_interval(secs => %(lease_s)s)
FROM chosen, notification_channels c
WHERE n.id = chosen.id AND c.id = n.channel_id
RETURNING n.id, n.channel_id, n.idempotency_key, n.payload::text, n.attempts, n.created_at,
  c.kind, c.url, c.secret_ciphertext, c.deleted_at IS NOT NULL, c.max_concurrency,
  c.recipients
"""

# Deliveries are recorded in batches (group commit) by RECORDERS threads: each writes every
# delivered outcome queued since its last batch in one statement and one commit, and the
# delivery thread moves on at once. One commit per row, on the delivery thread, kept 4
# connections waiting on WAL flushes (6 ms a record, 13 ms queueing for a connection under a
# busy machine's fsyncs): about 600 deliveries/s at most.
_DELIVERED = """
UPDATE notifications n
SET status = 'delivered', delivered_at = now(), last_status_code = d.code, last_error = NULL,
  leased_until = NULL
FROM unnest(%(ids)s::bigint[], %(codes)s::integer[]) AS d(id, code)
WHERE n.id = d.id AND n.status = 'pending'
RETURNING extract(epoch FROM n.delivered_at - coalesce(n.held_until, n.created_at))::float8
"""

# A failed attempt: failed for good once give_up_after_s have passed since creation (or the
# end of the quiet hours that held it; or when ``final``), else due again after the backoff,
# never later than the give-up time (so the last attempt is made then). The rows of the same
# alert after it wait for it anyway; their ``next_attempt_at`` moves with it, so a claim,
# which reads due rows in that order, does not walk past them while it waits (after a long
# outage, most of the backlog).
_NOT_DELIVERED = """
WITH head AS (
  UPDATE notifications
  SET last_error = %(error)s, last_status_code = %(code)s, leased_until = NULL,
    status = CASE WHEN %(final)s
        OR now() >= coalesce(held_until, created_at) + make_interval(secs => %(give_up_s)s)
      THEN 'failed' ELSE 'pending' END,
    next_attempt_at = least(now() + make_interval(secs => %(delay_s)s),
      coalesce(held_until, created_at) + make_interval(secs => %(give_up_s)s))
  WHERE id = %(id)s AND status = 'pending'
  RETURNING status, next_attempt_at, channel_id, alert_id, alert_change
), followers AS (
  UPDATE notifications f SET next_attempt_at = head.next_attempt_at
  FROM head
  WHERE head.status = 'pending' AND f.status = 'pending' AND f.channel_id = head.channel_id
    AND f.alert_id = head.alert_id AND f.alert_change > head.alert_change
    AND f.next_attempt_at < head.next_attempt_at
)
SELECT status FROM head
"""

# The oldest age is of rows due now, counted from when they became due: a row held by its
# channel's quiet hours (held_until) is not late while it waits for the window's end, and an
# eight-hour quiet window must not look like an eight-hour backlog (the backlog alert in
# deploy/prometheus/galvani-notify-alerts.yml reads this gauge).
_QUEUE_STATS = """
SELECT count(*),
  coalesce(extract(epoch FROM now() - min(coalesce(held_until, created_at))
    FILTER (WHERE coalesce(held_until, created_at) <= now())), 0)::float8
FROM notifications WHERE status = 'pending'
"""


@dataclass(frozen=True)
class Claimed:
    """A notification leased for one attempt, with its channel."""

    id: int
    channel_id: int
    idempotency_key: str
    body: bytes
    attempt: int
    created_at: datetime
    kind: str
    # NULL for e-mail channels (migration 0015), which have recipients instead.
    url: str | None
    secret_ciphertext: bytes | None
    channel_deleted: bool
    max_concurrency: int
    recipients: tuple[str, ...]


def backoff_s(attempt: int, base_s: float, max_s: float, rng: random.Random) -> float:
    """The delay before the next attempt after failed attempt ``attempt`` (1-based): full
    jitter, uniform in [0, min(max_s, base_s * 2^(attempt - 1))] (AWS's "Exponential Backoff
    and Jitter"), so receivers coming back are not hit by every dispatcher at once."""
    ceiling = min(max_s, base_s * 2.0 ** min(attempt - 1, 62))
    return rng.uniform(0.0, ceiling)


def claim(conn: Conn, capacity: int, lease_s: float) -> list[Claimed]:
    """Lease up to ``capacity`` due rows, at most each channel's free slots (its
    ``max_concurrency`` less its rows in flight in every dispatcher), and commit (the attempt
    is counted before it is made)."""
    params = {"scan": capacity * SCAN_FACTOR, "capacity": capacity, "lease_s": lease_s}
    # One round trip: the transaction's statements pipelined on an autocommit connection (an
    # error leaves the transaction aborted: the caller closes the connection).
    with conn.pipeline() as pipeline:
        conn.execute("BEGIN")
        # The plan must be notifications_due_idx in order, stopping after ``scan`` rows.
        # With statistics from before a burst (few rows due, autovacuum not yet run) the
        # planner chose a bitmap scan of every due row, each order-checked, then a sort:
        # 3-36 ms a claim (mean 7) through a 16,000-row burst, against 1.2-1.8 ms (mean 2.2)
        # with these off for the claim's transaction.
        conn.execute("SET LOCAL enable_seqscan = off")
        conn.execute("SET LOCAL enable_bitmapscan = off")
        # A statement of its own: the claim's snapshot is taken after the lock is held, so it
        # sees every lease committed by the claim before it.
        conn.execute(_CLAIM_LOCK, {"key": CLAIM_LOCK_KEY})
        cursor = conn.execute(_CLAIM, params)
        conn.execute("COMMIT")
        pipeline.sync()
        leased = cursor.fetchall()
    claimed = [
        Claimed(
            id=int(str(r[0])),
            channel_id=int(str(r[1])),
            idempotency_key=str(r[2]),
            body=str(r[3]).encode(),
            attempt=int(str(r[4])),
            created_at=_datetime(r[5]),
            kind=str(r[6]),
            url=None if r[7] is None else str(r[7]),
            secret_ciphertext=None if r[8] is None else _bytes(r[8]),
            channel_deleted=bool(r[9]),
            max_concurrency=int(str(r[10])),
            recipients=tuple(str(a) for a in _list(r[11])),
        )
        for r in leased
    ]
    claimed.sort(key=lambda c: c.id)
    return claimed


def _bytes(value: object) -> bytes:
    assert isinstance(value, bytes | memoryview)
    return bytes(value)


def _list(value: object) -> list[object]:
    assert value is None or isinstance(value, list)
    return value or []


def _datetime(value: object) -> datetime:
    assert isinstance(value, datetime)
    return value


def smtp_server(settings: NotifySettings) -> smtp.SmtpServer | None:
    """The operator's SMTP server from the settings, or None when none is configured."""
    if not settings.smtp_host or not settings.smtp_from:
        return None
    return smtp.SmtpServer(
        host=settings.smtp_host,
        port=settings.smtp_port,
        sender=settings.smtp_from,
        username=settings.smtp_username,
        password=settings.smtp_password,
        starttls=settings.smtp_starttls,
        tls=smtp.tls_context(settings.smtp_ca_file),
        timeout_s=settings.smtp_timeout_s,
    )


def _final_if(outcome: Outcome, statuses: frozenset[int]) -> Outcome:
    """``outcome`` marked final when the receiver answered one of ``statuses`` (documented
    as not worth retrying)."""
    if outcome.delivered or outcome.status_code not in statuses:
        return outcome
    return Outcome(False, outcome.status_code, outcome.error, final=True)


def queue_stats(conn: Conn) -> tuple[int, float]:
    """Pending notifications and the age in seconds of the oldest."""
    row = conn.execute(_QUEUE_STATS).fetchone()
    conn.commit()
    assert row is not None
    return int(str(row[0])), float(str(row[1]))


class Dispatcher:
    """Claims due rows on the calling thread and delivers them on a thread pool."""

    def __init__(self, settings: NotifySettings, secrets: SecretBox) -> None:
        self._settings = settings
        self._url = settings.database_url.get_secret_value()
        self._secrets = secrets
        self._tls = ssl.create_default_context()
        self._policy = settings.outbound_policy()
        self._resolve = system_resolver()
        self._rng = random.Random()  # noqa: S311 (jitter, not a secret)
        self._pool = ThreadPoolExecutor(settings.workers, thread_name_prefix="notify")
        self._lock = threading.Lock()
        # Deliveries under way in this process, per channel (their limits are kept by the
        # claim, across dispatchers).
        self._in_flight: Counter[int] = Counter()
        # Delivered outcomes waiting for the next batch: (row id, status code), written by
        # RECORDERS threads.
        self._delivered: list[tuple[int, int | None]] = []
        self._recorded = threading.Condition(threading.Lock())
        self._closing = False
        self._min_batch = max(1, int(settings.workers * CLAIM_BATCH_SHARE))
        self._wake = threading.Event()
        # Outcomes are recorded on a few connections: the RECORDERS batching deliveries, and
        # the delivery threads recording failed attempts (a connection per delivery thread
        # would be 32 per dispatcher). Commits are durable: with batches, synchronous_commit
        # off measured 1,650-1,860 deliveries/s against 1,510-1,650, within the noise.
        self._records: ConnectionPool[Conn] = ConnectionPool(
            self._url,
            min_size=1,
            max_size=RECORD_CONNECTIONS,
            kwargs={
                "autocommit": True,
                "connect_timeout": CONNECT_TIMEOUT_S,
            },
            timeout=RECORD_WAIT_S,
            open=False,
            name="notify-records",
        )
        # A delivery function per channel kind.
        self._deliverers: dict[str, Callable[[Claimed], Outcome]] = {
            "webhook": self._webhook,
            "slack": self._slack,
            "pagerduty": self._pagerduty,
            "email": self._email,
        }
        self._dashboard = settings.dashboard_url
        self._smtp = smtp_server(settings)

    def run(self, stop: threading.Event) -> None:
        """Claim and deliver until ``stop``; then let the deliveries under way finish."""
        conn: Conn | None = None
        next_stats = 0.0
        listener = threading.Thread(
            target=self._listen, args=(stop,), name="notify-listen", daemon=True
        )
        listener.start()
        self._records.open(wait=False)
        recorders = [
            threading.Thread(target=self._recorder, name=f"notify-record-{n}")
            for n in range(RECORDERS)
        ]
        for recorder in recorders:
            recorder.start()
        try:
            while not stop.is_set():
                try:
                    if conn is None or conn.closed:
                        conn = connect(self._url, autocommit=True)
                    if time.monotonic() >= next_stats:
                        depth, oldest = queue_stats(conn)
                        metrics.QUEUE_DEPTH.set(depth)
                        metrics.OLDEST_PENDING_AGE.set(oldest)
                        next_stats = time.monotonic() + self._settings.queue_stats_interval_s
                    self._wake.clear()
                    with self._lock:
                        busy = sum(self._in_flight.values())
                    capacity = self._settings.workers - busy
                    if busy and capacity < self._min_batch:
                        capacity = 0
                    claimed = claim(conn, capacity, self._settings.lease_s) if capacity > 0 else []
                except DatabaseUnavailable as exc:
                    log.warning("cannot claim notifications: %s", exc)
                    stop.wait(DATABASE_RETRY_S)
                    continue
                except psycopg.Error as exc:
                    # The connection, a failover, a migration under way: the claim's
                    # transaction rolled back; nothing was leased.
                    log.warning("cannot claim notifications: %s", describe_error(exc))
                    if conn is not None:
                        conn.close()
                    conn = None
                    stop.wait(DATABASE_RETRY_S)
                    continue
                for row in claimed:
                    with self._lock:
                        self._in_flight[row.channel_id] += 1
                    metrics.IN_FLIGHT.inc()
                    self._pool.submit(self._deliver, row)
                if len(claimed) < capacity or capacity <= 0:
                    # Nothing more is due: wait for the poll interval, or for a delivery to end
                    # (it may free the next row of its alert or a slot of its channel).
                    self._wake.wait(self._settings.poll_interval_s)
        finally:
            self._pool.shutdown(wait=True)
            with self._recorded:
                self._closing = True
                self._recorded.notify_all()
            for recorder in recorders:
                recorder.join()
            self._records.close()
            if conn is not None:
                conn.close()

    def _listen(self, stop: threading.Event) -> None:
        """Wake the claim loop on each new outbox row (``pg_notify`` from its insert trigger),
        so a notification leaves within milliseconds rather than at the next poll."""
        while not stop.is_set():
            try:
                with connect(self._url, autocommit=True) as conn:
                    conn.execute(f"LISTEN {QUEUED_CHANNEL}")
                    self._wake.set()
                    while not stop.is_set():
                        for _ in conn.notifies(timeout=LISTEN_TIMEOUT_S):
                            self._wake.set()
            except (DatabaseUnavailable, psycopg.Error) as exc:
                log.warning("not listening for new notifications (polling only): %s", exc)
                stop.wait(DATABASE_RETRY_S)

    def _deliver(self, row: Claimed) -> None:
        try:
            if row.channel_deleted:
                outcome = Outcome(False, error="the channel was deleted")
            elif row.kind in self._deliverers:
                outcome = self._deliverers[row.kind](row)
            else:
                outcome = Outcome(False, error=f"no delivery for channels of kind {row.kind!r}")
            self._record(row, outcome, final=row.channel_deleted or outcome.final)
        except Exception:
            # The row stays leased and is tried again when the lease ends; the pool's thread
            # must survive whatever one delivery raised.
            log.exception("notification %d: delivery failed unexpectedly", row.id)
        finally:
            with self._lock:
                self._in_flight[row.channel_id] -= 1
                if self._in_flight[row.channel_id] <= 0:
                    del self._in_flight[row.channel_id]
            metrics.IN_FLIGHT.dec()
            self._wake.set()

    def _webhook(self, row: Claimed) -> Outcome:
        # Checked again at send time (the API checked at creation): the name may resolve
        # elsewhere now. The POST goes to an address this check accepted.
        target = self._check(row.url)
        if isinstance(target, Outcome):
            return target
        secret = self._secret(row)
        if isinstance(secret, Outcome):
            return secret
        return webhook.post(
            target,
            # The stored payload's dashboard_url is null; filled here from the setting, the
            # same bytes on every attempt (a retry is signed over what the first sent).
            messages.with_dashboard_url(row.body, self._dashboard),
            secret=secret.encode(),
            idempotency_key=row.idempotency_key,
            timeout_s=self._settings.request_timeout_s,
            tls=self._tls,
        )

    def _slack(self, row: Claimed) -> Outcome:
        # The incoming-webhook URL is the secret (the url column holds a masked form).
        url = self._secret(row)
        if isinstance(url, Outcome):
            return url
        target = self._check(url)
        if isinstance(target, Outcome):
            return target
        notice = self._notice(row)
        if isinstance(notice, Outcome):
            return notice
        outcome = self._post(target, slack.body(notice), row)
        # 400 (invalid_payload, invalid_blocks): this message is refused as it is; a retry
        # would send the same bytes.
        return _final_if(outcome, slack.NOT_RETRIED)

    def _pagerduty(self, row: Claimed) -> Outcome:
        target = self._check(row.url or pagerduty.DEFAULT_URL)
        if isinstance(target, Outcome):
            return target
        routing_key = self._secret(row)
        if isinstance(routing_key, Outcome):
            return routing_key
        notice = self._notice(row)
        if isinstance(notice, Outcome):
            return notice
        outcome = self._post(target, pagerduty.body(notice, routing_key, self._dashboard), row)
        return _final_if(outcome, pagerduty.NOT_RETRIED)

    def _email(self, row: Claimed) -> Outcome:
        if self._smtp is None:
            return Outcome(False, error=smtp.NOT_CONFIGURED)
        if not row.recipients:
            return Outcome(False, error="the channel has no recipients", final=True)
        notice = self._notice(row)
        if isinstance(notice, Outcome):
            return notice
        recipients = list(row.recipients)
        return smtp.send(self._smtp, smtp.build(notice, self._smtp.sender, recipients), recipients)

    def _check(self, url: str | None) -> CheckedUrl | Outcome:
        if url is None:
            return Outcome(False, error="the channel has no URL", final=True)
        try:
            return check_url(url, self._policy, self._resolve)
        except RefusedUrl as exc:
            return Outcome(False, error=f"refused target: {exc}")

    def _secret(self, row: Claimed) -> str | Outcome:
        if row.secret_ciphertext is None:
            return Outcome(False, error="the channel has no secret", final=True)
        try:
            return self._secrets.decrypt(row.secret_ciphertext)
        except SecretBoxError as exc:
            return Outcome(False, error=str(exc))

    def _notice(self, row: Claimed) -> messages.Notice | Outcome:
        try:
            return messages.read_body(row.body, self._dashboard)
        except (ValueError, KeyError, TypeError) as exc:
            return Outcome(False, error=f"unreadable payload: {exc}", final=True)

    def _post(self, target: CheckedUrl, body: bytes, row: Claimed) -> Outcome:
        return http_post.send(
            target,
            body,
            {"Galvani-Idempotency-Key": row.idempotency_key},
            timeout_s=self._settings.request_timeout_s,
            tls=self._tls,
        )

    def _record_delivered(self, row: Claimed, outcome: Outcome) -> None:
        """Queue ``row``'s delivery for the next batch; the delivery thread moves on."""
        with self._recorded:
            self._delivered.append((row.id, outcome.status_code))
            self._recorded.notify()

    def _recorder(self) -> None:
        """Write the delivered outcomes queued, a batch per statement and commit, until the
        dispatcher closes and none is left."""
        while True:
            with self._recorded:
                while not self._delivered and not self._closing:
                    self._recorded.wait()
                if not self._delivered:
                    return
                batch, self._delivered = self._delivered, []
            try:
                with self._records.connection() as conn:
                    done = conn.execute(
                        _DELIVERED, {"ids": [b[0] for b in batch], "codes": [b[1] for b in batch]}
                    ).fetchall()
            except (PoolTimeout, psycopg.Error) as exc:
                # Not recorded: the leases end and the rows are sent again (same keys).
                log.warning("%d outcomes not recorded: %s", len(batch), describe_error(exc))
                continue
            finally:
                # Recorded: their channels' slots are free and their alerts' next rows due.
                self._wake.set()
            for (latency,) in done:
                metrics.DELIVERIES.labels("delivered").inc()
                metrics.DELIVERY_LATENCY.observe(float(str(latency)))

    def _record(self, row: Claimed, outcome: Outcome, *, final: bool) -> None:
        if outcome.delivered:
            self._record_delivered(row, outcome)
            return
        settings = self._settings
        delay = backoff_s(row.attempt, settings.backoff_base_s, settings.backoff_max_s, self._rng)
        try:
            with self._records.connection() as conn:
                status = conn.execute(
                    _NOT_DELIVERED,
                    {
                        "id": row.id,
                        "error": outcome.error,
                        "code": outcome.status_code,
                        "final": final,
                        "give_up_s": settings.give_up_after_s,
                        "delay_s": delay,
                    },
                ).fetchone()
        except (PoolTimeout, psycopg.Error) as exc:
            # Not recorded: the lease ends and the row is sent again (same idempotency key).
            log.warning("notification %d: outcome not recorded: %s", row.id, describe_error(exc))
            return
        if status is None:
            return
        if status[0] == "failed":
            metrics.DELIVERIES.labels("failed").inc()
            log.warning(
                "notification %d to channel %d failed after %d attempts: %s",
                row.id,
                row.channel_id,
                row.attempt,
                outcome.error,
            )
        else:
            metrics.DELIVERIES.labels("retried").inc()
