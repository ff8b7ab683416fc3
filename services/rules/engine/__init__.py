"""Evaluating a batch of device messages against the catalogue, in one transaction.

The caller owns the transaction. For each device in the batch the engine takes a
transaction-scoped advisory lock (and one per user whose usage windows a session touches), so
two workers never evaluate the same device or user at once and each sees what the other
committed. It then stores what the windows need (samples, sessions, reboots: duplicates are
ignored by key) and re-evaluates every window the new data can change, including windows of
data that arrived earlier and lie later in event time. Occurrences are counted once by
:mod:`services.rules.alerts`, so the alerts depend on the messages, not on their order.

The package: ``store`` (the SQL and the locks), ``checks`` (one pure function per rule, from
what is known to findings), ``samples`` and ``events`` (reading through the store, judging
with the checks), ``batch`` (one evaluation's state); the sentences are
:mod:`services.rules.explain`'s, severities and actions :mod:`services.rules.catalogue`'s.
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from services.common.db import Conn
from services.common.protocol.enums import Channel
from services.common.protocol.models import (
    Event,
    Presence,
    SessionEnd,
    SessionStart,
    State,
    Telemetry,
)
from services.rules.alerts import Outcome
from services.rules.context import load_contexts
from services.rules.engine import events, samples, store
from services.rules.engine.batch import Batch

log = logging.getLogger(__name__)

DeviceMessage = Telemetry | Event | State | Presence


@dataclass(frozen=True)
class Received:
    """A valid message and where it came from."""

    device_id: str
    channel: Channel
    message: DeviceMessage
    received_at: datetime


def evaluate(conn: Conn, key: Ed25519PrivateKey, messages: Sequence[Received]) -> Outcome:
    """Evaluate ``messages`` in the caller's transaction; return what was raised and pushed."""
    device_ids = sorted({m.device_id for m in messages})
    with conn.pipeline():  # one round trip: the locks, then what the rules know of each device
        store.lock(conn, [f"d:{device_id}" for device_id in device_ids])
        contexts = load_contexts(conn, device_ids)
    batch = Batch(conn, key, contexts)
    user_keys = set()
    ends = []
    for m in messages:
        context = batch.contexts.get(m.device_id)
        if context is None:
            continue
        if isinstance(m.message, SessionStart):
            user_keys.add(f"u:{context.brand_id}:{context.user_key(m.message.user)}")
        elif isinstance(m.message, SessionEnd):
            ends.append((m.device_id, m.message.session))
    if ends:
        # An end is judged under the user its start named (stored with the start).
        user_keys.update(store.started_users(conn, ends))
    # Users after devices, each set sorted: every worker locks in the same order.
    store.lock(conn, sorted(user_keys))
    for device_id in device_ids:
        context = batch.contexts.get(device_id)
        mine = [m for m in messages if m.device_id == device_id]
        if context is None:
            log.debug("%d messages from unknown device %s", len(mine), device_id)
            continue
        telemetry: list[tuple[Telemetry, datetime]] = []
        for m in mine:
            if isinstance(m.message, Telemetry):
                telemetry.append((m.message, m.received_at))
            elif isinstance(m.message, State):
                events.state(batch, context, m.message)
            elif isinstance(m.message, Presence):
                events.presence(batch, context, m.message, m.received_at)
            else:
                events.event(batch, context, m.message)
        if telemetry:
            samples.telemetry(batch, context, telemetry)
    return batch.outcome
