"""Which hours a telemetry batch marks for the rollup recompute (writer.late_hours)."""

from datetime import UTC, datetime, timedelta

from services.ingest.decode import SampleRow, TelemetryIn
from services.ingest.writer import late_hours

RECEIVED = datetime(2026, 11, 30, 12, 30, tzinfo=UTC)


def message(device_id: str, *times: datetime) -> TelemetryIn:
    no_reading = (None,) * 11  # mode .. charging
    rows: list[SampleRow] = [(device_id, ts, 1, None, *no_reading, RECEIVED, False) for ts in times]
    return TelemetryIn(device_id, 1, None, rows, RECEIVED, b"")


def at(hour: int, minute: int, second: float = 0.0) -> datetime:
    return datetime(2026, 11, 30, hour, minute, tzinfo=UTC) + timedelta(seconds=second)


def test_samples_within_the_last_hour_mark_nothing() -> None:
    assert late_hours([message("d-1", at(11, 31), at(12, 29))]) == set()


def test_a_late_message_within_one_hour_marks_that_hour() -> None:
    late = message("d-1", *(at(9, 15, s / 10) for s in range(10)))
    assert late_hours([late]) == {("d-1", at(9, 0))}


def test_a_late_message_across_an_hour_boundary_marks_both_hours() -> None:
    late = message("d-1", at(9, 59, 59.9), at(10, 0, 0.0), at(9, 59, 59.8))
    assert late_hours([late]) == {("d-1", at(9, 0)), ("d-1", at(10, 0))}


def test_only_the_late_samples_of_a_message_mark_their_hour() -> None:
    # A device's offline buffer drained in one message: one sample late, one live.
    mixed = message("d-1", at(11, 29, 59), at(11, 30, 1))
    assert late_hours([mixed]) == {("d-1", at(11, 0))}
    hours_apart = message("d-1", at(8, 5), at(12, 10), at(10, 45))
    assert late_hours([hours_apart]) == {("d-1", at(8, 0)), ("d-1", at(10, 0))}


def test_hours_are_per_device() -> None:
    batch = [message("d-1", at(9, 15)), message("d-2", at(9, 20)), message("d-1", at(9, 40))]
    assert late_hours(batch) == {("d-1", at(9, 0)), ("d-2", at(9, 0))}
