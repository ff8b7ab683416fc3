"""The responder loop: authorization requests in, signed answers out, one at a time.

Each request is answered from the database as it stands (no cache), so a responder is a
database round trip and a PBKDF2 check per CONNECT (measured in tests/test_broker_access.py).
Several responders serve one queue group; the server waits up to its authorization timeout
for an answer and refuses the client without one. When the database cannot be asked, a device
is refused at once (it retries with backoff) rather than left waiting for that timeout, which
would hold one of the server's connection slots for seconds.
"""

import logging
import threading
import time
from collections.abc import Callable
from typing import Final

import psycopg

from services.broker_access import metrics
from services.broker_access.access import SERVICE_ACCOUNTS, Authorizer, DeviceRow, lookup_device
from services.broker_access.callout import (
    CALLOUT_SUBJECT,
    QUEUE_GROUP,
    CalloutError,
    Grant,
    Refusal,
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

    def __call__(self, device_id: str) -> DeviceRow | None:
        if self._conn is None or self._conn.closed:
            self._conn = connect(self._url, autocommit=True)
        try:
            return lookup_device(self._conn, device_id)
        except psycopg.OperationalError:
            # A dropped connection (the database restarted): once more on a new one.
            self.close()
            self._conn = connect(self._url, autocommit=True)
            return lookup_device(self._conn, device_id)

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
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.authorizer = authorizer
        self.issuer = issuer
        self._clock = clock
        client.subscribe(CALLOUT_SUBJECT, queue=QUEUE_GROUP)

    def handle(self, message: NatsMessage) -> None:
        """Answer one request (queued on the client; sent by the next flush or poll)."""
        started = time.perf_counter()
        if not message.reply:
            metrics.BAD_REQUESTS.inc()
            log.warning("a request on %s without a reply subject", message.subject)
            return
        try:
            request = parse_request(message.payload.decode("ascii", "replace"))
        except CalloutError as exc:
            # Nothing to answer with: a response must name the request's user nkey and server.
            metrics.BAD_REQUESTS.inc()
            log.warning("ignored a request on %s: %s", message.subject, exc)
            return
        kind = "service" if request.username in SERVICE_ACCOUNTS else "device"
        try:
            decision = self.authorizer.decide(request)
        except (psycopg.Error, DatabaseUnavailable) as exc:
            metrics.DATABASE_ERRORS.inc()
            log.error(  # noqa: TRY400 - the reason is enough; a traceback per login is noise
                "cannot check %r's login: the database failed: %s", request.username, exc
            )
            decision = Refusal("the login could not be checked (database unavailable)")
        self.client.publish(message.reply, respond(request, decision, self.issuer))
        if isinstance(decision, Grant):
            metrics.DECISIONS.labels(kind, "granted").inc()
            log.debug("granted %s (%s)", decision.name, request.client_type)
        else:
            metrics.DECISIONS.labels(kind, "refused").inc()
            log.info(
                "refused a %s login from %s: %s", request.client_type, request.host, decision.reason
            )
        metrics.ANSWER_SECONDS.observe(time.perf_counter() - started)

    def run(self, stop: threading.Event) -> None:
        """Serve until ``stop`` is set, reconnecting (to the next server) when the connection
        is lost."""
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
            try:
                for message in self.client.poll(POLL_S):
                    self.handle(message)
                self.client.flush()
            except ConnectionLost as exc:
                log.warning("lost the NATS connection: %s", exc)
        self.client.close()
