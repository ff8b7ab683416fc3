"""What every step of writing a batch shares: the outcome it counts into, what it reads of a
message, and a ``timestamptz`` value as psycopg returns it.

Kept apart from :mod:`services.ingest.writer` so that the steps it calls (samples, ledgers,
redelivery, conflicts) can count into a :class:`BatchOutcome` without importing it back.
"""

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol, TypeVar


class Message(Protocol):
    """What the ledger and conflict code read of a telemetry, event or state message."""

    @property
    def device_id(self) -> str: ...
    @property
    def seq(self) -> int: ...
    @property
    def ts(self) -> datetime: ...
    @property
    def received_at(self) -> datetime: ...
    @property
    def payload(self) -> bytes: ...


M = TypeVar("M", bound=Message)


@dataclass
class BatchOutcome:
    """What a batch did, counted for metrics and logs."""

    stored: Counter[str] = field(default_factory=Counter)
    duplicates: Counter[str] = field(default_factory=Counter)
    invalid: Counter[str] = field(default_factory=Counter)
    samples_stored: int = 0
    samples_conflicting: int = 0
    # Samples stored in suspect_samples (their device time was a suspect clock), and by
    # device the latest receipt of one.
    samples_suspect: int = 0
    suspect_received: dict[str, datetime] = field(default_factory=dict)
    # Messages whose seq the device had used for another message, by channel.
    reused: Counter[str] = field(default_factory=Counter)
    # Rows added to message_conflicts, by reason.
    conflicts: Counter[str] = field(default_factory=Counter)
    # Devices on which this batch began a run of reused seqs (a seq reset).
    seq_resets: list[str] = field(default_factory=list)

    def add(self, other: "BatchOutcome") -> None:
        """Add ``other``'s counts to these (a batch stored in parts)."""
        self.stored.update(other.stored)
        self.duplicates.update(other.duplicates)
        self.invalid.update(other.invalid)
        self.samples_stored += other.samples_stored
        self.samples_conflicting += other.samples_conflicting
        self.samples_suspect += other.samples_suspect
        for device_id, at in other.suspect_received.items():
            self.suspect_received[device_id] = max(at, self.suspect_received.get(device_id, at))
        self.reused.update(other.reused)
        self.conflicts.update(other.conflicts)
        self.seq_resets.extend(other.seq_resets)


def moment(value: object) -> datetime:
    """A ``timestamptz`` column's value, typed (psycopg returns it as ``datetime``)."""
    assert isinstance(value, datetime)  # a timestamptz column
    return value
