"""Mode tables on the device: the factory defaults, the firmware's envelope, and the checks a
pushed table must pass before the agent applies it.

A table from the cloud is applied only if it is signed by a key the device trusts, well formed,
bound to this device, newer than the applied one, not expired and inside the envelope built
into the firmware. The
backend checks the same envelope before it signs; the device checks again because a table is
only as safe as the last component that looked at it.
"""

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Final

from device_agent.protocol import PROTOCOL_VERSION, ConfigRejected, signing_input, verify_config

MODES: Final = ("LIFT", "TIGHTEN", "INFUSE", "SAFE")
WAVEFORMS: Final = ("mono_alt", "dc")
INT64_MAX: Final = 2**63 - 1


@dataclass(frozen=True, slots=True)
class ModeSpec:
    """One mode's output and usage limits (integers only, as on the wire)."""

    waveform: str
    i_target_ua: int
    i_max_ua: int
    freq_hz: int
    pulse_ms: int
    v_max_v: int
    z_ok_ohm: tuple[int, int]
    session_default_s: int
    session_cap_s: int
    cooldown_s: int
    max_sessions_24h: int
    max_sessions_7d: int
    min_batt_pct: int
    t_elec_max_c: int


@dataclass(frozen=True, slots=True)
class ModeTable:
    """A mode table the agent can run: the factory one (version 0) or an applied cloud one."""

    version: int
    issued_at: int
    expires_at: int | None
    reason: str | None
    device: str | None  # the device the table is signed for; None only for the factory table
    locked_modes: frozenset[str]
    modes: Mapping[str, ModeSpec]
    sha256: str
    payload: Mapping[str, object]

    def usable(self, mode: str) -> ModeSpec | None:
        """The spec of ``mode`` if the table offers it and does not lock it."""
        if mode in self.locked_modes:
            return None
        return self.modes.get(mode)


# safety.md, "Default mode tables": one row a mode, in ModeSpec's field order (waveform,
# i_target_ua, i_max_ua, freq_hz, pulse_ms, v_max_v, z_ok_ohm, session_default_s,
# session_cap_s, cooldown_s, max_sessions_24h, max_sessions_7d, min_batt_pct, t_elec_max_c).
# protocol/vectors/mode_tables.json holds these and the backend's copy to the same values.
_GEL_OHM: Final = (1000, 20000)  # skin with conductive gel
DEFAULT_MODES: Final[Mapping[str, ModeSpec]] = {
    "LIFT": ModeSpec("mono_alt", 300, 400, 10, 40, 15, _GEL_OHM, 300, 1200, 1800, 2, 7, 20, 41),
    "TIGHTEN": ModeSpec("mono_alt", 200, 300, 50, 5, 15, _GEL_OHM, 300, 1200, 1800, 2, 7, 20, 41),
    "INFUSE": ModeSpec("dc", 100, 200, 0, 0, 15, _GEL_OHM, 300, 600, 14400, 1, 5, 20, 41),
    "SAFE": ModeSpec("mono_alt", 100, 150, 10, 40, 10, _GEL_OHM, 180, 300, 1800, 1, 3, 20, 41),
}


def spec_payload(spec: ModeSpec) -> dict[str, object]:
    """``spec`` as it appears on the wire."""
    payload: dict[str, object] = {field.name: getattr(spec, field.name) for field in fields(spec)}
    payload["z_ok_ohm"] = list(spec.z_ok_ohm)
    return payload


def factory_table() -> ModeTable:
    """The table built into the firmware: version 0, so any signed cloud table is newer."""
    payload: dict[str, object] = {
        "v": PROTOCOL_VERSION,
        "version": 0,
        "issued_at": 0,
        "expires_at": None,
        "reason": "factory defaults",
        "locked_modes": [],
        "modes": {mode: spec_payload(spec) for mode, spec in DEFAULT_MODES.items()},
    }
    return _table(payload)


# safety.md, "Safety envelope (home devices)": field -> (lowest allowed, highest allowed).
ENVELOPE: Final[Mapping[str, tuple[int | None, int | None]]] = {
    "i_max_ua": (None, 500),
    "v_max_v": (None, 30),
    "session_cap_s": (None, 1200),
    "t_elec_max_c": (None, 41),
    "min_batt_pct": (15, None),
    "max_sessions_24h": (None, 3),
    "max_sessions_7d": (None, 10),
    "cooldown_s": (0, None),
}


def check_table(
    payload: object,
    *,
    public_keys: bytes | Iterable[bytes],
    device_id: str,
    applied_version: int,
    now_ms: int,
) -> ModeTable:
    """The table to apply, or ``ConfigRejected`` naming the first check it failed.

    Order: signature (nothing unsigned is looked at further), shape, device, version, expiry,
    envelope.
    """
    verify_config(payload, public_keys)
    assert isinstance(payload, dict)  # verify_config rejects anything else as malformed
    table = parse_table(payload)
    check_device(table, device_id)
    if table.version <= applied_version:
        raise ConfigRejected(
            "stale_version", f"version {table.version} is not newer than {applied_version}"
        )
    check_expiry(table, now_ms)
    problems = envelope_problems(table)
    if problems:
        raise ConfigRejected("outside_envelope", "; ".join(problems))
    return table


def check_device(table: ModeTable, device_id: str) -> None:
    """``ConfigRejected`` unless ``table`` is signed for ``device_id``.

    Firmware that knows the ``device`` field requires it: without it, a table signed for one
    device would apply on any other (republished on its ``config`` topic, say, to lift a SAFE
    lock), since the signature covers only what the table says.
    """
    if table.device is None:
        raise ConfigRejected("unbound_table", "the table names no device")
    if table.device != device_id:
        raise ConfigRejected(
            "wrong_device", f"signed for device {table.device!r}, this is {device_id!r}"
        )


def check_expiry(table: ModeTable, now_ms: int) -> None:
    """``ConfigRejected("expired")`` once ``expires_at`` has passed: on receipt, and again when
    a table that waited for a session to end is about to be applied."""
    if table.expires_at is not None and table.expires_at <= now_ms:
        raise ConfigRejected("expired", f"expired at {table.expires_at} (now {now_ms})")


def envelope_problems(table: ModeTable) -> list[str]:
    """Every way ``table`` leaves the firmware's envelope, as ``"modes.M.field: why"``."""
    problems = []
    for mode, spec in table.modes.items():
        for name, (low, high) in ENVELOPE.items():
            value = getattr(spec, name)
            if high is not None and value > high:
                problems.append(f"modes.{mode}.{name}: {value} is above the limit {high}")
            if low is not None and value < low:
                problems.append(f"modes.{mode}.{name}: {value} is below the limit {low}")
        if spec.i_target_ua > spec.i_max_ua:
            problems.append(
                f"modes.{mode}.i_target_ua: {spec.i_target_ua} is above i_max_ua {spec.i_max_ua}"
            )
    return problems


def parse_table(payload: Mapping[str, object]) -> ModeTable:
    """The shape checks of a config payload (``ConfigRejected("malformed")`` naming the path)."""
    _require(payload.get("v") == PROTOCOL_VERSION and _is_int(payload.get("v")), "v", "must be 1")
    version = payload.get("version")
    _require(_is_int(version, 1), "version", "must be an integer >= 1")
    _require(_is_int(payload.get("issued_at"), 0), "issued_at", "must be epoch milliseconds")
    expires_at = payload.get("expires_at")
    _require(expires_at is None or _is_int(expires_at, 0), "expires_at", "must be epoch ms or null")
    reason = payload.get("reason")
    _require(reason is None or isinstance(reason, str), "reason", "must be a string or null")
    sig = payload.get("sig")
    _require(isinstance(sig, str) and sig != "", "sig", "must be a non-empty string")
    for name in ("device", "brand", "kid"):  # added in v1; absent or a non-empty string
        value = payload.get(name)
        _require(
            value is None or (isinstance(value, str) and value != ""), name, "must be a string"
        )
    locked = payload.get("locked_modes", [])
    _require(isinstance(locked, list), "locked_modes", "must be a list of modes")
    assert isinstance(locked, list)
    for index, mode in enumerate(locked):
        _require(mode in MODES, f"locked_modes.{index}", f"must be one of {MODES}")
    modes = payload.get("modes")
    _require(isinstance(modes, dict), "modes", "must be an object of mode specs")
    assert isinstance(modes, dict)
    for mode, spec in modes.items():
        _require(mode in MODES, f"modes.{mode}", f"is not one of {MODES}")
        _require(isinstance(spec, dict), f"modes.{mode}", "must be an object")
        _check_spec(spec, f"modes.{mode}")
    return _table(payload)


def _check_spec(spec: Mapping[str, object], path: str) -> None:
    for field in fields(ModeSpec):
        value = spec.get(field.name)
        where = f"{path}.{field.name}"
        if field.name == "waveform":
            _require(value in WAVEFORMS, where, f"must be one of {WAVEFORMS}")
        elif field.name == "z_ok_ohm":
            ok = (
                isinstance(value, list)
                and len(value) == 2
                and all(_is_int(bound, 0) for bound in value)
                and value[0] <= value[1]
            )
            _require(ok, where, "must be [low, high] integers with low <= high")
        elif field.name in ("min_batt_pct",):
            _require(_is_int(value, 0, 100), where, "must be an integer 0..100")
        elif field.name == "t_elec_max_c":
            _require(_is_int(value, -40, 150), where, "must be an integer -40..150")
        else:
            _require(_is_int(value, 0), where, "must be a non-negative integer")


def _is_int(value: object, low: int = -INT64_MAX, high: int = INT64_MAX) -> bool:
    return type(value) is int and low <= value <= high


def _require(ok: bool, path: str, problem: str) -> None:
    if not ok:
        raise ConfigRejected("malformed", f"{path}: {problem}")


def _table(payload: Mapping[str, object]) -> ModeTable:
    modes = payload["modes"]
    assert isinstance(modes, dict)
    specs = {}
    for mode, spec in modes.items():
        values = dict(spec)
        values["z_ok_ohm"] = tuple(values["z_ok_ohm"])
        specs[mode] = ModeSpec(**{field.name: values[field.name] for field in fields(ModeSpec)})
    expires_at = payload.get("expires_at")
    reason = payload.get("reason")
    device = payload.get("device")
    locked = payload.get("locked_modes") or []
    assert isinstance(locked, list)
    return ModeTable(
        version=_int(payload["version"]),
        issued_at=_int(payload["issued_at"]),
        expires_at=expires_at if isinstance(expires_at, int) else None,
        reason=reason if isinstance(reason, str) else None,
        device=device if isinstance(device, str) else None,
        locked_modes=frozenset(str(mode) for mode in locked),
        modes=specs,
        sha256=table_sha256(payload),
        payload=dict(payload),
    )


def _int(value: object) -> int:
    assert type(value) is int  # parse_table checked it
    return value


def table_sha256(payload: Mapping[str, object]) -> str:
    """What ``state.config.sha256`` reports: SHA-256 (hex) of the signed bytes (no ``sig``)."""
    return hashlib.sha256(signing_input(payload)).hexdigest()


def table_from_payload(payload: Mapping[str, object]) -> ModeTable:
    """A table the agent applied earlier and stored (it passed every check then)."""
    return _table(payload)
