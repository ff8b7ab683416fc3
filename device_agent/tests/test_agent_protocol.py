"""The agent's protocol v1 against the shared vectors, without importing the backend."""

import base64
import copy
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from device_agent.modes import check_table
from device_agent.protocol import (
    OUTGOING_CHANNELS,
    TOPIC_PREFIX,
    Channel,
    ConfigRejected,
    MalformedAck,
    canonical_json,
    key_id,
    parse_ack,
    signing_input,
    topic,
    validate_outgoing,
    verify_config,
)

VECTORS = Path(__file__).resolve().parents[2] / "protocol" / "vectors"


def _load(name: str) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((VECTORS / f"{name}.json").read_text("utf-8"))
    return document


def _named(cases: list[dict[str, Any]]) -> list[Any]:
    return [pytest.param(case, id=case["name"]) for case in cases]


OUTGOING = {channel: _load(channel) for channel in sorted(OUTGOING_CHANNELS)}
CONFIG = _load(Channel.CONFIG)
ACK = _load(Channel.ACK)
TOPICS = _load("topics")
VALID = [
    pytest.param(channel, case["payload"], id=f"{channel}/{case['name']}")
    for channel, document in OUTGOING.items()
    for case in document["valid"]
]
INVALID = [
    pytest.param(channel, case["payload"], case["reason"], id=f"{channel}/{case['name']}")
    for channel, document in OUTGOING.items()
    for case in document["invalid"]
]


def _public_bytes(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _signed(table: dict[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    unsigned = {name: value for name, value in table.items() if name != "sig"}
    return {**unsigned, "sig": base64.b64encode(key.sign(canonical_json(unsigned))).decode()}


def _rejection(table: object, key: Ed25519PrivateKey) -> str:
    """The reason ``verify_config`` refuses ``table`` with (it must refuse it)."""
    with pytest.raises(ConfigRejected) as caught:
        verify_config(table, _public_bytes(key))
    return caught.value.reason


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def table() -> dict[str, Any]:
    cases = {case["name"]: case["payload"] for case in CONFIG["valid"]}
    return copy.deepcopy(cases["default_tables_all_modes"])


def test_outgoing_channels_are_the_device_to_cloud_ones() -> None:
    assert {Channel.TELEMETRY, Channel.EVENTS, Channel.STATE, Channel.PRESENCE} == set(
        OUTGOING_CHANNELS
    )
    assert all(document["invalid"] for document in OUTGOING.values())


@pytest.mark.parametrize(("channel", "payload"), VALID)
def test_valid_vector_passes_the_self_check(channel: Channel, payload: object) -> None:
    assert validate_outgoing(channel, payload) == []


@pytest.mark.parametrize(("channel", "payload", "reason"), INVALID)
def test_invalid_vector_is_flagged_at_its_reason(
    channel: Channel, payload: object, reason: str
) -> None:
    problems = validate_outgoing(channel, payload)

    assert [problem.partition(":")[0] for problem in problems] == [reason]


def test_self_check_reports_every_problem_not_just_the_first() -> None:
    payload = {"v": 2, "seq": True, "samples": [{"ts": 1763805600000, "level": 11}, {}]}

    assert sorted(p.partition(":")[0] for p in validate_outgoing("telemetry", payload)) == [
        "samples.0.level",
        "samples.1.ts",
        "seq",
        "v",
    ]


def test_self_check_refuses_the_config_channel() -> None:
    with pytest.raises(ValueError, match="not a device-to-cloud channel"):
        validate_outgoing(Channel.CONFIG, {"v": 1})


def test_topic_vectors_name_every_channel_under_the_agents_prefix() -> None:
    assert f"{TOPICS['root']}/" == TOPIC_PREFIX
    assert {case["channel"] for case in TOPICS["valid"]} == set(Channel)


@pytest.mark.parametrize("case", _named(TOPICS["valid"]))
def test_topic_is_the_vectors_topic(case: dict[str, Any]) -> None:
    assert topic(case["device_id"], case["channel"]) == case["topic"]


@pytest.mark.parametrize("case", _named([case for case in TOPICS["invalid"] if "part" in case]))
def test_topic_refuses_a_vector_naming_the_part_at_fault(case: dict[str, Any]) -> None:
    # The broker would refuse such a topic, or the backend dead-letter it: the agent must
    # never build one. The other refused topics are not made of an id and a channel.
    with pytest.raises(ValueError) as caught:
        topic(case["device_id"], case["channel"])
    assert repr(case[case["part"]]) in str(caught.value)


def test_canonical_json_sorts_keys_drops_whitespace_and_keeps_utf8() -> None:
    value = {"b": 1, "a": {"z": [1, 2.5, None], "é": "ü"}, "c": True}

    assert canonical_json(value) == '{"a":{"z":[1,2.5,null],"é":"ü"},"b":1,"c":true}'.encode()


def test_signed_vector_is_accepted() -> None:
    signed = CONFIG["signed"]

    assert signing_input(signed["table"]) == signed["signing_input"].encode("utf-8")
    verify_config(signed["table"], base64.b64decode(signed["public_key"]))


def test_table_signed_with_the_backend_key_is_accepted(
    table: dict[str, Any], key: Ed25519PrivateKey
) -> None:
    signed = _signed(table, key)
    reordered = dict(reversed(list(signed.items())))  # the signature covers content, not order

    verify_config(signed, _public_bytes(key))
    verify_config(reordered, _public_bytes(key))


@pytest.mark.parametrize(
    "tamper",
    [
        lambda t: t["modes"]["LIFT"].update(i_max_ua=900),
        lambda t: t["modes"]["LIFT"]["z_ok_ohm"].append(5),
        lambda t: t["locked_modes"].append("INFUSE"),
        lambda t: t.update(version=t["version"] + 1),
        lambda t: t.update(added_after_signing=True),
        lambda t: t.pop("expires_at"),
    ],
    ids=["nested_limit", "nested_list", "locked_modes", "version", "added_field", "removed_field"],
)
def test_tampered_table_is_bad_signature(
    table: dict[str, Any], key: Ed25519PrivateKey, tamper: Any
) -> None:
    signed = _signed(table, key)
    tamper(signed)

    assert _rejection(signed, key) == "bad_signature"


def test_table_signed_by_another_key_is_bad_signature(
    table: dict[str, Any], key: Ed25519PrivateKey
) -> None:
    signed = _signed(table, Ed25519PrivateKey.generate())

    assert _rejection(signed, key) == "bad_signature"


@pytest.mark.parametrize(
    "sig",
    [None, "", "not base64!", base64.b64encode(b"short").decode(), 12, "A" * 86 + "=="],
    ids=["null", "empty", "not_base64", "wrong_length", "number", "zero_signature"],
)
def test_unusable_sig_is_bad_signature(
    table: dict[str, Any], key: Ed25519PrivateKey, sig: object
) -> None:
    assert _rejection({**table, "sig": sig}, key) == "bad_signature"


def test_unsigned_table_is_bad_signature(table: dict[str, Any], key: Ed25519PrivateKey) -> None:
    del table["sig"]

    assert _rejection(table, key) == "bad_signature"


@pytest.mark.parametrize("payload", [[], "table", None, 8])
def test_table_that_is_not_an_object_is_malformed(payload: object, key: Ed25519PrivateKey) -> None:
    assert _rejection(payload, key) == "malformed"


def test_table_without_canonical_json_is_malformed(
    table: dict[str, Any], key: Ed25519PrivateKey
) -> None:
    signed = _signed(table, key)
    signed["modes"]["LIFT"]["i_max_ua"] = float("nan")

    assert _rejection(signed, key) == "malformed"


# -- stored-acks (cloud -> device) ---------------------------------------------------------


def test_the_ack_vectors_are_well_formed() -> None:
    names = [case["name"] for case in ACK["valid"] + ACK["invalid"]]
    assert ACK["channel"] == "ack"
    assert len(names) == len(set(names))
    assert ACK["valid"]
    assert ACK["invalid"]
    assert topic("dev-0042", Channel.ACK) == "galvani/v1/d/dev-0042/ack"


@pytest.mark.parametrize("case", _named(ACK["valid"]))
def test_valid_ack_vector_is_read_as_its_ranges(case: dict[str, Any]) -> None:
    raw = json.dumps(case["payload"]).encode()

    assert parse_ack(raw) == [(first, last) for first, last in case["payload"]["seqs"]]


@pytest.mark.parametrize("case", _named(ACK["invalid"]))
def test_invalid_ack_vector_is_refused_at_its_reason(case: dict[str, Any]) -> None:
    with pytest.raises(MalformedAck) as caught:
        parse_ack(json.dumps(case["payload"]).encode())

    assert caught.value.path == case["reason"]


@pytest.mark.parametrize(
    "raw",
    [b"", b"{", b'{"v": 1, "seqs": [[1, 2]]', b"\xff\xfe", b"[" * 100_000, b'{"v": NaN}'],
    ids=["empty", "truncated", "unclosed", "not_utf8", "nested_deep", "nan"],
)
def test_an_ack_that_is_not_json_is_refused_not_raised(raw: bytes) -> None:
    with pytest.raises(MalformedAck) as caught:
        parse_ack(raw)

    assert caught.value.path in {"not_json", "v"}


# -- signed tables bound to their device, named by their key (signed_tables.json) ------------

SIGNED_TABLES = _load("signed_tables")
SIGNED_NOW_MS = 1_763_806_300_000


def _vector_keys(labels: list[str]) -> list[bytes]:
    return [base64.b64decode(SIGNED_TABLES["keys"][label]["public_key"]) for label in labels]


def test_a_key_id_is_the_start_of_the_sha256_of_the_public_key() -> None:
    for entry in SIGNED_TABLES["keys"].values():
        assert key_id(base64.b64decode(entry["public_key"])) == entry["kid"]


@pytest.mark.parametrize("case", _named(SIGNED_TABLES["cases"]))
def test_signed_table_vector_gets_its_answer(case: dict[str, Any]) -> None:
    table = case["table"]
    assert signing_input(table) == case["signing_input"].encode("utf-8")

    def check() -> str:
        checked = check_table(
            copy.deepcopy(table),
            public_keys=_vector_keys(case["trusts"]),
            device_id=case["check_on"],
            applied_version=0,
            now_ms=SIGNED_NOW_MS,
        )
        assert checked.device == case["check_on"]
        return "applied"

    if case["result"] == "applied":
        assert check() == "applied"
    else:
        with pytest.raises(ConfigRejected) as rejected:
            check()
        assert rejected.value.reason == case["result"]


def test_the_unbound_signed_vector_still_verifies_but_is_refused_as_unbound() -> None:
    signed = CONFIG["signed"]
    with pytest.raises(ConfigRejected) as rejected:
        check_table(
            signed["table"],
            public_keys=base64.b64decode(signed["public_key"]),
            device_id="dev-0042",
            applied_version=0,
            now_ms=SIGNED_NOW_MS,
        )
    assert rejected.value.reason == "unbound_table"
