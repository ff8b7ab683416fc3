"""Limits of device time and sampling that ingest and rules must read the same way.

protocol.md: a device samples at 10 Hz while output runs; device time outside
[received - 30 days, received + 5 minutes] is kept but flagged as a suspect clock.
"""

from datetime import UTC, datetime, timedelta
from typing import Final

# One sample with output on stands for this long (10 Hz).
SAMPLE_PERIOD_S: Final = 0.1

# Device time this far before receipt is a suspect clock (kept, flagged, never trusted for
# rolling windows).
CLOCK_PAST_LIMIT: Final = timedelta(days=30)
# Device time this far after receipt is a suspect clock too.
CLOCK_FUTURE_LIMIT: Final = timedelta(minutes=5)

# The latest device time accepted at all. Python's datetime ends at 9999-12-31 and rules
# anchor windows of up to 7 days (and cooldowns of a day) on device time, so the limit leaves
# a month of room; a clock that far out is not a clock, and the message is refused.
DEVICE_TIME_MAX: Final = datetime(9999, 12, 1, tzinfo=UTC)
DEVICE_TIME_MAX_MS: Final = int(DEVICE_TIME_MAX.timestamp() * 1000)
