"""Ingest's decoding step: pure functions, no broker or database."""

import json
from datetime import UTC, datetime, timedelta

import pytest

from services.common.protocol import ProtocolError
from services.common.protocol.limits import DEVICE_TIME_MAX_MS
from services.common.worker import subscriber_config
from services.ingest.decode import (
    ROW_SUSPECT,
    DeadLetter,
    EventIn,
    Inbound,
    PresenceIn,
    TelemetryIn,
    decode_inbound,
    device_time,
)
from services.ingest.main import unstorable
from services.ingest.settings import IngestSettings

RECEIVED = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
RECEIVED_MS = int(RECEIVED.timestamp() * 1000)


def inbound(topic: str, payload: object) -> Inbound:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return Inbound(topic, raw, mid=1, qos=1, received_at=RECEIVED, generation=1)


def test_device_time_is_flagged_outside_thirty_days_back_and_five_minutes_ahead():
    day_ms = 86_400_000
    assert device_time(RECEIVED_MS - 30 * day_ms, RECEIVED)[1] is False
    assert device_time(RECEIVED_MS - 30 * day_ms - 1, RECEIVED)[1] is True
    assert device_time(RECEIVED_MS + 300_000, RECEIVED)[1] is False
    assert device_time(RECEIVED_MS + 300_001, RECEIVED)[1] is True
    assert device_time(0, RECEIVED) == (datetime(1970, 1, 1, tzinfo=UTC), True)


def test_device_time_ends_on_9999_12_01_on_both_telemetry_paths():
    latest_ms = int(datetime(9999, 12, 1, tzinfo=UTC).timestamp() * 1000)
    assert latest_ms == DEVICE_TIME_MAX_MS
    assert device_time(latest_ms, RECEIVED) == (datetime(9999, 12, 1, tzinfo=UTC), True)
    with pytest.raises(ProtocolError, match="past 9999-12-01"):
        device_time(latest_ms + 1, RECEIVED)
    # An unknown field sends a message down the full path; the fast path takes the others.
    for extra in ({}, {"note": "full path"}):
        for ts, kind in ((latest_ms, TelemetryIn), (latest_ms + 1, DeadLetter)):
            sample = {"ts": ts, **extra}
            decoded = decode_inbound(
                inbound("galvani/v1/d/dev-001/telemetry", {"v": 1, "seq": 1, "samples": [sample]})
            )
            assert isinstance(decoded, kind), (ts, extra)


def test_telemetry_becomes_one_row_per_sample_with_the_topics_device_id():
    decoded = decode_inbound(
        inbound(
            "galvani/v1/d/dev-001/telemetry",
            {
                "v": 1,
                "seq": 9,
                "session": "s-1",
                "device_id": "someone-else",
                "samples": [{"ts": RECEIVED_MS}, {"ts": RECEIVED_MS + 100, "out": True}],
            },
        )
    )
    assert isinstance(decoded, TelemetryIn)
    assert [row[0] for row in decoded.rows] == ["dev-001", "dev-001"]
    assert decoded.rows[1][1] == RECEIVED + timedelta(milliseconds=100)
    assert decoded.rows[1][6] is True
    assert not any(row[ROW_SUSPECT] for row in decoded.rows)


def test_a_clock_past_the_year_9999_is_a_dead_letter_not_a_crash():
    decoded = decode_inbound(
        inbound(
            "galvani/v1/d/dev-001/events",
            {"v": 1, "seq": 1, "ts": 2**62, "type": "charging", "on": True},
        )
    )
    assert isinstance(decoded, DeadLetter)
    assert (decoded.reason, decoded.device_id, decoded.channel) == ("invalid", "dev-001", "events")


def test_dead_letters_keep_the_start_of_the_payload_and_its_full_size():
    raw = b"{" + b"x" * 100_000
    decoded = decode_inbound(inbound("galvani/v1/d/dev-001/state", raw))
    assert isinstance(decoded, DeadLetter)
    assert decoded.reason == "too_large"
    assert decoded.payload == raw  # whole: the device deletes its copy once it is acked
    assert decoded.payload_size == len(raw)


def test_config_and_foreign_topics_are_dead_letters():
    config = decode_inbound(inbound("galvani/v1/d/dev-001/config", {"v": 1}))
    foreign = decode_inbound(inbound("other/topic", {"v": 1}))
    assert isinstance(config, DeadLetter)
    assert config.reason == "unknown_channel"
    assert isinstance(foreign, DeadLetter)
    assert (foreign.reason, foreign.device_id) == ("bad_topic", None)


def test_last_will_has_no_device_time_and_event_body_keeps_only_its_own_fields():
    will = decode_inbound(inbound("galvani/v1/d/dev-001/presence", {"v": 1, "online": False}))
    assert will == PresenceIn("dev-001", False, None, False, RECEIVED)
    event = decode_inbound(
        inbound(
            "galvani/v1/d/dev-001/events",
            {"v": 1, "seq": 3, "ts": RECEIVED_MS, "type": "user_report", "kind": "burn"},
        )
    )
    assert isinstance(event, EventIn)
    assert json.loads(event.body) == {"kind": "burn"}


def test_workers_subscribe_to_the_four_device_channels_in_their_share_group():
    settings = IngestSettings(database_url="postgresql://unused@127.0.0.1/x", mqtt_password="x")
    assert subscriber_config(settings).topic_filters == (
        "$share/ingest/galvani/v1/d/+/telemetry",
        "$share/ingest/galvani/v1/d/+/events",
        "$share/ingest/galvani/v1/d/+/state",
        "$share/ingest/galvani/v1/d/+/presence",
    )


def test_an_unstorable_dead_letter_keeps_the_device_its_topic_names():
    refused = unstorable(inbound("galvani/v1/d/dev-0042/events", {"v": 1}), ValueError("x\ny"))
    assert (refused.device_id, refused.channel) == ("dev-0042", "events")
    assert refused.reason == "unstorable"
    assert refused.detail == "x"
    stray = unstorable(inbound("elsewhere/dev-0042", b"{}"), ValueError("x"))
    assert stray.device_id is None
