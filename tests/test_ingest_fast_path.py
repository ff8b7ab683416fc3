"""The telemetry fast path accepts only what the full (pydantic) path accepts, with the same rows.

Both are run on every telemetry vector and on generated payloads that mix valid values with
wrong types, out-of-range numbers, unknown fields and odd strings.
"""

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.protocol import Channel, ProtocolError, decode
from services.ingest.decode import TelemetryIn, _telemetry, _telemetry_fast

VECTORS = json.loads(
    (Path(__file__).resolve().parents[1] / "protocol" / "vectors" / "telemetry.json").read_text()
)
RECEIVED = datetime(2025, 11, 22, 10, 0, tzinfo=UTC)
DEVICE = "dev-0001"


def full_path(raw: bytes) -> TelemetryIn | None:
    try:
        return _telemetry(DEVICE, decode(Channel.TELEMETRY, raw), RECEIVED, raw)
    except ProtocolError:
        return None


def assert_agree(raw: bytes) -> TelemetryIn | None:
    fast = _telemetry_fast(DEVICE, raw, RECEIVED)
    if fast is not None:
        full = full_path(raw)
        assert full is not None, f"the fast path accepted what the full path refuses: {raw!r}"
        assert fast == full
        assert [tuple(map(type, row)) for row in fast.rows] == [
            tuple(map(type, row)) for row in full.rows
        ]
    return fast


@pytest.mark.parametrize("case", VECTORS["valid"], ids=lambda case: case["name"])
def test_valid_vectors_agree(case: dict[str, Any]) -> None:
    assert_agree(json.dumps(case["payload"]).encode())


def test_the_spec_example_takes_the_fast_path() -> None:
    [example] = [c for c in VECTORS["valid"] if c["name"] == "spec_example"]
    assert _telemetry_fast(DEVICE, json.dumps(example["payload"]).encode(), RECEIVED) is not None


@pytest.mark.parametrize("case", VECTORS["invalid"], ids=lambda case: case["name"])
def test_invalid_vectors_are_left_to_the_full_path(case: dict[str, Any]) -> None:
    assert _telemetry_fast(DEVICE, json.dumps(case["payload"]).encode(), RECEIVED) is None


@pytest.mark.parametrize(
    "raw",
    [
        b'{"v":1,"seq":1,"samples":[{"ts":1,"z_ohm":1e400}]}',
        b'{"v":1,"seq":1,"samples":[{"ts":1,"i_ua":NaN}]}',
        b'{"v":1,"seq":1,"session":"a\\u0000b","samples":[{"ts":1}]}',
        b'{"v":1,"seq":99999999999999999999,"samples":[{"ts":1}]}',
        b'{"v":1.0,"seq":1,"samples":[{"ts":1}]}',
        b'{"v":true,"seq":1,"samples":[{"ts":1}]}',
        b'{"v":1,"seq":1,"samples":[{"ts":1,"level":true}]}',
        b'{"v":1,"seq":1,"samples":[{"ts":1,"extra":{"deep":[1]}}]}',
        b'\xff{"v":1}',
    ],
)
def test_edge_cases_agree(raw: bytes) -> None:
    assert_agree(raw)


_number = st.one_of(
    st.none(),
    st.integers(-200, 200_000),
    st.floats(allow_nan=False, allow_infinity=False, width=64),
    st.booleans(),
    st.text(max_size=3),
)
_sample = st.fixed_dictionaries(
    {"ts": st.one_of(st.integers(-5, 2**63), st.floats(0, 10), st.none())},
    optional={
        "mode": st.one_of(st.sampled_from(["LIFT", "SAFE", "lift", "TURBO", ""]), st.none()),
        "level": _number,
        "out": st.one_of(st.booleans(), st.none(), st.integers(0, 1)),
        "i_ua": _number,
        "i_set_ua": _number,
        "v_v": _number,
        "z_ohm": _number,
        "t_elec_c": _number,
        "t_batt_c": _number,
        "batt_pct": _number,
        "charging": st.one_of(st.booleans(), st.none(), st.text(max_size=2)),
        "unknown": st.one_of(st.integers(), st.text(max_size=3)),
    },
)
_message = st.fixed_dictionaries(
    {
        "v": st.sampled_from([1, 1, 1, 2, True, 1.0]),
        "seq": st.one_of(st.integers(-1, 2**64), st.booleans()),
        "samples": st.lists(_sample, max_size=4),
    },
    optional={"session": st.one_of(st.none(), st.text(max_size=6), st.integers())},
)


@settings(max_examples=600, deadline=None)
@given(message=_message)
def test_generated_payloads_agree(message: dict[str, Any]) -> None:
    assert_agree(json.dumps(message).encode())
