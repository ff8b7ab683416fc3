"""Payload bytes: where untrusted input becomes a v1 model or a ProtocolError (topics are
read by :mod:`services.common.protocol.topics`)."""

import json
import re
from collections.abc import Mapping
from typing import Any, Final, Literal, NoReturn, overload

from pydantic import TypeAdapter, ValidationError
from pydantic_core import from_json

from services.common.protocol.enums import Channel, EventType
from services.common.protocol.errors import ProtocolError
from services.common.protocol.models import ConfigTable, Event, Message, Presence, State, Telemetry

MAX_PAYLOAD_BYTES: Final = 64 * 1024
MAX_JSON_DEPTH: Final = 32  # v1 payloads nest 4 deep; the rest of the room is for `detail`

_ADAPTERS: Final[dict[Channel, TypeAdapter[Any]]] = {
    Channel.TELEMETRY: TypeAdapter(Telemetry),
    Channel.EVENTS: TypeAdapter(Event),
    Channel.STATE: TypeAdapter(State),
    Channel.PRESENCE: TypeAdapter(Presence),
    Channel.CONFIG: TypeAdapter(ConfigTable),
}
_EVENT_TAGS: Final = frozenset(EventType)
_JSON_KINDS: Final[dict[type, str]] = {
    list: "array",
    str: "string",
    int: "number",
    float: "number",
    bool: "boolean",
    type(None): "null",
}
_JSON_WHITESPACE: Final = b" \t\r\n"
_OPENERS: Final = frozenset(b"[{")
_NOT_BRACKETS: Final = bytes(sorted(set(range(256)) - set(b"[]{}")))
# A string literal, or an unterminated one running to the end: every '"' starts a match, so
# stripping strings is linear even on hostile input.
_JSON_STRING: Final = re.compile(rb'"(?:[^"\\]++|\\.)*+(?:"|\\?\Z)', re.DOTALL)
_NAN_OR_INFINITY: Final = re.compile(rb"NaN|Infinity")
# An escape for U+0000 is a backslash run of odd length followed by u0000.
_NUL_ESCAPE: Final = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")


@overload
def decode(channel: Literal[Channel.TELEMETRY], raw: bytes) -> Telemetry: ...
@overload
def decode(channel: Literal[Channel.EVENTS], raw: bytes) -> Event: ...
@overload
def decode(channel: Literal[Channel.STATE], raw: bytes) -> State: ...
@overload
def decode(channel: Literal[Channel.PRESENCE], raw: bytes) -> Presence: ...
@overload
def decode(channel: Literal[Channel.CONFIG], raw: bytes) -> ConfigTable: ...
@overload
def decode(channel: Channel | str, raw: bytes) -> Message: ...
def decode(channel: Channel | str, raw: bytes) -> Message:
    """Decode and validate one payload of ``channel``; raise ``ProtocolError`` if it is not v1."""
    try:
        channel = Channel(channel)
    except ValueError:
        raise ProtocolError("unknown_channel", "not a protocol v1 channel") from None
    if len(raw) > MAX_PAYLOAD_BYTES:
        raise ProtocolError("too_large", f"{len(raw)} bytes, limit {MAX_PAYLOAD_BYTES}")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError("not_utf8", f"invalid UTF-8 at byte {exc.start}") from None
    if _too_deep(raw):
        raise ProtocolError("too_deep", f"JSON nested deeper than {MAX_JSON_DEPTH}")
    if _has_nan_or_infinity(raw):
        raise ProtocolError("bad_json", "NaN and Infinity are not JSON")
    if not raw.lstrip(_JSON_WHITESPACE).startswith(b"{"):
        _raise_not_object(raw)
    try:
        message: Message = _ADAPTERS[channel].validate_json(raw)
    except ValidationError as exc:
        raise _translate(exc, channel) from None
    if _has_nul_escape(raw):
        raise ProtocolError("invalid", "a string holds U+0000, which PostgreSQL cannot store")
    return message


def canonical_json(obj: object) -> bytes:
    """The canonical JSON of ``obj``: sorted keys, no whitespace, UTF-8 (what config signs)."""
    text = json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    return text.encode("utf-8")


def signing_input(table: Mapping[str, object]) -> bytes:
    """The bytes a mode table's Ed25519 ``sig`` covers: its canonical JSON without ``sig``."""
    return canonical_json({key: value for key, value in table.items() if key != "sig"})


def _too_deep(raw: bytes) -> bool:
    # Counting brackets is an upper bound on depth, so most messages never need the scan.
    if raw.count(b"[") + raw.count(b"{") <= MAX_JSON_DEPTH:
        return False
    depth = 0
    for byte in _JSON_STRING.sub(b"", raw).translate(None, _NOT_BRACKETS):
        if byte in _OPENERS:
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return True
        else:
            depth -= 1
    return False


def _has_nan_or_infinity(raw: bytes) -> bool:
    # The JSON parser pydantic uses reads these tokens, and PostgreSQL's jsonb would then refuse
    # the payload in the middle of an ingest batch.
    if b"NaN" not in raw and b"Infinity" not in raw:
        return False
    return _NAN_OR_INFINITY.search(_JSON_STRING.sub(b"", raw)) is not None


def _has_nul_escape(raw: bytes) -> bool:
    # Valid JSON, but PostgreSQL text and jsonb both refuse U+0000.
    return b"\\u0000" in raw and _NUL_ESCAPE.search(raw) is not None


def _raise_not_object(raw: bytes) -> NoReturn:
    try:
        value = from_json(raw, allow_inf_nan=False)
    except ValueError as exc:
        raise ProtocolError("bad_json", str(exc)) from None
    kind = _JSON_KINDS.get(type(value), "value")
    raise ProtocolError("not_object", f"payload is a JSON {kind}, not an object")


def _translate(exc: ValidationError, channel: Channel) -> ProtocolError:
    errors = exc.errors(include_url=False, include_input=False)
    if errors[0]["type"] == "json_invalid":
        return ProtocolError("bad_json", errors[0]["msg"])
    problems = []
    for error in errors:
        loc = error["loc"]
        if error["type"].startswith("union_tag_"):
            loc = ("type",)
        elif channel is Channel.EVENTS and loc and loc[0] in _EVENT_TAGS:
            loc = loc[1:]  # a tagged union prefixes the tag; the wire has no such level
        problems.append((".".join(str(part) for part in loc if part != "[key]"), error["msg"]))
    detail = "; ".join(f"{path}: {msg}" for path, msg in problems[:3])
    if len(problems) > 3:
        detail += f" (and {len(problems) - 3} more)"
    return ProtocolError("invalid", detail, path=problems[0][0])
