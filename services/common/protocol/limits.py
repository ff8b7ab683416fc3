"""Limits of device time, sampling and stored values that ingest and rules must read the same way.

protocol.md: a device samples at 10 Hz while output runs; device time outside
[received - 30 days, received + 5 minutes] is a suspect clock: kept, flagged, and its samples
stored apart from the time-partitioned ones (``suspect_samples``, by receipt time).
"""

from datetime import UTC, datetime, timedelta
from typing import Final

# One sample with output on stands for this long (10 Hz).
SAMPLE_PERIOD_S: Final = 0.1

# Device time this far before receipt is a suspect clock (kept, flagged, never trusted for
# rolling windows). A device's outbox holds at most 7 days (device_agent), so a sample older
# than this on arrival was not buffered: its clock is wrong.
CLOCK_PAST_LIMIT: Final = timedelta(days=30)
# Device time this far after receipt is a suspect clock too.
CLOCK_FUTURE_LIMIT: Final = timedelta(minutes=5)

# The latest device time accepted at all. Python's datetime ends at 9999-12-31 and rules
# anchor windows of up to 7 days (and cooldowns of a day) on device time, so the limit leaves
# a month of room; a clock that far out is not a clock, and the message is refused.
DEVICE_TIME_MAX: Final = datetime(9999, 12, 1, tzinfo=UTC)
DEVICE_TIME_MAX_MS: Final = int(DEVICE_TIME_MAX.timestamp() * 1000)

# What PostgreSQL's column types hold, which a valid payload must fit (protocol.md, "Bounds
# the schema sets"). A value the protocol allowed and the schema could not hold made the whole
# ingest batch fail and be written again message by message; decode refuses it instead.
# The largest finite ``real`` (float4): a larger double becomes +Infinity in a real column.
REAL_MAX: Final = 3.4028234663852886e38
# PostgreSQL ``integer``: mode-table versions (config_pushes.version, state_reports and
# devices' reported version) are int4, and the backend issues every version a device runs.
INT32_MAX: Final = 2**31 - 1
# A session id is a key of the sessions table (and of each sample's row): longer than a B-tree
# index entry holds (about 2,700 bytes) it made the whole ingest batch fail and be written again
# message by message. A UUID is 36 characters; 128 leaves firmware room for its own scheme.
SESSION_ID_MAX: Final = 128
