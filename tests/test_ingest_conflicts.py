"""Conflicting redelivery and seq resets, through the writer on the real database.

A second message under a stored ``(device_id, seq)`` that says something else is a reused seq
(one that says the same, however serialized, is a redelivery), and a sample at a stored
``(device_id, ts)`` with other readings is a conflicting sample. Neither may be dropped with
only a metric: both are kept in ``message_conflicts``, and a device whose seq restarted still
has its new samples stored.
The sample paths are run on both storages (hypertable and plain partitions).
"""

import json
import re
from array import array
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from services.common.db import storage_of
from services.common.migrate import upgrade
from services.common.migrations.grants import ServiceRole
from services.common.subscriber import Inbound
from services.ingest.decode import decode_inbound
from services.ingest.writer import BatchOutcome, write_batch
from tests.ingest import T0_MS, event, provision, sample, state, telemetry, topic
from tests.roles import as_service

DEVICE = "dev-0000"
RECEIVED = datetime.now(UTC).replace(microsecond=0)


@pytest.fixture(params=["auto", "plain"])
def storage_url(request, empty_database_url) -> str:
    """A migrated database on each storage (auto: the TimescaleDB hypertable), one device."""
    upgrade(empty_database_url, storage=request.param)
    provision(empty_database_url, 1)
    return empty_database_url


@pytest.fixture
def url(database_url) -> str:
    provision(database_url, 1)
    return database_url


Message = tuple[str, bytes] | tuple[str, bytes, datetime]


def write(url: str, *messages: Message) -> BatchOutcome:
    """One batch of ``(channel, payload[, received_at])`` from DEVICE, in one transaction, as
    ingest's role."""
    batch = []
    for message in messages:
        channel, payload = message[0], message[1]
        received_at = message[2] if len(message) == 3 else RECEIVED
        inbound = Inbound(topic(DEVICE, channel), payload, 1, 1, received_at, 1)
        batch.append(decode_inbound(inbound))
    with psycopg.connect(as_service(url, ServiceRole.INGEST)) as conn, conn.transaction():
        return write_batch(conn, batch, storage_of(conn))


def rows(url: str, query: str, *params: object) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute(query, list(params)).fetchall()


def one(url: str, query: str, *params: object) -> object:
    [(value,)] = rows(url, query, *params)
    return value


def conflicts(url: str) -> list[tuple]:
    return rows(
        url,
        "SELECT channel, seq, reason, payload, detail, ts, received_at FROM message_conflicts"
        " ORDER BY id",
    )


def ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def at(ms_: int) -> datetime:
    return datetime.fromtimestamp(ms_ / 1000, tz=UTC)


def test_redelivered_message_is_not_a_conflict(url):
    first = telemetry(1, T0_MS)
    start = event(2, T0_MS + 2000, "session_start", session="s-1", mode="LIFT", level=3)
    report = state(3, T0_MS + 3000)
    write(url, ("telemetry", first), ("events", start), ("state", report))

    again = write(url, ("telemetry", first), ("events", start), ("state", report))
    in_one_batch = write(url, ("telemetry", first), ("telemetry", first))

    assert +again.duplicates == {"telemetry": 1, "events": 1, "state": 1}
    assert +in_one_batch.duplicates == {"telemetry": 2}
    assert +again.reused == {}
    assert +again.conflicts == {}
    assert one(url, "SELECT count(*) FROM samples") == 10
    assert conflicts(url) == []
    assert one(url, "SELECT seq_reused + seq_resets FROM devices") == 0


def test_a_message_matching_a_row_stored_before_crcs_were_kept_is_a_redelivery(url):
    first = telemetry(1, T0_MS)
    write(url, ("telemetry", first))
    with psycopg.connect(url) as conn:
        conn.execute("UPDATE telemetry_messages SET payload_crc32 = NULL")

    outcome = write(url, ("telemetry", telemetry(1, T0_MS + 60_000)))

    assert +outcome.duplicates == {"telemetry": 1}
    assert one(url, "SELECT count(*) FROM samples") == 10
    assert conflicts(url) == []


CHANNELS = ("telemetry", "events", "state")


def message(channel: str, seq: int) -> bytes:
    """A message with something to reserialize: nested objects, and for telemetry and events
    floats with and without a fraction."""
    at = T0_MS + seq * 10_000
    if channel == "telemetry":
        return telemetry(seq, at)  # i_set_ua 300.0, v_v 6.1, …
    if channel == "events":
        detail = {"i_ua": 1500.0, "limit_ua": 1200.5, "phase": "B"}
        return event(seq, at, "fault", code="overcurrent", detail=detail)
    config = {"version": 3, "sha256": "ab" * 32, "status": "applied"}
    dropped = {"messages": 4, "telemetry": 3, "events": 1, "state": 0, "first_seq": 10}
    return state(seq, at, config=config, dropped=dropped)


def _reordered(value: object) -> object:
    if isinstance(value, dict):
        return {key: _reordered(value[key]) for key in reversed(value)}
    if isinstance(value, list):
        return [_reordered(item) for item in value]
    return value


def _without_fractions(value: object) -> object:
    if isinstance(value, dict):
        return {key: _without_fractions(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_without_fractions(item) for item in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _with_unknown_fields(value: dict) -> dict:
    extra = {**value, "build": {"id": "r7", "n": 2}}
    if "samples" in value:
        extra["samples"] = [{**s, "rssi": -71} for s in value["samples"]]
    return extra


def _float32_digits(payload: bytes) -> bytes:
    # How firmware holding float32 readings prints them with printf's %.9g: 6.1 is 6.0999999.
    def digits(match: re.Match[bytes]) -> bytes:
        return format(array("f", [float(match[0])])[0], ".9g").encode()

    return re.sub(rb"-?\d+\.\d+", digits, payload)


RESERIALIZED: dict[str, Callable[[bytes], bytes]] = {
    "key_order": lambda p: json.dumps(_reordered(json.loads(p))).encode(),
    "whitespace": lambda p: json.dumps(json.loads(p), indent=2, separators=(",", " : ")).encode(),
    "unknown_field": lambda p: json.dumps(_with_unknown_fields(json.loads(p))).encode(),
    "1.0_as_1": lambda p: json.dumps(_without_fractions(json.loads(p))).encode(),
    "float32_digits": _float32_digits,
}
# State carries no float (its numbers are strict integers). An event's floats sit in its
# free-form detail, stored as sent, where other digits are another number.
REDELIVERIES = [
    pytest.param(channel, how, id=f"{channel}-{how}")
    for channel in CHANNELS
    for how in RESERIALIZED
    if not (how == "1.0_as_1" and channel == "state")
    and not (how == "float32_digits" and channel != "telemetry")
]


@pytest.mark.parametrize(("channel", "how"), REDELIVERIES)
def test_a_redelivery_serialized_differently_is_not_a_conflict(storage_url, channel, how):
    url = storage_url
    original = message(channel, 1)
    resent = RESERIALIZED[how](original)
    assert resent != original
    write(url, (channel, original))

    again = write(url, (channel, resent))
    pair = [(channel, message(channel, 2)), (channel, RESERIALIZED[how](message(channel, 2)))]
    in_one_batch = write(url, *pair)
    pair_again = write(url, *pair)

    assert +again.duplicates == {channel: 1}
    assert +again.reused == {}
    assert (+in_one_batch.stored, +in_one_batch.duplicates) == ({channel: 1}, {channel: 1})
    assert +in_one_batch.reused == {}
    assert +pair_again.duplicates == {channel: 2}
    assert conflicts(url) == []
    assert rows(url, "SELECT seq_reused, seq_resets, seq_count, seq_gaps FROM devices") == [
        (0, 0, 2, 0)
    ]
    assert one(url, "SELECT count(*) FROM samples") == (20 if channel == "telemetry" else 0)


def _changed(channel: str, payload: bytes, change: str) -> bytes:
    body = json.loads(payload)
    match change:
        case "one_reading":
            body["samples"][4]["i_ua"] = 301.75
        case "fewer_samples":  # each one stored as sent, but not the message stored
            body["samples"] = body["samples"][:5]
        case "detail":
            body["detail"]["phase"] = "C"
        case "dropped":
            body["dropped"]["messages"] = 5
    return json.dumps(_reordered(body)).encode()


@pytest.mark.parametrize(
    ("channel", "change"),
    [
        ("telemetry", "one_reading"),
        ("telemetry", "fewer_samples"),
        ("events", "detail"),
        ("state", "dropped"),
    ],
)
def test_a_reused_seq_is_a_conflict_however_little_differs(url, channel, change):
    original = message(channel, 1)
    write(url, (channel, original))

    outcome = write(url, (channel, _changed(channel, original, change)))

    assert +outcome.reused == {channel: 1}
    assert +outcome.conflicts == {"seq_reused": 1}
    assert rows(url, "SELECT seq_reused, seq_resets FROM devices") == [(1, 1)]


@pytest.mark.parametrize("channel", CHANNELS)
def test_a_reused_seq_resent_serialized_differently_is_recorded_once(url, channel):
    change = {"telemetry": "one_reading", "events": "detail", "state": "dropped"}[channel]
    original = message(channel, 1)
    reused = _changed(channel, original, change)
    write(url, (channel, original))
    write(url, (channel, reused))

    again = write(url, (channel, RESERIALIZED["whitespace"](reused)))

    assert +again.duplicates == {channel: 1}
    assert +again.reused == {}
    assert len(conflicts(url)) == 1
    assert rows(url, "SELECT seq_reused, seq_resets FROM devices") == [(1, 1)]


def test_a_message_with_conflicting_samples_resent_serialized_differently_is_a_redelivery(url):
    write(url, ("telemetry", telemetry(1, T0_MS, i_ua=300.0)))
    overlapping = telemetry(2, T0_MS + 700, i_ua=450.5)  # its first three times are taken
    write(url, ("telemetry", overlapping))

    again = write(url, ("telemetry", RESERIALIZED["key_order"](overlapping)))

    assert +again.duplicates == {"telemetry": 1}
    assert +again.reused == {}
    assert [c[2] for c in conflicts(url)] == ["sample_conflict"]
    assert rows(url, "SELECT seq_reused, seq_resets FROM devices") == [(0, 0)]


def test_reused_seq_with_new_payload_is_recorded_as_conflict(storage_url):
    url = storage_url
    hour = 3_600_000
    original = telemetry(5, T0_MS)
    fault = event(6, T0_MS + 1000, "fault", code="overcurrent", detail={})
    report = state(7, T0_MS + 2000, fw="1.0.0")
    write(url, ("telemetry", original), ("events", fault), ("state", report))

    # The device reset and counts from 5 again, an hour on.
    reused = telemetry(5, T0_MS + hour, session="s-2")
    charging = event(6, T0_MS + hour + 1000, "charging", on=True)
    upgraded = state(7, T0_MS + hour + 2000, fw="2.0.0")
    outcome = write(url, ("telemetry", reused), ("events", charging), ("state", upgraded))

    assert one(url, "SELECT count(*) FROM samples") == 20, "the reset device's samples are kept"
    assert one(url, "SELECT count(*) FROM samples WHERE session = 's-2'") == 10
    stored_crc = one(url, "SELECT payload_crc32 FROM telemetry_messages")
    assert rows(url, "SELECT type FROM events") == [("fault",)]
    assert rows(url, "SELECT fw FROM state_reports") == [("1.0.0",)]
    assert one(url, "SELECT fw FROM devices") == "2.0.0", "the newest report still counts"
    assert +outcome.reused == {"telemetry": 1, "events": 1, "state": 1}
    assert +outcome.conflicts == {"seq_reused": 3}
    assert +outcome.duplicates == {}
    found = conflicts(url)
    assert [(c[0], c[1], c[2]) for c in found] == [
        ("telemetry", 5, "seq_reused"),
        ("events", 6, "seq_reused"),
        ("state", 7, "seq_reused"),
    ]
    assert [bytes(c[3]) for c in found] == [reused, charging, upgraded]
    detail = found[0][4]
    assert detail["stored"]["crc32"] == f"{stored_crc:08x}"
    assert detail["crc32"] != detail["stored"]["crc32"]
    assert detail["stored"]["ts"] == at(T0_MS).isoformat()
    assert detail["samples"] == 10
    assert detail["conflicting_samples"] == []
    assert found[0][5] == at(T0_MS + hour)
    assert rows(url, "SELECT seq_count, last_seq FROM devices") == [(3, 7)], "not recounted"

    again = write(url, ("telemetry", reused), ("events", charging), ("state", upgraded))
    assert +again.conflicts == {}, "a conflicting message redelivered is recorded once"
    assert +again.duplicates == {"telemetry": 1, "events": 1, "state": 1}
    assert +again.reused == {}
    assert len(conflicts(url)) == 3
    assert one(url, "SELECT count(*) FROM samples") == 20


def test_conflicting_sample_is_recorded_with_its_values(storage_url):
    url = storage_url
    write(url, ("telemetry", telemetry(1, T0_MS, i_ua=300.0)))
    # seq 2 overlaps seq 1's last three sample times with other readings; seq 3 repeats one
    # of seq 1's samples exactly, which is no conflict.
    overlapping = telemetry(2, T0_MS + 700, i_ua=450.5)
    same = json.dumps(
        {"v": 1, "seq": 3, "session": "s-1", "samples": [sample(T0_MS + 100, i_ua=300.0)]}
    ).encode()

    outcome = write(url, ("telemetry", overlapping), ("telemetry", same))

    assert +outcome.conflicts == {"sample_conflict": 1}
    assert one(url, "SELECT count(*) FROM samples") == 17
    taken = [at(T0_MS + 700), at(T0_MS + 800), at(T0_MS + 900)]
    assert rows(url, "SELECT ts, seq, i_ua FROM samples WHERE ts = ANY(%s) ORDER BY ts", taken) == [
        (ts, 1, 300.0) for ts in taken
    ]
    [(channel, seq, reason, payload, detail, ts, _)] = conflicts(url)
    assert (channel, seq, reason, ts) == ("telemetry", 2, "sample_conflict", at(T0_MS + 700))
    assert detail["conflicting_samples"] == [
        {"ts": moment.isoformat(), "stored_seq": 1} for moment in taken
    ]
    assert detail["samples"] == 10
    kept = json.loads(bytes(payload))
    assert [s["i_ua"] for s in kept["samples"] if at(s["ts"]) in taken] == [450.5] * 3

    assert +write(url, ("telemetry", overlapping)).conflicts == {}, "recorded once"
    assert len(conflicts(url)) == 1


def test_two_payloads_under_one_seq_in_one_batch_are_told_apart(url):
    a = telemetry(9, T0_MS)
    b = telemetry(9, T0_MS + 400)  # overlaps a's last six samples, with the same readings

    outcome = write(url, ("telemetry", a), ("telemetry", b), ("telemetry", b))

    assert +outcome.stored == {"telemetry": 1}
    assert +outcome.duplicates == {"telemetry": 1}
    assert +outcome.reused == {"telemetry": 1}
    assert one(url, "SELECT count(*) FROM samples") == 14
    [(channel, seq, reason, payload, detail, _, _)] = conflicts(url)
    assert (channel, seq, reason, bytes(payload)) == ("telemetry", 9, "seq_reused", b)
    assert detail["stored"]["ts"] == at(T0_MS).isoformat()
    assert detail["conflicting_samples"] == [], "the same readings at a taken time conflict not"


def test_seq_reset_is_detected_and_new_samples_stored(storage_url):
    url = storage_url
    boot = event(1, T0_MS, "reboot", reason="power_on")
    before = [("telemetry", telemetry(seq, T0_MS + seq * 1000)) for seq in range(2, 7)]
    write(url, ("events", boot), *before)
    assert rows(url, "SELECT seq_count, last_seq FROM devices") == [(6, 6)]

    # A factory reset: the counter starts again at 1, a day later, in a new session (received
    # a day later too: a device time a day ahead of its receipt is a suspect clock, whose
    # samples are kept apart, in suspect_samples).
    day = 86_400_000
    reset_at = RECEIVED + timedelta(days=1, minutes=1)
    start = event(1, T0_MS + day, "session_start", session="s-new", mode="LIFT", level=3)
    after = [
        ("telemetry", telemetry(seq, T0_MS + day + seq * 1000, session="s-new"), reset_at)
        for seq in range(2, 5)
    ]
    outcome = write(url, ("events", start, reset_at), *after)

    assert one(url, "SELECT count(*) FROM samples") == 80, "the reset device's samples are kept"
    assert outcome.seq_resets == [DEVICE]
    assert +outcome.conflicts == {"seq_reused": 4}
    assert rows(url, "SELECT seq_reused, seq_resets, seq_reset_at, seq_reused_at FROM devices") == [
        (4, 1, reset_at, reset_at)
    ]
    assert one(url, "SELECT samples FROM sessions WHERE session = 's-new'") == 30
    assert one(url, "SELECT started_at FROM sessions WHERE session = 's-new'") == at(T0_MS + day)
    assert rows(url, "SELECT seq_count, last_seq FROM devices") == [(6, 6)], "not recounted"

    # The same run goes on a few minutes later: counted, not a second reset.
    later = reset_at + timedelta(minutes=5)
    more = write(url, ("telemetry", telemetry(5, T0_MS + day + 5000, session="s-new"), later))
    assert more.seq_resets == []
    assert rows(url, "SELECT seq_reused, seq_resets, seq_reset_at, seq_reused_at FROM devices") == [
        (5, 1, reset_at, later)
    ]

    # Hours without a reused seq, then the counter goes back again: a second reset.
    again_at = later + timedelta(hours=2)
    reboot = event(1, T0_MS + 2 * day, "reboot", reason="watchdog")
    second = write(url, ("events", reboot, again_at))
    assert second.seq_resets == [DEVICE]
    assert rows(url, "SELECT seq_reused, seq_resets, seq_reset_at, seq_reused_at FROM devices") == [
        (6, 2, again_at, again_at)
    ]
