"""One device's outbox: the messages it sent that the backend has not yet said it stored.

The outbox is the only copy of a message until the backend says it has stored it (a stored-ack
on the device's ``ack`` topic; in the legacy mode, the broker's PUBACK), and the ``seq`` it
carries must never be handed out twice: the backend stores one message per ``(device_id, seq)``,
so a reused seq would make it discard a new message as a duplicate. Both therefore live in
SQLite and change in the same transaction.

A device offline for days must not fill its flash, so the outbox is bounded by age and by
bytes. When it must give something up it drops telemetry first, then state, and events last:
session starts and ends, faults and user reports are what the safety rules need. Every drop is
counted, so the device can report a gap in ``seq`` instead of leaving the backend to guess.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from device_agent.database import DeviceRows

log = logging.getLogger("galvani.agent.store")

RETAINED_CHANNEL = "state"
# The order in which the outbox gives messages up when it is over its byte limit.
DROP_ORDER = ("telemetry", "state", "events")
# Well under SQLite's limit on bound parameters (999 before 3.32).
_IDS_PER_QUERY = 500

_Dropped = tuple[int, str, int]  # (seq, channel, payload bytes)


@dataclass(frozen=True, slots=True)
class OutboxLimits:
    """How much one device's outbox may hold before it drops messages."""

    max_bytes: int = 16 * 1024 * 1024
    max_age_s: float = 7 * 24 * 3600.0

    def __post_init__(self) -> None:
        if self.max_bytes <= 0 or self.max_age_s <= 0:
            raise ValueError(f"outbox limits must be positive: {self}")


@dataclass(frozen=True, slots=True)
class Pending:
    """A message in the outbox: not yet acknowledged as stored by the backend."""

    id: int
    seq: int
    channel: str
    payload: bytes
    retain: bool


@dataclass(frozen=True, slots=True)
class DropCounts:
    """What the outbox has dropped since the device was first set up."""

    messages: int = 0
    telemetry: int = 0
    events: int = 0
    state: int = 0
    first_seq: int | None = None
    last_seq: int | None = None


def _pending(row_id: int, seq: int, channel: str, payload: bytes) -> Pending:
    return Pending(row_id, seq, channel, bytes(payload), channel == RETAINED_CHANNEL)


class Outbox(DeviceRows):
    """One device's seq and outbox in a shared database."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        device_id: str,
        limits: OutboxLimits = OutboxLimits(),
    ) -> None:
        super().__init__(conn, device_id)
        self.limits = limits
        # Messages enqueued through this object: lets the link skip looking at an outbox
        # that has not changed (the fleet ticks thousands of idle devices a second).
        self.enqueued = 0

    def enqueue(self, channel: str, build: Callable[[int], bytes], *, now_ms: int) -> int:
        """Allocate the next seq, store build(seq) in the outbox, enforce the limits."""
        if channel not in DROP_ORDER:
            raise ValueError(f"the outbox carries {', '.join(DROP_ORDER)}, not {channel!r}")
        with self.transaction():
            # RETURNING rows are fetched in full, so the statement has finished before COMMIT.
            ((seq, total),) = self.conn.execute(
                "UPDATE devices SET last_seq = last_seq + 1 WHERE device_id = ? "
                "RETURNING last_seq, backlog_bytes",
                (self.device_id,),
            ).fetchall()
            payload = build(seq)
            size = len(payload)
            new_id: int | None = None
            too_big: list[_Dropped] = []
            if size > self.limits.max_bytes:
                # Kept, it would have to be the only message, and still break the limit.
                too_big.append((seq, channel, size))
            else:
                new_id = self.conn.execute(
                    "INSERT INTO outbox (device_id, seq, channel, payload, size, enqueued_ms) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (self.device_id, seq, channel, payload, size, now_ms),
                ).lastrowid
                total += size
            removed = self._drop_old(now_ms)
            total -= sum(row[2] for row in removed)
            removed += self._drop_over_size(total - self.limits.max_bytes)
            kept = new_id is not None  # removed may include it: it was stored, then dropped
            self._account(
                messages=int(kept) - len(removed),
                nbytes=(size if kept else 0) - sum(row[2] for row in removed),
                dropped=too_big + removed,
            )
        if too_big or removed:
            seqs = [row[0] for row in too_big + removed]
            log.warning(
                "%s: outbox over its limits (%d bytes, %.0f s): dropped %d messages, seq %d..%d",
                self.device_id,
                self.limits.max_bytes,
                self.limits.max_age_s,
                len(seqs),
                min(seqs),
                max(seqs),
            )
        self.enqueued += 1
        return int(seq)

    def _drop_old(self, now_ms: int) -> list[_Dropped]:
        cutoff_ms = now_ms - round(self.limits.max_age_s * 1000)
        return self.conn.execute(
            "DELETE FROM outbox WHERE device_id = ? AND enqueued_ms < ? "
            "RETURNING seq, channel, size",
            (self.device_id, cutoff_ms),
        ).fetchall()

    def _drop_over_size(self, excess: int) -> list[_Dropped]:
        victims: list[tuple[int, int, str, int]] = []  # (id, seq, channel, bytes)
        for channel in DROP_ORDER:
            if excess <= 0:
                break
            # Walks the (device_id, channel, id) index oldest first and stops as soon as
            # enough is freed: usually one or two rows. The message just inserted takes its
            # place in that order (its channel's newest), so new telemetry never pushes out
            # an event; since the outbox was within its limit before, dropping at most every
            # older message always frees enough.
            rows = self.conn.execute(
                "SELECT id, seq, size FROM outbox WHERE device_id = ? AND channel = ? ORDER BY id",
                (self.device_id, channel),
            )
            for row_id, seq, size in rows:
                victims.append((row_id, seq, channel, size))
                excess -= size
                if excess <= 0:
                    break
            rows.close()
        self.conn.executemany("DELETE FROM outbox WHERE id = ?", [(v[0],) for v in victims])
        return [(seq, channel, size) for _, seq, channel, size in victims]

    def _account(self, messages: int, nbytes: int, dropped: list[_Dropped]) -> None:
        by_channel = dict.fromkeys(DROP_ORDER, 0)
        for _, channel, _ in dropped:
            by_channel[channel] += 1
        seqs = [row[0] for row in dropped]
        first = min(seqs, default=None)
        last = max(seqs, default=None)
        # min()/max() with several arguments are SQLite's scalar functions, which return NULL
        # if any argument is NULL: hence the coalesce.
        self.conn.execute(
            "UPDATE devices SET backlog_messages = backlog_messages + ?, "
            "backlog_bytes = backlog_bytes + ?, "
            "dropped_telemetry = dropped_telemetry + ?, dropped_events = dropped_events + ?, "
            "dropped_state = dropped_state + ?, "
            "dropped_first_seq = coalesce(min(dropped_first_seq, ?), dropped_first_seq, ?), "
            "dropped_last_seq = coalesce(max(dropped_last_seq, ?), dropped_last_seq, ?) "
            "WHERE device_id = ?",
            (
                messages,
                nbytes,
                by_channel["telemetry"],
                by_channel["events"],
                by_channel["state"],
                first,
                first,
                last,
                last,
                self.device_id,
            ),
        )

    def pending(self, *, after_id: int = 0, limit: int = 100) -> list[Pending]:
        """Messages still in the outbox with id > after_id, oldest first."""
        if limit < 0:
            raise ValueError(f"limit must not be negative, not {limit}")  # SQLite: no limit
        rows = self.conn.execute(
            "SELECT id, seq, channel, payload FROM outbox "
            "WHERE device_id = ? AND id > ? ORDER BY id LIMIT ?",
            (self.device_id, after_id, limit),
        ).fetchall()
        return [_pending(*row) for row in rows]

    def pending_by_id(self, ids: Iterable[int]) -> list[Pending]:
        """The messages with these outbox ids that are still in the outbox, oldest first
        (the link sends a few delivered ones again by id)."""
        ids = sorted(set(ids))
        found: list[Pending] = []
        for at in range(0, len(ids), _IDS_PER_QUERY):
            chunk = ids[at : at + _IDS_PER_QUERY]
            rows = self.conn.execute(
                "SELECT id, seq, channel, payload FROM outbox "  # noqa: S608 (placeholders only)
                f"WHERE device_id = ? AND id IN ({', '.join('?' * len(chunk))}) ORDER BY id",
                (self.device_id, *chunk),
            ).fetchall()
            found += [_pending(*row) for row in rows]
        return found

    def kept(self, ids: Iterable[int]) -> set[int]:
        """Which of these outbox ids are still in the outbox."""
        ids = sorted(set(ids))
        found: set[int] = set()
        for at in range(0, len(ids), _IDS_PER_QUERY):
            chunk = ids[at : at + _IDS_PER_QUERY]
            found.update(
                row_id
                for (row_id,) in self.conn.execute(
                    "SELECT id FROM outbox "  # noqa: S608 (placeholders only)
                    f"WHERE device_id = ? AND id IN ({', '.join('?' * len(chunk))})",
                    (self.device_id, *chunk),
                )
            )
        return found

    def delete(self, ids: Iterable[int]) -> None:
        """Delete these outbox rows (the legacy mode: the broker's PUBACK). Unknown ids are
        ignored."""
        ids = list(ids)
        if not ids:
            return
        with self.transaction():
            sizes = [
                size
                for row_id in ids
                for (size,) in self.conn.execute(
                    "DELETE FROM outbox WHERE device_id = ? AND id = ? RETURNING size",
                    (self.device_id, row_id),
                ).fetchall()
            ]
            self._account(messages=-len(sizes), nbytes=-sum(sizes), dropped=[])

    def delete_stored(self, ranges: Iterable[tuple[int, int]]) -> int:
        """Delete the rows whose seq lies in one of the inclusive ``(first, last)`` ranges the
        backend acknowledged as stored; how many there were. Unknown seqs are ignored."""
        ranges = list(ranges)
        if not ranges:
            return 0
        sizes: list[int] = []
        with self.transaction():
            for first, last in ranges:
                # A range scan of the UNIQUE (device_id, seq) index: the cost is the rows
                # deleted, not the size of the outbox or the width of the range.
                sizes += [
                    size
                    for (size,) in self.conn.execute(
                        "DELETE FROM outbox WHERE device_id = ? AND seq BETWEEN ? AND ? "
                        "RETURNING size",
                        (self.device_id, first, last),
                    ).fetchall()
                ]
            if sizes:
                self._account(messages=-len(sizes), nbytes=-sum(sizes), dropped=[])
        return len(sizes)

    def give_up(self, ids: Iterable[int]) -> list[int]:
        """Drop these rows as undeliverable (the broker refuses them for good) and count them
        with the outbox's other drops, so ``state`` reports them; the seqs dropped."""
        ids = list(ids)
        if not ids:
            return []
        with self.transaction():
            dropped: list[_Dropped] = [
                row
                for row_id in ids
                for row in self.conn.execute(
                    "DELETE FROM outbox WHERE device_id = ? AND id = ? "
                    "RETURNING seq, channel, size",
                    (self.device_id, row_id),
                ).fetchall()
            ]
            self._account(
                messages=-len(dropped), nbytes=-sum(row[2] for row in dropped), dropped=dropped
            )
        return [row[0] for row in dropped]

    def backlog(self) -> tuple[int, int]:
        """(messages, payload bytes) waiting in the outbox."""
        messages, nbytes = self._device("backlog_messages, backlog_bytes")
        return int(messages), int(nbytes)

    def dropped(self) -> DropCounts:
        """What the outbox has dropped, by channel, since the device was first set up."""
        telemetry, events, state, first, last = self._device(
            "dropped_telemetry, dropped_events, dropped_state, dropped_first_seq, dropped_last_seq"
        )
        return DropCounts(telemetry + events + state, telemetry, events, state, first, last)

    def last_seq(self) -> int:
        """The last seq handed out; 0 before the first."""
        (seq,) = self._device("last_seq")
        return int(seq)

    def _device(self, columns: str) -> tuple[Any, ...]:
        row: tuple[Any, ...] = self.conn.execute(
            f"SELECT {columns} FROM devices WHERE device_id = ?",  # noqa: S608 (constants only)
            (self.device_id,),
        ).fetchone()
        return row
