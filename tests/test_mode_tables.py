"""The backend's envelope and the tables rules push (pure functions)."""

import json

import pytest

from services.common.mode_tables import (
    ALL_MODES,
    DEFAULT_MODES,
    envelope_problems,
    restricted_table,
)
from services.common.settings import REPO_ROOT


def test_the_default_tables_are_inside_the_envelope() -> None:
    assert envelope_problems(DEFAULT_MODES) == []


@pytest.mark.parametrize(
    ("field", "at_limit", "past_limit"),
    [
        ("i_max_ua", 500, 501),
        ("v_max_v", 30, 31),
        ("session_cap_s", 1200, 1201),
        ("t_elec_max_c", 41, 42),
        ("min_batt_pct", 15, 14),
        ("max_sessions_24h", 3, 4),
        ("max_sessions_7d", 10, 11),
        ("cooldown_s", 0, -1),
    ],
)
def test_a_limit_itself_is_allowed_and_one_past_it_is_not(
    field: str, at_limit: int, past_limit: int
) -> None:
    spec = {**DEFAULT_MODES["LIFT"], "i_target_ua": 100}
    assert envelope_problems({"LIFT": {**spec, field: at_limit}}) == []
    [problem] = envelope_problems({"LIFT": {**spec, field: past_limit}})
    assert (problem.path, problem.limit, problem.value) == (
        f"modes.LIFT.{field}",
        at_limit,
        past_limit,
    )


def test_a_target_above_the_maximum_is_refused() -> None:
    spec = {**DEFAULT_MODES["LIFT"], "i_target_ua": 450, "i_max_ua": 400}
    [problem] = envelope_problems({"LIFT": spec})
    assert (problem.path, problem.limit) == ("modes.LIFT.i_target_ua", 400)


def test_safe_push_keeps_the_devices_modes_and_locks_all_but_safe() -> None:
    current = {"modes": {"LIFT": {**DEFAULT_MODES["LIFT"], "i_target_ua": 250}}}
    table = restricted_table(current, version=9, issued_at_ms=1, reason="r", lock_all=False)
    assert table["modes"]["LIFT"]["i_target_ua"] == 250
    assert table["modes"]["SAFE"] == DEFAULT_MODES["SAFE"]  # the device had none: the default
    assert table["locked_modes"] == ["LIFT", "TIGHTEN", "INFUSE"]
    assert (table["version"], table["v"], table["reason"]) == (9, 1, "r")


def test_lock_all_locks_every_mode_safe_included() -> None:
    table = restricted_table(None, version=1, issued_at_ms=1, reason="r", lock_all=True)
    assert table["locked_modes"] == list(ALL_MODES)
    assert set(table["modes"]) == set(DEFAULT_MODES)


def test_the_defaults_are_the_ones_the_protocol_vectors_pin() -> None:
    vectors = json.loads((REPO_ROOT / "protocol" / "vectors" / "config.json").read_text())
    [defaults] = [c for c in vectors["valid"] if c["name"] == "default_tables_all_modes"]
    assert defaults["payload"]["modes"] == DEFAULT_MODES
