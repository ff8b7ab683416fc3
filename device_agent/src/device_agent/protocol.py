"""Protocol v1 as the device agent speaks it: topics, config signatures, outgoing self-checks
and the stored-acks it reads.

The agent installs only paho-mqtt and cryptography, so this module has no pydantic and nothing
from the backend. Both sides are held to one contract by the JSON vectors in
``protocol/vectors``: the backend's models and ``validate_outgoing`` here must agree on them.
"""

import base64
import binascii
import hashlib
import json
import math
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from enum import StrEnum
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

PROTOCOL_VERSION: Final = 1
TOPIC_PREFIX: Final = "galvani/v1/d/"
DEVICE_ID_PATTERN: Final = r"^[a-z0-9][a-z0-9-]{2,63}$"
MAX_PAYLOAD_BYTES: Final = 64 * 1024
MAX_SAMPLES: Final = 1000
INT64_MAX: Final = 2**63 - 1
# What the backend's columns hold (docs/protocol.md, bounds): mode-table versions are
# PostgreSQL integer, readings real.
INT32_MAX: Final = 2**31 - 1
REAL_MAX: Final = 3.4028234663852886e38
# A session id is a key of the backend's sessions table (an index entry holds ~2,700 bytes).
SESSION_ID_MAX: Final = 128

_DEVICE_ID: Final = re.compile(DEVICE_ID_PATTERN)


class Channel(StrEnum):
    """The last topic level: what a message carries."""

    TELEMETRY = "telemetry"
    EVENTS = "events"
    STATE = "state"
    PRESENCE = "presence"
    CONFIG = "config"
    ACK = "ack"  # cloud -> device: the seqs the backend has stored


OUTGOING_CHANNELS: Final = frozenset(
    {Channel.TELEMETRY, Channel.EVENTS, Channel.STATE, Channel.PRESENCE}
)


# Why a device refuses a mode table (``state.config.reason``). ``wrong_device`` (signed for
# another device) and ``unbound_table`` (naming no device) were added in v1.
CONFIG_REJECTIONS: Final = (
    "bad_signature",
    "stale_version",
    "outside_envelope",
    "expired",
    "malformed",
    "wrong_device",
    "unbound_table",
)


class ConfigRejected(Exception):
    """A mode table the device must not apply; ``reason`` is what it reports on ``state``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def topic(device_id: str, channel: Channel | str) -> str:
    """The topic of ``channel`` for ``device_id``; ``ValueError`` if either is not v1."""
    if _DEVICE_ID.fullmatch(device_id) is None:
        raise ValueError(f"device id {device_id!r} does not match {DEVICE_ID_PATTERN}")
    return f"{TOPIC_PREFIX}{device_id}/{Channel(channel)}"


def canonical_json(obj: object) -> bytes:
    """The canonical JSON of ``obj``: sorted keys, no whitespace, UTF-8 (what config signs)."""
    text = json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    return text.encode("utf-8")


def signing_input(table: Mapping[str, object]) -> bytes:
    """The bytes a mode table's Ed25519 ``sig`` covers: its canonical JSON without ``sig``."""
    return canonical_json({key: value for key, value in table.items() if key != "sig"})


def key_id(public_key: bytes) -> str:
    """The ``kid`` naming a raw Ed25519 public key: the first 16 hex digits of its SHA-256.

    Derived from the key itself, so the backend and a device agree on it without either being
    told: a table names the key that signed it, and a device looks it up among those it trusts.
    """
    return hashlib.sha256(public_key).hexdigest()[:16]


def trusted_keys(public_keys: bytes | Iterable[bytes]) -> dict[str, Ed25519PublicKey]:
    """The keys a device trusts, by ``kid``: one raw 32-byte key, or several (the current and
    the next during a rotation). A key of another size is a provisioning bug: ``ValueError``."""
    raw = [public_keys] if isinstance(public_keys, bytes) else list(public_keys)
    if not raw:
        raise ValueError("a device trusts at least one config-signing key")
    return {key_id(key): Ed25519PublicKey.from_public_bytes(key) for key in raw}


def verify_config(table: object, public_keys: bytes | Iterable[bytes]) -> None:
    """Raise ``ConfigRejected`` unless ``table`` carries a valid Ed25519 ``sig`` by a trusted key.

    ``table`` is whatever the config payload parsed to; ``public_keys`` is the backend's raw
    32-byte Ed25519 key, or the keys the device trusts (current and next). A table naming its
    key (``kid``) is checked with that key only, and refused if the device does not trust it;
    a table without ``kid`` (signed before key ids) is checked against each trusted key.
    """
    keys = trusted_keys(public_keys)
    if not isinstance(table, dict):
        raise ConfigRejected("malformed", "a mode table is a JSON object")
    sig = table.get("sig")
    if not isinstance(sig, str):
        raise ConfigRejected("bad_signature", "the table is not signed")
    kid = table.get("kid")
    if kid is not None and (not isinstance(kid, str) or kid not in keys):
        raise ConfigRejected("bad_signature", f"signed with key {kid!r}, which is not trusted")
    candidates = [keys[kid]] if isinstance(kid, str) else list(keys.values())
    try:
        signature = base64.b64decode(sig, validate=True)
    except binascii.Error:
        raise ConfigRejected("bad_signature", "sig is not base64") from None
    try:
        signed = signing_input(table)
    except (TypeError, ValueError) as exc:  # non-string keys, NaN, lone surrogates
        raise ConfigRejected("malformed", f"the table has no canonical JSON: {exc}") from None
    for verifier in candidates:
        try:
            verifier.verify(signature, signed)
        except InvalidSignature:
            continue
        return
    raise ConfigRejected("bad_signature", "sig does not match the table")


# A check returns None when the value is fine, else what is wrong with it.
_Check = Callable[[object], str | None]
# name -> (check, required); an optional field may be absent or null.
_Fields = Mapping[str, tuple[_Check, bool]]


def _integer(low: int, high: int) -> _Check:
    def check(value: object) -> str | None:
        if type(value) is not int:  # bool is an int subclass; JSON true is not a number
            return "must be an integer"
        return None if low <= value <= high else f"must be within {low}..{high}"

    return check


def _number(low: float, high: float) -> _Check:
    def check(value: object) -> str | None:
        if type(value) is not int and type(value) is not float:
            return "must be a number"
        if not math.isfinite(value) or not low <= value <= high:
            return f"must be within {low:g}..{high:g}"
        return None

    return check


def _one_of(values: Collection[str]) -> _Check:
    def check(value: object) -> str | None:
        return None if value in values and isinstance(value, str) else f"must be one of {values}"

    return check


def _of_type(kind: type, name: str) -> _Check:
    def check(value: object) -> str | None:
        return None if type(value) is kind else f"must be {name}"

    return check


_STRING: Final = _of_type(str, "a string")
_BOOLEAN: Final = _of_type(bool, "true or false")
_OBJECT: Final = _of_type(dict, "an object")
_SEQ: Final = _integer(0, INT64_MAX)
_EPOCH_MS: Final = _integer(0, INT64_MAX)
_LEVEL: Final = _integer(0, 10)
_CURRENT: Final = _number(0, 100_000)
_TEMPERATURE: Final = _number(-40, 150)
_MODE: Final = _one_of(("LIFT", "TIGHTEN", "INFUSE", "SAFE"))


def _session_id(value: object) -> str | None:
    if type(value) is not str:
        return "must be a string"
    return None if len(value) <= SESSION_ID_MAX else f"must be at most {SESSION_ID_MAX} characters"


def _version(value: object) -> str | None:
    if type(value) is int and value == PROTOCOL_VERSION:
        return None
    return f"must be {PROTOCOL_VERSION}"


_STAMPED: Final[_Fields] = {
    "v": (_version, True),
    "seq": (_SEQ, True),
    "ts": (_EPOCH_MS, True),
}
_TELEMETRY: Final[_Fields] = {
    "v": (_version, True),
    "seq": (_SEQ, True),
    "session": (_session_id, False),
}
_SAMPLE: Final[_Fields] = {
    "ts": (_EPOCH_MS, True),
    "mode": (_MODE, False),
    "level": (_LEVEL, False),
    "out": (_BOOLEAN, False),
    "i_ua": (_CURRENT, False),
    "i_set_ua": (_CURRENT, False),
    "v_v": (_number(-100, 100), False),
    "z_ohm": (_number(0, REAL_MAX), False),
    "t_elec_c": (_TEMPERATURE, False),
    "t_batt_c": (_TEMPERATURE, False),
    "batt_pct": (_integer(0, 100), False),
    "charging": (_BOOLEAN, False),
}
_EVENTS: Final[Mapping[str, _Fields]] = {
    "session_start": {
        "session": (_session_id, True),
        "mode": (_MODE, True),
        "level": (_LEVEL, True),
        "user": (_STRING, False),
    },
    "session_end": {
        "session": (_session_id, True),
        "duration_s": (_integer(0, INT64_MAX), True),
        "reason": (
            _one_of(
                (
                    "completed",
                    "user_stopped",
                    "auto_shutoff",
                    "fault",
                    "low_battery",
                    "no_contact",
                )
            ),
            True,
        ),
    },
    "fault": {
        "code": (
            _one_of(
                (
                    "overcurrent",
                    "dc_offset",
                    "short_circuit",
                    "overtemp_electrode",
                    "overtemp_battery",
                    "brownout",
                    "output_while_charging",
                    "watchdog",
                )
            ),
            True,
        ),
        "detail": (_OBJECT, False),
    },
    "reboot": {
        "reason": (
            _one_of(("power_on", "watchdog", "brownout", "firmware_update", "panic")),
            True,
        ),
    },
    "user_report": {
        "kind": (_one_of(("redness", "burn", "discomfort", "other")), True),
        "note": (_STRING, False),
    },
    "charging": {"on": (_BOOLEAN, True)},
}
_STATE: Final[_Fields] = {
    **_STAMPED,
    "fw": (_STRING, True),
    "hw": (_STRING, True),
    "config": (_OBJECT, False),
}
_CONFIG_REPORT: Final[_Fields] = {
    "version": (_integer(1, INT32_MAX), True),
    "sha256": (_STRING, True),
    "status": (_one_of(("applied", "rejected")), True),
    "reason": (
        _one_of(CONFIG_REJECTIONS),
        False,
    ),
}
_PRESENCE: Final[_Fields] = {
    "v": (_version, True),
    "online": (_BOOLEAN, True),
    "ts": (_EPOCH_MS, False),
}


def validate_outgoing(channel: Channel | str, payload: object) -> list[str]:
    """What is wrong with a payload the agent is about to publish, as ``"path: problem"``."""
    if Channel(channel) not in OUTGOING_CHANNELS:
        raise ValueError(f"{channel} is not a device-to-cloud channel")
    if not isinstance(payload, dict):
        return ["not_object: a payload is a JSON object"]
    if channel == Channel.TELEMETRY:
        return _telemetry_problems(payload)
    if channel == Channel.EVENTS:
        return _event_problems(payload)
    if channel == Channel.STATE:
        return _state_problems(payload)
    return _problems(payload, _PRESENCE)


def _problems(payload: Mapping[str, object], fields: _Fields, prefix: str = "") -> list[str]:
    problems = []
    for name, (check, required) in fields.items():
        value = payload.get(name)
        if value is None:
            if required:
                problems.append(f"{prefix}{name}: required")
        elif (problem := check(value)) is not None:
            problems.append(f"{prefix}{name}: {problem}")
    return problems


def _telemetry_problems(payload: Mapping[str, object]) -> list[str]:
    problems = _problems(payload, _TELEMETRY)
    samples = payload.get("samples")
    if not isinstance(samples, list) or not 1 <= len(samples) <= MAX_SAMPLES:
        return [*problems, f"samples: must be a list of 1..{MAX_SAMPLES} samples"]
    for index, sample in enumerate(samples):
        if isinstance(sample, dict):
            problems += _problems(sample, _SAMPLE, f"samples.{index}.")
        else:
            problems.append(f"samples.{index}: must be an object")
    return problems


def _event_problems(payload: Mapping[str, object]) -> list[str]:
    problems = _problems(payload, _STAMPED)
    event_type = payload.get("type")
    if not isinstance(event_type, str) or event_type not in _EVENTS:
        return [*problems, f"type: must be one of {tuple(_EVENTS)}"]
    return problems + _problems(payload, _EVENTS[event_type])


def _state_problems(payload: Mapping[str, object]) -> list[str]:
    problems = _problems(payload, _STATE)
    report = payload.get("config")
    if isinstance(report, dict):
        problems += _problems(report, _CONFIG_REPORT, "config.")
        if report.get("status") == "rejected" and report.get("reason") is None:
            problems.append("config.reason: a rejected table must name its reason")
    return problems


class MalformedAck(ValueError):
    """A payload on ``ack`` that is not a v1 stored-ack; ``path`` names what is wrong."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path


def parse_ack(raw: bytes) -> list[tuple[int, int]]:
    """The inclusive ``(first, last)`` seq ranges a stored-ack covers, or ``MalformedAck``.

    ``{"v": 1, "seqs": [[first, last], ...]}``; unknown fields are ignored. One bad range
    makes the whole ack malformed: a device deletes nothing on an ack it cannot fully read.
    """
    try:
        payload = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # RecursionError: json gives up on arrays nested thousands deep.
        raise MalformedAck("not_json", str(exc)[:100]) from None
    if not isinstance(payload, dict):
        raise MalformedAck("not_object", "an ack is a JSON object")
    if (problem := _version(payload.get("v"))) is not None:
        raise MalformedAck("v", problem)
    seqs = payload.get("seqs")
    if not isinstance(seqs, list):
        raise MalformedAck("seqs", "must be a list of [first, last] ranges")
    ranges = []
    for index, pair in enumerate(seqs):
        if (
            not isinstance(pair, list)
            or len(pair) != 2
            or _SEQ(pair[0]) is not None
            or _SEQ(pair[1]) is not None
            or pair[0] > pair[1]
        ):
            raise MalformedAck(f"seqs.{index}", "must be [first, last] seqs with first <= last")
        ranges.append((pair[0], pair[1]))
    return ranges
