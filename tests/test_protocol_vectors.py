"""The backend's protocol v1 against the shared vectors and against hostile bytes."""

import base64
import json
from enum import StrEnum
from pathlib import Path
from typing import Any, get_args

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from services.common.mode_tables import DEFAULT_MODES, ENVELOPE, envelope_problems
from services.common.protocol import (
    MAX_JSON_DEPTH,
    MAX_PAYLOAD_BYTES,
    Channel,
    ConfigStatus,
    ConfigTable,
    EndReason,
    EventType,
    FaultCode,
    Message,
    Mode,
    Presence,
    ProtocolError,
    RebootReason,
    RejectionReason,
    ReportKind,
    SessionStart,
    State,
    Telemetry,
    canonical_json,
    decode,
    signing_input,
)
from services.common.protocol.models import ModeSpec
from services.common.protocol.topics import (
    ACK_CHANNEL,
    CONFIG_CHANNEL,
    DEVICE_CHANNELS,
    DEVICE_TOPIC_ROOT,
    acl_pattern,
    device_prefix,
    device_topic,
    every_device,
    parse_topic,
    shared_filters,
)
from services.common.signing import key_id, public_key_b64, sign_table

VECTORS = Path(__file__).resolve().parents[1] / "protocol" / "vectors"
DECODE_CODES = {"not_object"}
REASONS = {"too_large", "not_utf8", "bad_json", "too_deep", "not_object", "invalid"}
MODEL_NAMES = {model.__name__ for model in get_args(Message)}


def _load(name: str) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((VECTORS / f"{name}.json").read_text("utf-8"))
    return document


def _named(cases: list[dict[str, Any]]) -> list[Any]:
    return [pytest.param(case, id=case["name"]) for case in cases]


DOCUMENTS = {channel: _load(channel) for channel in Channel}
TOPICS = _load("topics")
MODE_TABLES = _load("mode_tables")
VALID = [
    pytest.param(channel, case["payload"], id=f"{channel}/{case['name']}")
    for channel, document in DOCUMENTS.items()
    for case in document["valid"]
]
INVALID = [
    pytest.param(channel, case["payload"], case["reason"], id=f"{channel}/{case['name']}")
    for channel, document in DOCUMENTS.items()
    for case in document["invalid"]
]
PRESENCE = b'{"v":1,"online":true,"ts":1763805500000'


def _raw(payload: object) -> bytes:
    return json.dumps(payload, ensure_ascii=False).encode("utf-8")


def _reason(channel: Channel | str, raw: bytes) -> str:
    with pytest.raises(ProtocolError) as caught:
        decode(channel, raw)
    return caught.value.reason


def test_vector_files_are_well_formed() -> None:
    for channel, document in DOCUMENTS.items():
        assert document["channel"] == channel
        names = [case["name"] for case in document["valid"] + document["invalid"]]
        assert len(names) == len(set(names)), f"duplicate case names in {channel}.json"
        assert document["valid"]
        assert document["invalid"]
        assert all(case["reason"] for case in document["invalid"])


@pytest.mark.parametrize(("channel", "payload"), VALID)
def test_valid_vector_decodes(channel: Channel, payload: dict[str, Any]) -> None:
    message = decode(channel, _raw(payload))

    assert isinstance(message, BaseModel)
    assert message.model_extra is None  # unknown fields are dropped, not carried along
    again = decode(channel, message.model_dump_json(exclude_unset=True).encode())
    assert again == message


@pytest.mark.parametrize(("channel", "payload", "reason"), INVALID)
def test_invalid_vector_is_rejected_naming_its_reason(
    channel: Channel, payload: object, reason: str
) -> None:
    with pytest.raises(ProtocolError) as caught:
        decode(channel, _raw(payload))

    error = caught.value
    assert reason in str(error)
    if reason in DECODE_CODES:
        assert error.reason == reason
    else:
        assert error.reason == "invalid"
        assert error.path == reason


def test_spec_examples_decode_to_their_values() -> None:
    telemetry = decode(Channel.TELEMETRY, _raw(DOCUMENTS[Channel.TELEMETRY]["valid"][0]["payload"]))
    event = decode(Channel.EVENTS, _raw(DOCUMENTS[Channel.EVENTS]["valid"][0]["payload"]))
    state = decode(Channel.STATE, _raw(DOCUMENTS[Channel.STATE]["valid"][0]["payload"]))

    assert isinstance(telemetry, Telemetry)
    assert telemetry.seq == 1042
    assert telemetry.samples[0].mode is Mode.LIFT
    assert telemetry.samples[0].i_ua == 301.5
    assert telemetry.samples[0].z_ohm == 8200.0
    assert telemetry.samples[0].charging is False
    assert isinstance(event, SessionStart)
    assert (event.type, event.user, event.level) == (EventType.SESSION_START, "u-19", 3)
    assert isinstance(state, State)
    assert state.config is not None
    assert state.config.status is ConfigStatus.APPLIED


def test_last_will_decodes_without_ts() -> None:
    presence = decode(Channel.PRESENCE, b'{"v":1,"online":false}')

    assert presence == Presence(v=1, online=False, ts=None)


@pytest.mark.parametrize(
    ("enum", "channel", "field"),
    [
        (Mode, Channel.TELEMETRY, "mode"),
        (Mode, Channel.EVENTS, "mode"),
        (EventType, Channel.EVENTS, "type"),
        (EndReason, Channel.EVENTS, "reason"),
        (FaultCode, Channel.EVENTS, "code"),
        (RebootReason, Channel.EVENTS, "reason"),
        (ReportKind, Channel.EVENTS, "kind"),
        (ConfigStatus, Channel.STATE, "status"),
        (RejectionReason, Channel.STATE, "reason"),
    ],
)
def test_valid_vectors_cover_every_enum_value(
    enum: type[StrEnum], channel: Channel, field: str
) -> None:
    seen: set[object] = set()

    def walk(value: object) -> None:
        if isinstance(value, dict):
            seen.add(value.get(field))
            for child in value.values():
                walk(child)
        elif isinstance(value, list):
            for child in value:
                walk(child)

    for case in DOCUMENTS[channel]["valid"]:
        walk(case["payload"])
    assert {member.value for member in enum} <= seen


def test_signed_vector_verifies_over_its_signing_input() -> None:
    signed = DOCUMENTS[Channel.CONFIG]["signed"]
    table = signed["table"]
    key = Ed25519PublicKey.from_public_bytes(base64.b64decode(signed["public_key"]))

    assert signing_input(table) == signed["signing_input"].encode("utf-8")
    key.verify(base64.b64decode(table["sig"]), signing_input(table))
    assert isinstance(decode(Channel.CONFIG, _raw(table)), ConfigTable)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"   ",
        b'{"v":1,',
        b"{v:1}",
        b'{"v":1,"online":true,}',
        b'{"v":1,"online":true} {"v":1}',
        b"{'v':1,'online':true}",
        b'{"v":1,"online":true,"ts":NaN}',
        b'{"v":1,"online":true,"x":-Infinity}',
        b'{"v":1,"online":true,"x":"\\ud800"}',
        b'\xef\xbb\xbf{"v":1,"online":true}',
        b"nul",
        b'{"a":"' + b'[\\"' * 20_000,  # an unterminated string full of brackets
    ],
)
def test_malformed_json_is_bad_json(raw: bytes) -> None:
    assert _reason(Channel.PRESENCE, raw) == "bad_json"


def test_payload_over_64_kib_is_too_large() -> None:
    raw = PRESENCE + b',"pad":"' + b"x" * (70 * 1024) + b'"}'

    assert _reason(Channel.PRESENCE, raw) == "too_large"


def test_payload_of_exactly_64_kib_is_accepted() -> None:
    head = PRESENCE + b',"pad":"'
    raw = head + b"x" * (MAX_PAYLOAD_BYTES - len(head) - 2) + b'"}'

    assert len(raw) == MAX_PAYLOAD_BYTES
    assert decode(Channel.PRESENCE, raw).online is True
    assert _reason(Channel.PRESENCE, raw[:-2] + b'x"}') == "too_large"


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 10_000 + b"]" * 10_000,
        b"[" * 10_000,
        b'{"a":' * 10_000 + b"1" + b"}" * 10_000,
        PRESENCE + b',"x":' + b"[" * 10_000 + b"]" * 10_000 + b"}",
    ],
    ids=["arrays", "unclosed", "objects", "inside_a_valid_message"],
)
def test_deep_nesting_is_too_deep_without_recursing(raw: bytes) -> None:
    assert _reason(Channel.PRESENCE, raw) == "too_deep"


def test_nesting_up_to_the_limit_is_accepted_and_one_more_is_not() -> None:
    inner = MAX_JSON_DEPTH - 1  # the payload object itself is the first level
    at_limit = PRESENCE + b',"x":' + b"[" * inner + b"]" * inner + b"}"
    beyond = PRESENCE + b',"x":' + b"[" * (inner + 1) + b"]" * (inner + 1) + b"}"

    assert decode(Channel.PRESENCE, at_limit).online is True
    assert _reason(Channel.PRESENCE, beyond) == "too_deep"


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    raw = PRESENCE + b',"note":"' + b'[{\\"' * 1000 + b'"}'

    assert decode(Channel.PRESENCE, raw).online is True


@pytest.mark.parametrize(
    "raw",
    [
        PRESENCE + b',"x":"\xff"}',
        PRESENCE + b',"x":"\xc0\xaf"}',  # overlong encoding of "/"
        PRESENCE + b',"x":"\xed\xa0\x80"}',  # an encoded UTF-16 surrogate
        b'{"v":1,"online":tr\xc3',
    ],
)
def test_invalid_utf8_is_not_utf8(raw: bytes) -> None:
    assert _reason(Channel.PRESENCE, raw) == "not_utf8"


@pytest.mark.parametrize("raw", [b"[]", b'  [{"v":1,"online":true}]', b'"online"', b"1", b"null"])
def test_json_that_is_not_an_object_is_not_object(raw: bytes) -> None:
    assert _reason(Channel.PRESENCE, raw) == "not_object"


def test_nul_in_a_string_is_invalid_but_an_escaped_backslash_is_not() -> None:
    assert _reason(Channel.PRESENCE, PRESENCE + b',"x":"a\\u0000"}') == "invalid"
    assert decode(Channel.PRESENCE, PRESENCE + b',"x":"a\\\\u0000"}').online is True


def test_unknown_channel_is_unknown_channel() -> None:
    assert _reason("firmware", b'{"v":1}') == "unknown_channel"


def test_topic_vectors_are_the_layout_topics_py_spells() -> None:
    channels: dict[str, set[str]] = {}
    for case in TOPICS["valid"]:
        channels.setdefault(case["direction"], set()).add(case["channel"])
    names = [case["name"] for case in TOPICS["valid"] + TOPICS["invalid"]]

    assert len(names) == len(set(names))
    assert TOPICS["root"] == DEVICE_TOPIC_ROOT
    assert channels == {
        "device_to_cloud": set(DEVICE_CHANNELS),
        "cloud_to_device": {CONFIG_CHANNEL, ACK_CHANNEL},
    }
    assert device_prefix("dev-0042") == f"{DEVICE_TOPIC_ROOT}/dev-0042"
    assert every_device("state") == f"{DEVICE_TOPIC_ROOT}/+/state"
    assert acl_pattern("config") == f"{DEVICE_TOPIC_ROOT}/%u/config"
    assert shared_filters("g", ("ack",)) == (f"$share/g/{DEVICE_TOPIC_ROOT}/+/ack",)


@pytest.mark.parametrize("case", _named(TOPICS["valid"]))
def test_topic_vector_is_built_and_parsed_back(case: dict[str, Any]) -> None:
    assert device_topic(case["device_id"], case["channel"]) == case["topic"]
    if case["channel"] == ACK_CHANNEL:
        # Ingest publishes acks and reads none, so no decoder takes the ack channel.
        with pytest.raises(ProtocolError, match="unknown_channel"):
            parse_topic(case["topic"])
    else:
        assert parse_topic(case["topic"]) == (case["device_id"], Channel(case["channel"]))


@pytest.mark.parametrize("case", _named(TOPICS["invalid"]))
def test_topic_vector_outside_the_contract_is_refused_with_its_reason(
    case: dict[str, Any],
) -> None:
    with pytest.raises(ProtocolError) as caught:
        parse_topic(case["topic"])
    assert caught.value.reason == case["reason"]


@pytest.mark.parametrize("mode", list(MODE_TABLES["factory"]["modes"]))
def test_default_modes_are_the_factory_tables_field_by_field(mode: str) -> None:
    expected = MODE_TABLES["factory"]["modes"][mode]
    ours = DEFAULT_MODES[mode]

    assert list(ours) == list(expected)  # the wire's field order, as the API shows it
    assert {name: ours[name] for name in expected if ours[name] != expected[name]} == {}
    assert ModeSpec.model_validate_json(json.dumps(ours)).model_dump(mode="json") == expected
    assert list(DEFAULT_MODES) == list(MODE_TABLES["factory"]["modes"])


def test_envelope_is_the_vectors_in_its_order() -> None:
    assert list(ENVELOPE) == [
        (limit["field"], limit.get("min"), limit.get("max")) for limit in MODE_TABLES["envelope"]
    ]


@pytest.mark.parametrize("case", _named(MODE_TABLES["envelope_cases"]))
def test_envelope_vector_finds_exactly_its_problems(case: dict[str, Any]) -> None:
    modes = {mode: {**spec, **case["modes"].get(mode, {})} for mode, spec in DEFAULT_MODES.items()}

    found = sorted((problem.path, problem.limit) for problem in envelope_problems(modes))
    assert found == sorted((problem["path"], problem["limit"]) for problem in case["problems"])


def test_canonical_json_sorts_keys_drops_whitespace_and_keeps_utf8() -> None:
    first = {"b": 1, "a": {"z": [1, 2.5, None], "é": "ü"}, "c": True}
    second = {"c": True, "a": {"é": "ü", "z": [1, 2.5, None]}, "b": 1}

    expected = '{"a":{"z":[1,2.5,null],"é":"ü"},"b":1,"c":true}'.encode()
    assert canonical_json(first) == expected
    assert canonical_json(second) == expected


def test_canonical_json_refuses_nan() -> None:
    with pytest.raises(ValueError, match="JSON compliant"):
        canonical_json({"x": float("nan")})


def test_signing_input_leaves_out_only_the_top_level_sig() -> None:
    table = {"version": 8, "sig": "AAAA", "modes": {"sig": 1}}

    assert signing_input(table) == b'{"modes":{"sig":1},"version":8}'


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)
_VALID_RAW = [
    _raw(case["payload"]) for document in DOCUMENTS.values() for case in document["valid"]
]


def _mutate(raw: bytes, position: int, byte: int) -> bytes:
    position %= len(raw)
    return raw[:position] + bytes([byte]) + raw[position + 1 :]


@settings(deadline=None, max_examples=300)
@given(
    channel=st.sampled_from(Channel),
    raw=st.one_of(
        st.binary(max_size=512),
        _JSON.map(lambda value: json.dumps(value).encode()),
        st.builds(
            _mutate,
            st.sampled_from(_VALID_RAW),
            st.integers(min_value=0),
            st.integers(min_value=0, max_value=255),
        ),
    ),
)
def test_decode_raises_only_protocol_error(channel: Channel, raw: bytes) -> None:
    try:
        outcome = type(decode(channel, raw)).__name__
    except ProtocolError as error:
        outcome = error.reason
    assert outcome in REASONS or outcome in MODEL_NAMES


# -- signed tables bound to their device, named by their key (signed_tables.json) ------------

SIGNED_TABLES = _load("signed_tables")


def _vector_key(label: str) -> Ed25519PrivateKey:
    seed = base64.b64decode(SIGNED_TABLES["keys"][label]["private_seed_test_only"])
    return Ed25519PrivateKey.from_private_bytes(seed)


def test_the_backend_names_each_vector_key_by_its_kid() -> None:
    for label, entry in SIGNED_TABLES["keys"].items():
        key = _vector_key(label)
        assert public_key_b64(key) == entry["public_key"]
        assert key_id(key) == entry["kid"]


@pytest.mark.parametrize(
    "case", _named([case for case in SIGNED_TABLES["cases"] if case["device"] is not None])
)
def test_the_backend_signs_a_bound_vector_table_byte_for_byte(case: dict[str, Any]) -> None:
    key = _vector_key(case["signed_with"])
    signed = sign_table(case["unsigned"], key, device=case["device"], brand=case["brand"])
    assert signed == case["table"]
    assert signing_input(signed) == case["signing_input"].encode("utf-8")
    assert isinstance(decode(Channel.CONFIG, _raw(signed)), ConfigTable)
