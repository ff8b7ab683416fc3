"""The agent's core on the physical simulator with a fake clock: no broker, no cloud.

Everything here runs with the cloud unreachable by construction (the core only writes its
outbox), which is the point of local enforcement.
"""

import base64
import copy
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from device_agent.agent import (
    CONTACT_GIVE_UP_MS,
    CONTACT_PAUSE_MS,
    HEARTBEAT_INTERVAL_MS,
    Agent,
    Identity,
    Refusal,
    SessionRefused,
)
from device_agent.modes import DEFAULT_MODES, factory_table, spec_payload
from device_agent.protocol import canonical_json, validate_outgoing
from device_agent.simulator import Scenario, SimulatedHardware
from device_agent.store import DeviceStore, OutboxLimits, open_database

T0 = 1_763_805_600_000
HOUR_MS = 3_600_000


class Clock:
    def __init__(self) -> None:
        self.ms = T0

    def seconds(self) -> float:
        return self.ms / 1000


class Rig:
    """An agent on simulated hardware, its store, and a fake clock that drives both."""

    def __init__(
        self,
        path: Path,
        key: Ed25519PrivateKey,
        limits: OutboxLimits | None = None,
        **hardware: Any,
    ) -> None:
        self.clock = Clock()
        self.key = key
        self.path = path
        self.limits = limits or OutboxLimits()
        self.hardware = SimulatedHardware(
            clock=self.clock.seconds, rng=random.Random(7), **hardware
        )
        self.conn = open_database(path)
        self.store = DeviceStore(self.conn, "dev-0001", self.limits)
        self.agent = self.new_agent()
        self.agent.boot(self.clock.ms)

    def restart(self) -> None:
        """Power back on after a crash: a new agent on a new connection to the same file."""
        self.conn.close()
        self.conn = open_database(self.path)
        self.store = DeviceStore(self.conn, "dev-0001", self.limits)
        self.agent = self.new_agent()
        self.agent.boot(self.clock.ms)

    def new_agent(self, *, enforce_limits: bool = True) -> Agent:
        public = self.key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return Agent(
            Identity("dev-0001", fw="1.4.2", hw="B"),
            self.hardware,
            self.store,
            public_key=public,
            enforce_limits=enforce_limits,
        )

    def run(self, ms: int) -> None:
        """Advance the clock, ticking as the runtime would (every 100 ms)."""
        end = self.clock.ms + ms
        while self.clock.ms < end:
            self.clock.ms += 100
            self.agent.tick(self.clock.ms)

    def start(self, mode: str = "LIFT", level: int = 5, seconds: int = 0, gel: bool = True) -> str:
        self.hardware.place_on_skin(gel=gel)
        return self.agent.start_session(self.clock.ms, mode, level, user="u-1", seconds=seconds)

    def messages(self) -> list[tuple[str, dict[str, Any]]]:
        out = []
        for message in self.store.pending(limit=1_000_000):
            payload = json.loads(message.payload)
            assert validate_outgoing(message.channel, payload) == []
            assert payload["seq"] == message.seq
            out.append((message.channel, payload))
        return out

    def events(self, event_type: str | None = None) -> list[dict[str, Any]]:
        return [
            p
            for channel, p in self.messages()
            if channel == "events" and (event_type is None or p["type"] == event_type)
        ]

    def samples(self) -> list[dict[str, Any]]:
        return [s for channel, p in self.messages() if channel == "telemetry" for s in p["samples"]]

    def states(self) -> list[dict[str, Any]]:
        return [p for channel, p in self.messages() if channel == "state"]

    def signed(self, **changes: Any) -> bytes:
        table: dict[str, Any] = {
            "v": 1,
            "version": 2,
            "issued_at": self.clock.ms,
            "expires_at": None,
            "reason": "test",
            "locked_modes": [],
            "modes": {mode: spec_payload(spec) for mode, spec in DEFAULT_MODES.items()},
        }
        table.update(changes)
        signature = self.key.sign(canonical_json(table))
        return json.dumps({**table, "sig": base64.b64encode(signature).decode()}).encode()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    rig = Rig(tmp_path / "agent.sqlite3", Ed25519PrivateKey.generate())
    yield rig
    rig.conn.close()


def test_boot_reports_the_reboot_and_the_state(rig: Rig) -> None:
    assert [p["type"] for p in rig.events()] == ["reboot"]
    assert rig.events()[0]["reason"] == "power_on"
    [state] = rig.states()
    assert (state["fw"], state["hw"]) == ("1.4.2", "B")


def test_session_sends_ten_samples_a_second_in_one_message_a_second(rig: Rig) -> None:
    session = rig.start(seconds=60)
    rig.run(10_000)
    batches = [p for channel, p in rig.messages() if channel == "telemetry"]
    assert len(batches) == 10
    assert all(len(p["samples"]) == 10 and p["session"] == session for p in batches)
    stamps = [s["ts"] for s in rig.samples()]
    assert stamps == list(range(T0 + 100, T0 + 10_001, 100))
    current = [s["i_ua"] for s in rig.samples()[10:]]
    assert all(abs(i - 300) < 30 for i in current), current  # level 5: LIFT's i_target_ua
    seqs = [p["seq"] for _, p in rig.messages()]
    assert seqs == sorted(set(seqs))


def test_idle_device_sends_one_heartbeat_sample_a_minute(rig: Rig) -> None:
    rig.run(5 * HEARTBEAT_INTERVAL_MS)
    samples = rig.samples()
    assert 5 <= len(samples) <= 6
    assert all(s["out"] is False and "mode" not in s for s in samples)


def test_session_is_cut_at_the_cap_without_the_cloud(rig: Rig) -> None:
    cap_s = DEFAULT_MODES["LIFT"].session_cap_s
    session = rig.start(seconds=cap_s + 600)  # the user asked for more than the cap
    rig.run(1000 * cap_s + 5_000)
    [end] = rig.events("session_end")
    assert end == {**end, "session": session, "reason": "auto_shutoff", "duration_s": cap_s}
    late = [s for s in rig.samples() if s["ts"] > T0 + 1000 * cap_s + 100 and s.get("out")]
    assert late == []
    assert rig.agent.session is None
    assert not rig.hardware.read().output_on


def test_a_locked_mode_cannot_start(rig: Rig) -> None:
    rig.agent.on_config(rig.clock.ms, rig.signed(locked_modes=["INFUSE"]))
    with pytest.raises(SessionRefused) as refused:
        rig.start("INFUSE")
    assert refused.value.reason is Refusal.LOCKED
    assert rig.events("session_start") == []
    assert not rig.hardware.read().output_on
    rig.start("LIFT")  # the others still run


def test_no_session_below_the_modes_battery_minimum(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "a.sqlite3", Ed25519PrivateKey.generate(), batt_pct=19.0)
    with pytest.raises(SessionRefused) as refused:
        rig.start()
    assert refused.value.reason is Refusal.LOW_BATTERY
    rig.conn.close()


def test_no_session_while_charging(rig: Rig) -> None:
    rig.hardware.plug_charger()
    with pytest.raises(SessionRefused) as refused:
        rig.start()
    assert refused.value.reason is Refusal.CHARGING


def test_charger_plugged_mid_session_stops_output_with_a_fault(rig: Rig) -> None:
    rig.start(seconds=300)
    rig.run(3_000)
    rig.hardware.plug_charger()
    rig.run(1_000)
    [fault] = rig.events("fault")
    assert fault["code"] == "output_while_charging"
    assert rig.events("session_end")[0]["reason"] == "fault"
    assert any(s.get("out") and s.get("charging") for s in rig.samples())  # what happened
    assert not rig.hardware.read().output_on


def test_third_session_in_24_hours_is_refused_then_allowed_a_day_later(rig: Rig) -> None:
    for _ in range(2):
        rig.start(seconds=60)
        rig.run(61_000)
        rig.hardware.lift_off()
        rig.run(10 * 60_000)
    with pytest.raises(SessionRefused) as refused:
        rig.start(seconds=60)
    assert refused.value.reason is Refusal.DAILY_LIMIT
    rig.run(24 * HOUR_MS)
    rig.start(seconds=60)


def test_cooldown_follows_a_session_over_five_minutes(rig: Rig) -> None:
    rig.start(seconds=360)
    rig.run(361_000)
    cooldown_s = DEFAULT_MODES["LIFT"].cooldown_s
    rig.run(1000 * cooldown_s - 60_000)
    with pytest.raises(SessionRefused) as refused:
        rig.start(seconds=60)
    assert refused.value.reason is Refusal.COOLDOWN
    rig.run(61_000)
    rig.start(seconds=60)


def test_lost_contact_pauses_output_and_regained_contact_resumes_it(rig: Rig) -> None:
    rig.start(seconds=300)
    rig.run(5_000)
    rig.hardware.lift_off()
    rig.run(CONTACT_PAUSE_MS + 1_000)
    assert not rig.hardware.read().output_on
    assert rig.agent.session is not None
    rig.hardware.place_on_skin(gel=True)
    rig.run(2_000)
    assert rig.hardware.read().output_on
    rig.hardware.lift_off()
    rig.run(CONTACT_PAUSE_MS + CONTACT_GIVE_UP_MS + 1_000)
    [end] = rig.events("session_end")
    assert end["reason"] == "no_contact"


def test_overcurrent_trips_output_after_it_shows_in_the_samples(tmp_path: Path) -> None:
    rig = Rig(
        tmp_path / "a.sqlite3",
        Ed25519PrivateKey.generate(),
        scenarios=[Scenario.OVERCURRENT_SPIKE],
    )
    rig.start(seconds=300)
    rig.run(60_000)
    [fault] = rig.events("fault")
    assert fault["code"] == "overcurrent"
    assert rig.events("session_end")[0]["reason"] == "fault"
    i_max = DEFAULT_MODES["LIFT"].i_max_ua
    assert any(s["i_ua"] > 1.2 * i_max for s in rig.samples() if s.get("out"))
    assert not rig.hardware.read().output_on
    rig.conn.close()


def test_boot_after_a_crash_closes_the_cut_session(rig: Rig) -> None:
    session = rig.start(seconds=300)
    rig.run(30_000)
    rig.hardware.stop_output()
    rig.agent = rig.new_agent()  # the process died; a new one starts on the same store
    rig.agent.boot(rig.clock.ms + 60_000)
    ends = rig.events("session_end")
    assert [(e["session"], e["reason"]) for e in ends] == [(session, "fault")]
    assert 29 <= ends[0]["duration_s"] <= 30
    assert rig.store.open_session() is None


class PowerLoss(Exception):
    """The power failed at this write: it and everything after it never happened."""


def lose_power_at(monkeypatch: pytest.MonkeyPatch, store: DeviceStore, step: str) -> None:
    """Fail ``store``'s write ``step`` (a state key, ``outbox`` for the state message, or
    ``session_end`` for recording a session's end) as a power loss would."""
    put, enqueue, record_end = store.put, store.enqueue, store.record_session_end

    def failing_put(key: str, value: object) -> None:
        if key == step:
            raise PowerLoss(step)
        put(key, value)

    def failing_enqueue(channel: str, build: Any, *, now_ms: int) -> int:
        if step == "outbox" and channel == "state":
            raise PowerLoss(step)
        return enqueue(channel, build, now_ms=now_ms)

    def failing_record_end(session_id: str, ended_ms: int, output_s: float) -> None:
        if step == "session_end":
            raise PowerLoss(step)
        record_end(session_id, ended_ms, output_s)

    monkeypatch.setattr(store, "put", failing_put)
    monkeypatch.setattr(store, "enqueue", failing_enqueue)
    monkeypatch.setattr(store, "record_session_end", failing_record_end)


def test_power_lost_as_a_session_ends_does_not_end_it_twice(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    session = rig.start(seconds=10)
    rig.run(5_000)
    lose_power_at(monkeypatch, rig.store, "session_end")
    with pytest.raises(PowerLoss):
        rig.run(10_000)
    rig.hardware.stop_output()

    rig.restart()

    assert [e["session"] for e in rig.events("session_end")] == [session]
    assert rig.store.open_session() is None


def test_seq_survives_a_restart(rig: Rig) -> None:
    rig.run(3 * HEARTBEAT_INTERVAL_MS)
    before = rig.store.last_seq()
    rig.agent = rig.new_agent()
    rig.agent.boot(rig.clock.ms)
    assert [p["seq"] for _, p in rig.messages()][-2:] == [before + 1, before + 2]


# -- mode tables -------------------------------------------------------------------------


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


def test_unenforced_firmware_runs_past_the_cap(rig: Rig) -> None:
    rig.agent = rig.new_agent(enforce_limits=False)
    rig.start(seconds=1300)
    rig.run(1_301_000)
    [end] = rig.events("session_end")
    assert end["reason"] == "completed"
    assert end["duration_s"] == 1300


def test_an_outbox_too_small_for_the_outage_keeps_events_and_reports_the_drop(
    tmp_path: Path,
) -> None:
    rig = Rig(tmp_path / "a.sqlite3", Ed25519PrivateKey.generate(), OutboxLimits(max_bytes=20_000))
    session = rig.start(seconds=60)
    rig.run(61_000 + HEARTBEAT_INTERVAL_MS)
    assert [e["type"] for e in rig.events()] == ["reboot", "session_start", "session_end"]
    assert rig.events("session_start")[0]["session"] == session
    dropped = rig.states()[-1]["dropped"]
    assert dropped["telemetry"] == dropped["messages"] > 0
    assert dropped["events"] == 0
    assert dropped["first_seq"] >= rig.events("session_start")[0]["seq"] + 1


def test_the_factory_tables_are_the_ones_the_protocol_vectors_pin() -> None:
    vectors = Path(__file__).resolve().parents[2] / "protocol" / "vectors" / "config.json"
    cases = json.loads(vectors.read_text("utf-8"))["valid"]
    [defaults] = [c for c in cases if c["name"] == "default_tables_all_modes"]
    assert factory_table().payload["modes"] == defaults["payload"]["modes"]
