"""The agent's factory mode tables and envelope against protocol/vectors/mode_tables.json, the
copy of safety.md both sides are held to (the backend's tests read the same file)."""

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from device_agent.modes import (
    DEFAULT_MODES,
    ENVELOPE,
    envelope_problems,
    factory_table,
    spec_payload,
    table_from_payload,
)

VECTORS = Path(__file__).resolve().parents[2] / "protocol" / "vectors"
MODE_TABLES: dict[str, Any] = json.loads((VECTORS / "mode_tables.json").read_text("utf-8"))
FACTORY = MODE_TABLES["factory"]


def test_factory_table_is_the_vectors_version_locks_and_modes() -> None:
    table = factory_table()

    assert table.version == FACTORY["version"]
    assert sorted(table.locked_modes) == FACTORY["locked_modes"]
    assert list(table.modes) == list(FACTORY["modes"])


@pytest.mark.parametrize("mode", list(FACTORY["modes"]))
def test_default_mode_is_the_vectors_field_by_field(mode: str) -> None:
    expected = FACTORY["modes"][mode]
    ours = spec_payload(DEFAULT_MODES[mode])

    assert list(ours) == list(expected)
    assert {name: ours[name] for name in expected if ours[name] != expected[name]} == {}


def test_envelope_is_the_vectors_in_its_order() -> None:
    assert list(ENVELOPE.items()) == [
        (limit["field"], (limit.get("min"), limit.get("max"))) for limit in MODE_TABLES["envelope"]
    ]


@pytest.mark.parametrize(
    "case", [pytest.param(case, id=case["name"]) for case in MODE_TABLES["envelope_cases"]]
)
def test_envelope_vector_finds_exactly_its_problems(case: dict[str, Any]) -> None:
    payload = copy.deepcopy(dict(factory_table().payload))
    for mode, changes in case["modes"].items():
        payload["modes"][mode].update(changes)

    problems = envelope_problems(table_from_payload({**payload, "version": 1}))

    # "modes.LIFT.i_max_ua: 501 is above the limit 500": the path, then the limit last.
    found = sorted((p.partition(":")[0], int(p.rsplit(" ", 1)[1])) for p in problems)
    assert found == sorted((problem["path"], problem["limit"]) for problem in case["problems"])
