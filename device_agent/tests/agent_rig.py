"""An agent on the physical simulator with a fake clock, for the agent's and the simulation's
tests: no broker, no cloud, the outbox read back as what the device would have sent."""

import base64
import json
import random
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from device_agent.agent import Agent, Identity
from device_agent.modes import DEFAULT_MODES, spec_payload
from device_agent.protocol import canonical_json, key_id, validate_outgoing
from device_agent.simulator import SimulatedHardware
from device_agent.store import DeviceStore, OutboxLimits, open_database

T0 = 1_763_805_600_000
HOUR_MS = 3_600_000

# The rig's store syncs at checkpoints only (synchronous=NORMAL), as the fleet simulator's
# does: its restarts are process crashes, which that survives, and no test here cuts the power
# (test_agent_store checks a device's own store syncs every commit). A sync per commit made
# the tests that run a device for 20 simulated minutes seconds slower each.
DURABLE = False


class Clock:
    """The device's clock, in epoch milliseconds, moved only by the test."""

    def __init__(self) -> None:
        self.ms = T0

    def __call__(self) -> int:
        return self.ms

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
        self.also_trusted: list[bytes] = []  # further keys the device trusts (a rotation)
        self.path = path
        self.limits = limits or OutboxLimits()
        self.hardware = SimulatedHardware(
            clock=self.clock.seconds, rng=random.Random(7), **hardware
        )
        self.conn = open_database(path, durable=DURABLE)
        self.store = DeviceStore(self.conn, "dev-0001", self.limits)
        self.agent = self.new_agent()
        self.agent.boot(self.clock.ms)

    def restart(self) -> None:
        """Power back on after a crash: a new agent on a new connection to the same file."""
        self.conn.close()
        self.conn = open_database(self.path, durable=DURABLE)
        self.store = DeviceStore(self.conn, "dev-0001", self.limits)
        self.agent = self.new_agent()
        self.agent.boot(self.clock.ms)

    def new_agent(self, *, enforce_limits: bool = True) -> Agent:
        public = self.key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return Agent(
            Identity("dev-0001", fw="1.4.2", hw="B"),
            self.hardware,
            self.store,
            public_keys=[public, *self.also_trusted],
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

    def signed(self, *, key: Ed25519PrivateKey | None = None, **changes: Any) -> bytes:
        """A table signed (by ``key``, else the rig's) for this device, as the backend signs
        one; ``changes`` replace fields, and a change to None drops the field."""
        signer = key or self.key
        public = signer.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        table: dict[str, Any] = {
            "v": 1,
            "version": 2,
            "issued_at": self.clock.ms,
            "expires_at": None,
            "reason": "test",
            "locked_modes": [],
            "modes": {mode: spec_payload(spec) for mode, spec in DEFAULT_MODES.items()},
            "device": "dev-0001",
            "brand": "acme",
            "kid": key_id(public),
        }
        table.update(changes)
        table = {
            name: value
            for name, value in table.items()
            if value is not None or name in ("expires_at", "reason")
        }
        signature = signer.sign(canonical_json(table))
        return json.dumps({**table, "sig": base64.b64encode(signature).decode()}).encode()


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
