"""Publishing signed tables after the request that recorded them has committed.

Requests hand their pushes to :class:`ConfigPublisher` and answer at once; a thread publishes
them one by one through ``publish_push`` (retained, QoS 1, newest table per device only). A
push that cannot be published now (the broker is away, another process holds the device's
publish lock) stays recorded as unpublished, and the rules workers' sweep publishes it.
"""

import logging
import queue
import threading
from collections.abc import Iterable
from typing import Final, cast

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client import Counter
from sqlalchemy import Engine

from services.api.settings import ApiSettings
from services.common.config_push import Push, PushError, publish_push
from services.common.db import Conn

log = logging.getLogger(__name__)

KEEPALIVE_S: Final = 30
STOP_TIMEOUT_S: Final = 5.0

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
        self._client = self._connect()
        self._thread = threading.Thread(target=self._run, name="config-publisher", daemon=True)
        self._thread.start()

    def _connect(self) -> paho.Client:
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"galvani-api-{threading.get_native_id()}-publisher",
            protocol=paho.MQTTv5,
        )
        client.username_pw_set(
            self._settings.mqtt_username, self._settings.mqtt_password.get_secret_value()
        )
        client.reconnect_delay_set(1, 30)
        client.connect_async(self._settings.mqtt_host, self._settings.mqtt_port, KEEPALIVE_S)
        client.loop_start()
        return client

    def submit(self, pushes: Iterable[Push]) -> None:
        """Publish ``pushes`` soon, in this order."""
        for push in pushes:
            self._queue.put(push)

    def close(self) -> None:
        """Stop after what was submitted; what is left unpublished waits for the sweep."""
        self._queue.put(None)
        self._thread.join(STOP_TIMEOUT_S)
        self._client.disconnect()
        self._client.loop_stop()

    def _run(self) -> None:
        while (push := self._queue.get()) is not None:
            if not self._client.is_connected():
                PUBLISHED.labels("deferred").inc()
                log.warning(
                    "broker unavailable: table v%d for %s left to the sweep",
                    push.version,
                    push.device_id,
                )
                continue
            try:
                with self._engine.begin() as connection:
                    conn = cast(Conn, connection.connection.driver_connection)
                    outcome = publish_push(conn, self._client, push)
            except (PushError, RuntimeError, ValueError) as exc:
                # paho would resend the unacknowledged (maybe stale) message on reconnect.
                self._client.disconnect()
                self._client.loop_stop()
                self._client = self._connect()
                PUBLISHED.labels("failed").inc()
                log.warning("table v%d for %s not published: %s", push.version, push.device_id, exc)
                continue
            except Exception:
                PUBLISHED.labels("failed").inc()
                log.exception("table v%d for %s not published", push.version, push.device_id)
                continue
            PUBLISHED.labels(outcome.value).inc()
