"""The feed behind ``GET /v1/alerts/stream``: one LISTEN connection per API process, fanned
out to the streams of each brand.

A trigger on ``alerts`` sends ``pg_notify('galvani_alerts', {id, brand, seq})`` on every
insert and update; PostgreSQL delivers it when the writing transaction commits, in commit
order, and never for a rollback. The feed wakes the brand's streams with the changed ids; each
stream reads those alerts' current rows itself, so a slow client only coalesces ids and never
holds up the others or the feed. A trigger on ``api_keys`` sends ``{key}`` on the same channel
when a key is revoked (migration 0011): the feed wakes that key's streams, which check their
key again and close.
"""

import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Final

import psycopg

log = logging.getLogger(__name__)

CHANNEL: Final = "galvani_alerts"
POLL_S: Final = 0.2  # how soon the thread notices close()
RECONNECT_S: Final = 2.0


@dataclass(eq=False)
class Subscription:
    """One stream's pending changes: alert ids to read, and an event to wake it."""

    brand_id: str
    key_id: uuid.UUID
    loop: asyncio.AbstractEventLoop
    pending: set[int] = field(default_factory=set)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    lost: bool = False  # the feed reconnected: notifications may have been missed

    def take(self) -> tuple[list[int], bool]:
        """The ids changed since the last call, and whether changes may have been missed."""
        ids, lost = sorted(self.pending), self.lost
        self.pending.clear()
        self.lost = False
        self.wake.clear()
        return ids, lost

    def notify(self, alert_id: int | None) -> None:
        """Note a changed alert (``None``: changes may have been missed); on the loop only."""
        if alert_id is None:
            self.lost = True
        else:
            self.pending.add(alert_id)
        self.wake.set()


class AlertFeed:
    """LISTENs on its own connection in a thread; subscriptions are woken on their loop."""

    def __init__(self, database_url: str) -> None:
        self._url = database_url
        self._lock = threading.Lock()
        self._subscriptions: set[Subscription] = set()
        self._stop = threading.Event()
        self._listening = threading.Event()
        self._thread = threading.Thread(target=self._run, name="alert-feed", daemon=True)
        self._thread.start()

    def subscribe(self, brand_id: str, key_id: uuid.UUID) -> Subscription:
        """A subscription for the calling stream of ``key_id`` (call on the event loop)."""
        subscription = Subscription(brand_id, key_id, asyncio.get_running_loop())
        with self._lock:
            self._subscriptions.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        """Stop waking ``subscription``."""
        with self._lock:
            self._subscriptions.discard(subscription)

    def wait_listening(self, timeout_s: float) -> bool:
        """Whether the feed is listening (for tests and readiness)."""
        return self._listening.wait(timeout_s)

    def close(self) -> None:
        """Stop listening."""
        self._stop.set()
        self._thread.join(POLL_S + RECONNECT_S + 1)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with psycopg.connect(self._url, autocommit=True) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self._listening.set()
                    while not self._stop.is_set():
                        for notify in conn.notifies(timeout=POLL_S):
                            self._deliver(notify.payload)
            except psycopg.Error as exc:
                if self._listening.is_set():
                    self._listening.clear()
                    self._wake_all_lost()
                log.warning("alert feed: %s; listening again in %.0f s", exc, RECONNECT_S)
                time.sleep(RECONNECT_S)

    def _deliver(self, payload: str) -> None:
        try:
            change = json.loads(payload)
            if "key" in change:
                self._wake_key(uuid.UUID(str(change["key"])))
                return
            alert_id, brand_id = int(change["id"]), str(change["brand"])
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("alert feed: unexpected notification %r", payload[:200])
            return
        with self._lock:
            targets = [s for s in self._subscriptions if s.brand_id == brand_id]
        for subscription in targets:
            _call_soon(subscription, alert_id)

    def _wake_key(self, key_id: uuid.UUID) -> None:
        """Wake the key's streams with nothing to read: each checks its key on every wake."""
        with self._lock:
            targets = [s for s in self._subscriptions if s.key_id == key_id]
        for subscription in targets:
            with contextlib.suppress(RuntimeError):  # its loop has closed: the stream is gone
                subscription.loop.call_soon_threadsafe(subscription.wake.set)

    def _wake_all_lost(self) -> None:
        with self._lock:
            targets = list(self._subscriptions)
        for subscription in targets:
            _call_soon(subscription, None)


def _call_soon(subscription: Subscription, alert_id: int | None) -> None:
    with contextlib.suppress(RuntimeError):  # its loop has closed: the stream is gone
        subscription.loop.call_soon_threadsafe(subscription.notify, alert_id)
