"""Mode tables pushed on ``config``: checked, applied now or after the session, answered.

The checks themselves are :func:`device_agent.modes.check_table`; this module decides when a
valid table takes over and writes what must survive a power loss in one transaction, and
keeps the applied table's record where a wiped store does not reach
(:mod:`device_agent.anti_rollback`).
"""

import hashlib
import json
import logging
from collections.abc import Iterable

from device_agent.anti_rollback import AntiRollback, AppliedRecord
from device_agent.modes import (
    ModeTable,
    check_expiry,
    check_table,
    factory_table,
    table_from_payload,
    table_sha256,
)
from device_agent.protocol import ConfigRejected
from device_agent.reports import Reporter
from device_agent.store import DeviceStore

log = logging.getLogger("galvani.agent")


class TableUpdates:
    """The mode table in force, the one waiting for a session to end, and their answers."""

    def __init__(
        self, store: DeviceStore, reporter: Reporter, *, public_keys: bytes | Iterable[bytes]
    ) -> None:
        self.store = store
        self.reporter = reporter
        self.public_keys = [public_keys] if isinstance(public_keys, bytes) else list(public_keys)
        self.device_id = reporter.identity.device_id
        self.anti_rollback = AntiRollback.beside(store.conn, self.device_id)
        stored = store.get("table")
        self.table: ModeTable = (
            table_from_payload(stored) if isinstance(stored, dict) else factory_table()
        )
        kept = self.anti_rollback.read()
        if kept is not None and kept.version > self.table.version:
            # The store was wiped (or lost the table): the newest table this device applied
            # still holds, so a reset can neither lift a lock nor open the door to older tables.
            log.warning(
                "%s: store has table %d, anti-rollback record %d: restoring %d",
                self.device_id,
                self.table.version,
                kept.version,
                kept.version,
            )
            self.table = table_from_payload(kept.table)
        self.pending: ModeTable | None = None
        self._pending_fingerprint: str | None = None

    def receive(self, now_ms: int, raw: bytes, *, running: str | None) -> None:
        """Check a table that arrived on ``config``; apply it unless session ``running`` is
        under way (then it waits for :meth:`apply_pending`); answer it."""
        fingerprint = hashlib.sha256(raw).hexdigest()
        if fingerprint in (self.store.get("config_seen"), self._pending_fingerprint):
            return  # the retained table again, after a reconnect: answered or waiting
        try:
            payload = json.loads(raw)
        except (UnicodeDecodeError, ValueError):
            log.warning("%s: config payload is not JSON; cannot answer it", self.device_id)
            self.store.put("config_seen", fingerprint)
            return
        if self._is_running_table(payload):
            # The table in force, delivered again to a store that no longer remembers seeing
            # it (wiped, then restored from the anti-rollback record): answered as applied
            # again, not rejected as stale_version.
            with self.store.transaction():
                self.store.put("table", dict(self.table.payload))
                self.store.put("config_seen", fingerprint)
                self.reporter.state(now_ms, self._applied_answer(self.table))
            return
        applied = max(self.table.version, self.pending.version if self.pending else 0)
        try:
            table = check_table(
                payload,
                public_keys=self.public_keys,
                device_id=self.device_id,
                applied_version=applied,
                now_ms=now_ms,
            )
        except ConfigRejected as rejected:
            # One transaction, as in _apply: answered and marked seen together, so a power
            # loss between the two can neither answer it twice nor leave it unanswered.
            with self.store.transaction():
                self._reject(now_ms, payload, rejected)
                self.store.put("config_seen", fingerprint)
            return
        if running is not None:
            # Kept in memory only: after a crash the broker delivers the retained table
            # again and it is checked afresh.
            log.info(
                "%s: mode table %d waits for session %s to end",
                self.device_id,
                table.version,
                running,
            )
            self.pending = table
            self._pending_fingerprint = fingerprint
            return
        self._apply(table, fingerprint, now_ms)

    def apply_pending(self, now_ms: int) -> None:
        """Apply the table that waited for the session that just ended, if any, unless it
        expired while it waited (then it is rejected as ``expired``, as on receipt)."""
        if self.pending is None or self._pending_fingerprint is None:
            return
        table, fingerprint = self.pending, self._pending_fingerprint
        try:
            check_expiry(table, now_ms)
        except ConfigRejected as rejected:
            with self.store.transaction():
                self._reject(now_ms, dict(table.payload), rejected)
                self.store.put("config_seen", fingerprint)
            self.forget_pending()
            return
        self._apply(table, fingerprint, now_ms)

    def forget_pending(self) -> None:
        """A reboot: the waiting table was in memory only (it is delivered again)."""
        self.pending = None
        self._pending_fingerprint = None

    def _is_running_table(self, payload: object) -> bool:
        if self.table.version == 0 or not isinstance(payload, dict):
            return False
        try:
            return table_sha256(payload) == self.table.sha256 and payload.get("sig") == (
                self.table.payload.get("sig")
            )
        except (TypeError, ValueError):  # no canonical JSON: not the table in force
            return False

    @staticmethod
    def _applied_answer(table: ModeTable) -> dict[str, object]:
        return {
            "version": table.version,
            "sha256": table.sha256,
            "status": "applied",
            "reason": None,
        }

    def _apply(self, table: ModeTable, fingerprint: str, now_ms: int) -> None:
        answer = self._applied_answer(table)
        # The anti-rollback record first: a power loss after it but before the store's
        # transaction boots with the record ahead of the store, which restores the table from
        # it and answers it when the broker delivers it again. The other order could leave a
        # table in force that a wiped store would forget.
        self.anti_rollback.raise_to(AppliedRecord(table.version, table.sha256, table.payload))
        # The table, the payload seen and the answer queued on state in one transaction. Apart,
        # a power loss after the table but before the rest would have the redelivered table
        # rejected as stale_version (it is not newer than itself) while it runs, and one after
        # config_seen would leave it never answered (the redelivery is skipped as seen).
        with self.store.transaction():
            self.store.put("table", dict(table.payload))
            self.store.put("config_seen", fingerprint)
            self.reporter.state(now_ms, answer)
        self.table = table
        self.forget_pending()
        log.info("%s: applied mode table %d", self.device_id, table.version)

    def _reject(self, now_ms: int, payload: object, rejected: ConfigRejected) -> None:
        log.warning("%s: rejected mode table: %s", self.device_id, rejected)
        version = payload.get("version") if isinstance(payload, dict) else None
        if not isinstance(payload, dict) or type(version) is not int or version < 1:
            # state.config.version is required and >= 1: a table without one cannot be
            # answered in v1. It is logged; the cloud sees no answer (config_unacked).
            return
        try:
            sha256 = table_sha256(payload)
        except (TypeError, ValueError):  # no canonical JSON: NaN, non-string keys
            sha256 = ""
        answer: dict[str, object] = {
            "version": version,
            "sha256": sha256,
            "status": "rejected",
            "reason": rejected.reason,
        }
        self.reporter.state(now_ms, answer)
