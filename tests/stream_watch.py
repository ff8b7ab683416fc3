"""Watching device traffic on the callout cluster as the backend sees it: through the stream.

No backend account may subscribe to a device's channels on the cluster (SERVICE_GRANTS in
services/broker_access/callout.py): ingest and rules read them from GALVANI_DEVICES through
their groups' consumers. So a test that checks what reached the backend does the same, as
ingest: a consumer of its own on the stream (every message published after it is made),
pulled and acknowledged, deleted when the watcher closes.
"""

import json
import secrets
import time
from pathlib import Path
from types import TracebackType

from deploy.stack.nats_cluster import NatsCluster
from services.common.broker.nats_client import NatsClient, NatsMessage, new_inbox_prefix
from services.common.broker.subjects import STREAM, api, ensure_stream, next_subject
from services.common.broker_auth import ServiceAccount
from services.common.tls import client_context

TIMEOUT_S = 5.0
PULL_EXPIRES_NS = 500_000_000


class StreamWatcher:
    """A consumer of GALVANI_DEVICES made as ingest, from now on; close it (or use ``with``)."""

    def __init__(self, cluster: NatsCluster, password: str, ca_file: Path) -> None:
        self.name = f"watch-{secrets.token_hex(6)}"
        self.received: list[NatsMessage] = []
        self._client = NatsClient(
            cluster.nats_urls().split(","),
            user=ServiceAccount.INGEST.value,
            password=password,
            tls=client_context(ca_file),
            name=self.name,
        )
        self._client.connect(TIMEOUT_S)
        self._inbox = new_inbox_prefix(ServiceAccount.INGEST.value)
        self._client.subscribe(f"{self._inbox}.*")
        ensure_stream(self._client)
        config = {
            "durable_name": self.name,
            "name": self.name,
            "deliver_policy": "new",
            "ack_policy": "explicit",
        }
        api(
            self._client,
            f"$JS.API.CONSUMER.CREATE.{STREAM}.{self.name}",
            {"stream_name": STREAM, "config": config},
        )

    def wait_for(self, subject: str, timeout_s: float = TIMEOUT_S) -> NatsMessage | None:
        """The first message on ``subject`` (a NATS subject) since the watcher was made, waiting
        up to ``timeout_s``; None when none came."""
        deadline = time.monotonic() + timeout_s
        while True:
            for message in self.received:
                if message.subject == subject:
                    return message
            if time.monotonic() >= deadline:
                return None
            self._pull(min(1.0, max(0.1, deadline - time.monotonic())))

    def _pull(self, wait_s: float) -> None:
        request = {"batch": 100, "expires": PULL_EXPIRES_NS, "no_wait": False}
        reply = f"{self._inbox}.{secrets.token_hex(4)}"
        self._client.publish(next_subject(self.name), json.dumps(request).encode(), reply=reply)
        end = time.monotonic() + wait_s
        while time.monotonic() < end:
            for message in self._client.poll(end - time.monotonic()):
                if message.status is None and message.reply:
                    self.received.append(message)
                    self._client.publish(message.reply, b"")
            self._client.flush()

    def close(self) -> None:
        try:
            api(self._client, f"$JS.API.CONSUMER.DELETE.{STREAM}.{self.name}", None)
        finally:
            self._client.close()

    def __enter__(self) -> "StreamWatcher":
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
