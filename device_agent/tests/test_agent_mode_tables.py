"""Mode tables pushed to the agent on ``config``: checked, applied now or after the session,
answered once, and never lost or answered twice across a power loss (fake clock, no broker).
"""

import base64
import copy
import json
from pathlib import Path
from typing import Any

import pytest
from agent_rig import T0, PowerLoss, Rig, lose_power_at
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from device_agent.modes import DEFAULT_MODES, factory_table, spec_payload
from device_agent.protocol import canonical_json


def _answer(rig: Rig) -> dict[str, Any]:
    answer: dict[str, Any] = rig.states()[-1]["config"]
    return answer


def test_a_valid_table_is_applied_and_answered(rig: Rig) -> None:
    raw = rig.signed(version=5)
    rig.agent.on_config(rig.clock.ms, raw)
    answer = _answer(rig)
    assert answer["status"] == "applied"
    assert answer["version"] == 5
    assert len(answer["sha256"]) == 64
    assert rig.agent.table.version == 5
    assert rig.store.get("table") == json.loads(raw)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"version": 1}, None),  # placeholder: replaced below with a stale version
        ({"expires_at": T0 - 1}, "expired"),
        (
            {"modes": {"LIFT": {**spec_payload(DEFAULT_MODES["LIFT"]), "i_max_ua": 600}}},
            "outside_envelope",
        ),
        (
            {"modes": {"LIFT": {**spec_payload(DEFAULT_MODES["LIFT"]), "session_cap_s": 1500}}},
            "outside_envelope",
        ),
        (
            {"modes": {"LIFT": {**spec_payload(DEFAULT_MODES["LIFT"]), "min_batt_pct": 10}}},
            "outside_envelope",
        ),
        (
            {"modes": {"LIFT": {**spec_payload(DEFAULT_MODES["LIFT"]), "i_target_ua": 450}}},
            "outside_envelope",
        ),
        ({"modes": {"TURBO": spec_payload(DEFAULT_MODES["LIFT"])}}, "malformed"),
    ],
)
def test_a_bad_table_is_rejected_with_its_reason(
    rig: Rig, change: dict[str, Any], reason: str | None
) -> None:
    if reason is None:  # stale: apply version 3, then offer version 3 again with other content
        rig.agent.on_config(rig.clock.ms, rig.signed(version=3))
        change, reason = {"version": 3, "reason": "again"}, "stale_version"
    rig.agent.on_config(rig.clock.ms, rig.signed(**change))
    answer = _answer(rig)
    assert (answer["status"], answer["reason"]) == ("rejected", reason)
    assert rig.agent.table.version == (3 if reason == "stale_version" else 0)


def test_a_table_with_a_bad_signature_is_rejected(rig: Rig) -> None:
    tampered = json.loads(rig.signed(version=4))
    tampered["modes"]["LIFT"]["i_max_ua"] = 450
    rig.agent.on_config(rig.clock.ms, json.dumps(tampered).encode())
    answer = _answer(rig)
    assert (answer["version"], answer["status"], answer["reason"]) == (
        4,
        "rejected",
        "bad_signature",
    )
    other = Ed25519PrivateKey.generate()
    forged = copy.deepcopy(tampered)
    forged["sig"] = base64.b64encode(
        other.sign(canonical_json({k: v for k, v in forged.items() if k != "sig"}))
    ).decode()
    rig.agent.on_config(rig.clock.ms, json.dumps(forged).encode())
    assert _answer(rig)["reason"] == "bad_signature"
    assert rig.agent.table == factory_table() or rig.agent.table.version == 0


def test_a_table_arriving_mid_session_waits_for_the_session_to_end(rig: Rig) -> None:
    rig.start(seconds=30)
    rig.run(5_000)
    rig.agent.on_config(rig.clock.ms, rig.signed(version=6, locked_modes=["INFUSE"]))
    assert rig.agent.table.version == 0
    assert all("config" not in s for s in rig.states()[1:])
    rig.run(30_000)
    assert rig.agent.table.version == 6
    [end] = rig.events("session_end")
    answered = [p for _, p in rig.messages() if "config" in p]
    assert answered
    assert answered[-1]["seq"] > end["seq"]


def test_a_waiting_table_redelivered_is_neither_rejected_nor_lost_in_a_crash(rig: Rig) -> None:
    raw = rig.signed(version=7)
    rig.start(seconds=60)
    rig.run(5_000)
    rig.agent.on_config(rig.clock.ms, raw)
    rig.agent.on_config(rig.clock.ms, raw)  # a reconnect mid-session: the retained table again
    assert all("config" not in s for s in rig.states())
    rig.hardware.stop_output()
    rig.agent = rig.new_agent()  # crash before the session ended
    rig.agent.boot(rig.clock.ms)
    rig.agent.on_config(rig.clock.ms, raw)  # delivered again after the restart
    assert rig.agent.table.version == 7
    answers = [s["config"] for s in rig.states() if "config" in s]
    assert [(a["version"], a["status"]) for a in answers] == [(7, "applied")]


def _answers(rig: Rig) -> list[tuple[int, str, str | None]]:
    return [
        (s["config"]["version"], s["config"]["status"], s["config"]["reason"])
        for s in rig.states()
        if "config" in s
    ]


@pytest.mark.parametrize("step", ["table", "config_seen", "config_answer", "outbox"])
def test_power_lost_while_applying_a_table_leaves_it_applied_and_answered_exactly_once(
    rig: Rig, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    raw = rig.signed(version=5)
    lose_power_at(monkeypatch, rig.store, step)
    with pytest.raises(PowerLoss):
        rig.agent.on_config(rig.clock.ms, raw)

    rig.restart()
    rig.agent.on_config(rig.clock.ms, raw)  # the broker delivers the retained table again
    rig.agent.on_config(rig.clock.ms, raw)  # and again after the next reconnect

    assert rig.agent.table.version == 5
    assert _answers(rig) == [(5, "applied", None)]
    table = rig.store.get("table")
    answer = rig.store.get("config_answer")
    assert isinstance(table, dict)
    assert isinstance(answer, dict)
    assert (table["version"], answer["version"]) == (5, 5)


@pytest.mark.parametrize("step", ["config_answer", "outbox", "config_seen"])
def test_power_lost_while_rejecting_a_table_leaves_it_rejected_exactly_once(
    rig: Rig, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    tampered = json.loads(rig.signed(version=4))
    tampered["modes"]["LIFT"]["i_max_ua"] = 450
    raw = json.dumps(tampered).encode()
    lose_power_at(monkeypatch, rig.store, step)
    with pytest.raises(PowerLoss):
        rig.agent.on_config(rig.clock.ms, raw)

    rig.restart()
    rig.agent.on_config(rig.clock.ms, raw)
    rig.agent.on_config(rig.clock.ms, raw)

    assert rig.agent.table.version == 0
    assert _answers(rig) == [(4, "rejected", "bad_signature")]


def test_the_retained_table_redelivered_on_reconnect_is_not_answered_twice(rig: Rig) -> None:
    raw = rig.signed(version=2)
    rig.agent.on_config(rig.clock.ms, raw)
    rig.agent.on_config(rig.clock.ms, raw)
    assert len([s for s in rig.states() if "config" in s]) == 1


def test_the_factory_tables_are_the_ones_the_protocol_vectors_pin() -> None:
    vectors = Path(__file__).resolve().parents[2] / "protocol" / "vectors" / "config.json"
    cases = json.loads(vectors.read_text("utf-8"))["valid"]
    [defaults] = [c for c in cases if c["name"] == "default_tables_all_modes"]
    assert factory_table().payload["modes"] == defaults["payload"]["modes"]
