"""Mode tables on the backend: the safety envelope, the default tables, and the tables rules
push (SAFE, or every mode locked), built from what a device runs now.

Every table the backend signs passes :func:`envelope_problems` first; devices check the same
envelope again in firmware (``device_agent/modes.py``), so the two are held to one list in
``docs/safety.md``. A problem names the field's path and the limit, which is what the API's
422 and the dashboard's form show next to the field.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from services.common.protocol.enums import Mode

PROTOCOL_VERSION: Final = 1

# safety.md, "Safety envelope (home devices)": (field, lowest allowed, highest allowed).
ENVELOPE: Final[tuple[tuple[str, int | None, int | None], ...]] = (
    ("i_max_ua", None, 500),
    ("v_max_v", None, 30),
    ("session_cap_s", None, 1200),
    ("t_elec_max_c", None, 41),
    ("min_batt_pct", 15, None),
    ("max_sessions_24h", None, 3),
    ("max_sessions_7d", None, 10),
    ("cooldown_s", 0, None),
)
ALL_MODES: Final = tuple(mode.value for mode in Mode)


@dataclass(frozen=True)
class EnvelopeProblem:
    """One way a table leaves the envelope: where, what the limit is, what was asked."""

    path: str
    limit: int
    value: int
    message: str


# safety.md, "Default mode tables", laid out as it prints them: a field a line, a mode a
# column. protocol/vectors/mode_tables.json holds these and the device's copy to the same values.
_FACTORY_COLUMNS: Final[dict[str, tuple[Any, ...]]] = {
    "waveform": ("mono_alt", "mono_alt", "dc", "mono_alt"),
    "i_target_ua": (300, 200, 100, 100),
    "i_max_ua": (400, 300, 200, 150),
    "freq_hz": (10, 50, 0, 10),
    "pulse_ms": (40, 5, 0, 40),
    "v_max_v": (15, 15, 15, 10),
    "z_ok_ohm": ((1000, 20000),) * 4,
    "session_default_s": (300, 300, 300, 180),
    "session_cap_s": (1200, 1200, 600, 300),
    "cooldown_s": (1800, 1800, 14400, 1800),
    "max_sessions_24h": (2, 2, 1, 1),
    "max_sessions_7d": (7, 7, 5, 3),
    "min_batt_pct": (20,) * 4,
    "t_elec_max_c": (41,) * 4,
}
# Each spec as it is on the wire (z_ok_ohm a list, as JSON and jsonb give it back).
DEFAULT_MODES: Final[Mapping[str, Mapping[str, Any]]] = {
    mode: {
        name: list(values[column]) if name == "z_ok_ohm" else values[column]
        for name, values in _FACTORY_COLUMNS.items()
    }
    for column, mode in enumerate(ALL_MODES)
}


def envelope_problems(modes: Mapping[str, Mapping[str, Any]]) -> list[EnvelopeProblem]:
    """Every way the mode specs in ``modes`` leave the envelope (empty when inside)."""
    problems = []
    for mode, spec in modes.items():
        for name, low, high in ENVELOPE:
            value = spec[name]
            if high is not None and value > high:
                problems.append(
                    EnvelopeProblem(
                        f"modes.{mode}.{name}", high, value, f"{value} is above the limit {high}"
                    )
                )
            if low is not None and value < low:
                problems.append(
                    EnvelopeProblem(
                        f"modes.{mode}.{name}", low, value, f"{value} is below the limit {low}"
                    )
                )
        if spec["i_target_ua"] > spec["i_max_ua"]:
            problems.append(
                EnvelopeProblem(
                    f"modes.{mode}.i_target_ua",
                    spec["i_max_ua"],
                    spec["i_target_ua"],
                    f"{spec['i_target_ua']} is above i_max_ua {spec['i_max_ua']}",
                )
            )
    return problems


def restricted_table(
    current: Mapping[str, Any] | None,
    *,
    version: int,
    issued_at_ms: int,
    reason: str,
    lock_all: bool,
    expires_at_ms: int | None = None,
) -> dict[str, Any]:
    """The table a rule pushes, unsigned: the device's current modes with SAFE only, or with
    every mode locked.

    ``current`` is the device's applied table (``None``: the factory defaults). SAFE keeps the
    device's own SAFE spec, or the default one when its table has none.
    """
    modes = dict(current["modes"]) if current is not None else dict(DEFAULT_MODES)
    modes.setdefault("SAFE", dict(DEFAULT_MODES["SAFE"]))
    locked = list(ALL_MODES) if lock_all else [mode for mode in ALL_MODES if mode != "SAFE"]
    return {
        "v": PROTOCOL_VERSION,
        "version": version,
        "issued_at": issued_at_ms,
        "expires_at": expires_at_ms,
        "reason": reason,
        "locked_modes": locked,
        "modes": modes,
    }
