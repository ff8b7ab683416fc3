"""Device time: the protocol's epoch milliseconds as datetimes."""

from datetime import UTC, datetime


def from_ms(epoch_ms: int) -> datetime:
    """A device's epoch milliseconds as an aware UTC datetime."""
    return datetime.fromtimestamp(epoch_ms / 1000, tz=UTC)
