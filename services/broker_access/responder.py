"""The responder loop: authorization requests in, signed answers out.

Each request is answered from the database as it stands (no cache). The requests one read of
the socket brings are decided together, their devices read in one query, so a reconnect storm
costs a round trip per batch; each login still costs a signature check of the request, a
PBKDF2 check and two signatures (measured in tests/test_broker_access.py).
Several responders serve one queue group; the server waits up to its authorization timeout
for an answer and refuses the client without one. When the database cannot be asked, a device
is refused at once (it retries with backoff) rather than left waiting for that timeout, which
would hold one of the server's connection slots for seconds.
"""

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Final

import psycopg

from services.broker_access import metrics
from services.broker_access.access import (
    SERVICE_ACCOUNTS,
    Authorizer,
    DeviceRow,
    LookupFailed,
    lookup_devices,
)
from services.broker_access.callout import (
    CALLOUT_SUBJECT,
    QUEUE_GROUP,
    AuthRequest,
    CalloutError,
    Grant,
    parse_request,
    respond,
)
from services.broker_access.nkeys import KeyPair
from services.common.broker.nats_client import ConnectionLost, NatsClient, NatsMessage
from services.common.db import Conn, connect
from services.common.errors import DatabaseUnavailable

log = logging.getLogger("galvani.broker_access")

POLL_S: Final = 0.5
CONNECT_TIMEOUT_S: Final = 5.0
RECONNECT_MIN_S: Final = 0.1
RECONNECT_MAX_S: Final = 5.0


class DeviceLookup:
    """Device rows from one autocommit connection, opened again after a failure."""

    def __init__(self, database_url: str) -> None:
        self._url = database_url
        self._conn: Conn | None = None

    def __call__(self, device_ids: Sequence[str]) -> dict[str, DeviceRow]:
        for attempt in range(2):  # a dropped connection (the database restarted): once more
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = connect(self._url, autocommit=True)
                return lookup_devices(self._conn, device_ids)
            except (psycopg.OperationalError, DatabaseUnavailable) as exc:
                self.close()
                if attempt:
                    metrics.DATABASE_ERRORS.inc(len(device_ids))
                    raise LookupFailed(str(exc)) from exc
            except psycopg.Error as exc:
                metrics.DATABASE_ERRORS.inc(len(device_ids))
                raise LookupFailed(str(exc)) from exc
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class Responder:
    """Answers the callout's requests on one NATS connection."""

    def __init__(
        self,
        client: NatsClient,
        authorizer: Authorizer,
        issuer: KeyPair,
    ) -> None:
        self.client = client
        self.authorizer = authorizer
        self.issuer = issuer
        client.subscribe(CALLOUT_SUBJECT, queue=QUEUE_GROUP)

    def handle(self, messages: Sequence[NatsMessage]) -> None:
        """Answer the requests among ``messages`` (queued on the client; sent by the next
        flush or poll)."""
        started = time.perf_counter()
        requests: list[tuple[str, AuthRequest]] = []
        for message in messages:
            if not message.reply:
                metrics.BAD_REQUESTS.inc()
                log.warning("a request on %s without a reply subject", message.subject)
                continue
            try:
                requests.append(
                    (message.reply, parse_request(message.payload.decode("ascii", "replace")))
                )
            except CalloutError as exc:
                # Nothing to answer with: a response names the request's user nkey and server.
                metrics.BAD_REQUESTS.inc()
                log.warning("ignored a request on %s: %s", message.subject, exc)
        if not requests:
            return
        decisions = self.authorizer.decide_all([request for _, request in requests])
        for (reply, request), decision in zip(requests, decisions, strict=True):
            self.client.publish(reply, respond(request, decision, self.issuer))
            kind = "service" if request.username in SERVICE_ACCOUNTS else "device"
            if isinstance(decision, Grant):
                metrics.DECISIONS.labels(kind, "granted").inc()
                log.debug("granted %s (%s)", decision.name, request.client_type)
            else:
                metrics.DECISIONS.labels(kind, "refused").inc()
                log.info(
                    "refused a %s login from %s: %s",
                    request.client_type,
                    request.host,
                    decision.reason,
                )
        # Per answer: what the batch cost, shared (they were decided together).
        each = (time.perf_counter() - started) / len(requests)
        for _ in requests:
            metrics.ANSWER_SECONDS.observe(each)

    def run(self, stop: threading.Event, on_serving: Callable[[], None] | None = None) -> None:
        """Serve until ``stop`` is set, reconnecting (to the next server) when the connection
        is lost; ``on_serving`` is called once, when the first connection has subscribed."""
        delay = RECONNECT_MIN_S
        while not stop.is_set():
            if not self.client.connected:
                try:
                    self.client.connect(CONNECT_TIMEOUT_S)
                except ConnectionLost as exc:
                    log.warning("%s; trying again in %.1f s", exc, delay)
                    stop.wait(delay)
                    delay = min(delay * 2, RECONNECT_MAX_S)
                    continue
                delay = RECONNECT_MIN_S
                log.info("serving %s at %s", CALLOUT_SUBJECT, self.client.server)
                if on_serving is not None:
                    on_serving()  # the server's PONG to the CONNECT followed our SUB
                    on_serving = None
            try:
                self.handle(self.client.poll(POLL_S))
                self.client.flush()
            except ConnectionLost as exc:
                log.warning("lost the NATS connection: %s", exc)
        self.client.close()
