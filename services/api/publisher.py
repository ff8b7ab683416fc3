"""Publishing signed tables after the request that recorded them has committed.

Requests hand their pushes to :class:`ConfigPublisher` and answer at once; a thread publishes
them one by one through ``publish_push`` (retained, QoS 1, newest table per device only). A
push that cannot be published now (the broker is away, another process holds the device's
publish lock) stays recorded as unpublished, and the rules workers' sweep publishes it.
"""

import logging
import queue
import threading
import time
from collections.abc import Iterable
from typing import Final

import paho.mqtt.client as paho
from prometheus_client import Counter
from sqlalchemy import Engine

from services.api.database import psycopg_connection
from services.api.settings import ApiSettings
from services.common.config_push import Push, PushError, connect_publisher, publish_push

log = logging.getLogger(__name__)

STOP_TIMEOUT_S: Final = 5.0
CONNECT_WAIT_S: Final = 5.0
CONNECT_POLL_S: Final = 0.02

PUBLISHED = Counter(
    "galvani_api_config_published_total",
    "Tables the API tried to publish, by outcome",
    ["outcome"],
)


class ConfigPublisher:
    """A broker client and a thread that publishes submitted pushes in order."""

    def __init__(self, settings: ApiSettings, engine: Engine) -> None:
        self._settings = settings
        self._engine = engine
        self._queue: queue.Queue[Push | None] = queue.Queue()
        # Connected on the first push: most API processes never publish, and a client that
        # keeps retrying an absent broker delays shutdown by its reconnect back-off.
        self._client: paho.Client | None = None
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="config-publisher", daemon=True)
        self._thread.start()

    def submit(self, pushes: Iterable[Push]) -> None:
        """Publish ``pushes`` soon, in this order."""
        for push in pushes:
            self._queue.put(push)

    def close(self) -> None:
        """Stop after what was submitted; what is left unpublished waits for the sweep."""
        self._closing.set()  # no more waiting for a broker that is not there
        self._queue.put(None)
        self._thread.join(STOP_TIMEOUT_S)
        self._disconnect()

    def _disconnect(self) -> None:
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
            self._client = None

    def _connected(self) -> paho.Client | None:
        """The client if it is connected. A new client is waited for (up to
        :data:`CONNECT_WAIT_S`); one that lost the broker is not, so a backlog is left to the
        sweep at once while paho reconnects in the background."""
        if self._client is None:
            self._client = connect_publisher(
                self._settings, f"galvani-api-{threading.get_native_id()}-publisher"
            )
            deadline = time.monotonic() + CONNECT_WAIT_S
            while not self._client.is_connected() and time.monotonic() < deadline:
                if self._closing.wait(CONNECT_POLL_S):
                    break
        return self._client if self._client.is_connected() else None

    def _run(self) -> None:
        while (push := self._queue.get()) is not None:
            client = self._connected()
            if client is None:
                PUBLISHED.labels("deferred").inc()
                log.warning(
                    "broker unavailable: table v%d for %s left to the sweep",
                    push.version,
                    push.device_id,
                )
                continue
            try:
                with self._engine.begin() as connection:
                    outcome = publish_push(psycopg_connection(connection), client, push)
            except (PushError, RuntimeError, ValueError) as exc:
                # paho would resend the unacknowledged (maybe stale) message on reconnect.
                self._disconnect()
                PUBLISHED.labels("failed").inc()
                log.warning("table v%d for %s not published: %s", push.version, push.device_id, exc)
                continue
            except Exception:
                PUBLISHED.labels("failed").inc()
                log.exception("table v%d for %s not published", push.version, push.device_id)
                continue
            PUBLISHED.labels(outcome.value).inc()
