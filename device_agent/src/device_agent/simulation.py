"""A simulated device: the agent on simulated hardware, a simulated user, and the misbehaviours
support teams and tests switch on to reproduce each rule of the safety catalogue.

Used by ``galvani-agent run --simulate`` (one device) and ``galvani-fleet`` (thousands in one
process); both drive :meth:`SimulatedDevice.tick` from one asyncio loop.
"""

import asyncio
import logging
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from device_agent.agent import SAMPLE_INTERVAL_MS, Agent, Identity, SessionRefused
from device_agent.link import BACKOFF_MAX_S, BrokerAddress, DeleteOn, Link
from device_agent.simulator import Scenario, SimulatedHardware
from device_agent.store import DeviceStore

log = logging.getLogger("galvani.agent.sim")

WEEK_MS: Final = 7 * 24 * 3600 * 1000
DRAIN_TIMEOUT_S: Final = 5.0
REBOOT_LOOP_INTERVAL_MS: Final = 150_000  # four watchdog resets in ten minutes
CHARGE_BELOW_PCT: Final = 30
UNPLUG_ABOVE_PCT: Final = 95


class Misbehaviour(StrEnum):
    """Agent-level scenarios (hardware ones are :class:`~device_agent.simulator.Scenario`)."""

    REBOOT_LOOP = "reboot-loop"  # a watchdog reset every 150 s
    REPORT_REDNESS = "report-redness"  # the user reports redness after each session
    REPORT_BURN = "report-burn"  # the user reports a burn after each session
    UNENFORCED_FIRMWARE = "unenforced-firmware"  # an old build without local limits
    IGNORE_CONFIG = "ignore-config"  # never answers a pushed mode table


SCENARIO_NAMES: Final = tuple(str(s) for s in Scenario) + tuple(str(m) for m in Misbehaviour)


def parse_scenarios(names: Iterable[str]) -> tuple[frozenset[Scenario], frozenset[Misbehaviour]]:
    """Split scenario names into hardware and agent ones; ``ValueError`` names an unknown one."""
    hardware: set[Scenario] = set()
    agent: set[Misbehaviour] = set()
    for name in names:
        if name in Scenario.__members__.values():
            hardware.add(Scenario(name))
        elif name in Misbehaviour.__members__.values():
            agent.add(Misbehaviour(name))
        else:
            raise ValueError(f"unknown scenario {name!r}; known: {', '.join(SCENARIO_NAMES)}")
    return frozenset(hardware), frozenset(agent)


@dataclass(frozen=True)
class Habits:
    """How one simulated person uses the device."""

    user_id: str | None
    sessions_per_week: float
    gel_forgotten: float  # probability a session starts with dry electrodes
    modes: tuple[str, ...] = ("LIFT", "LIFT", "LIFT", "TIGHTEN", "INFUSE")
    level: int = 5
    minutes: tuple[int, int] = (5, 10)


@dataclass(frozen=True)
class Plan:
    """The CLI's ``--session``: start it at once, then every ``every_s`` seconds (if set)."""

    mode: str
    level: int
    seconds: int
    every_s: float | None


class SimulatedDevice:
    """One simulated device: hardware, agent, link and the person using it."""

    def __init__(
        self,
        identity: Identity,
        store: DeviceStore,
        address: BrokerAddress,
        *,
        public_keys: bytes | Iterable[bytes],
        clock_ms: Callable[[], int],
        rng: random.Random,
        habits: Habits | None = None,
        plan: Plan | None = None,
        scenarios: Iterable[str] = (),
        backoff_max_s: float = BACKOFF_MAX_S,
        batt_pct: float | None = None,
        delete_on: DeleteOn = DeleteOn.STORED,
    ) -> None:
        hardware_scenarios, self.misbehaviours = parse_scenarios(scenarios)
        self.clock_ms = clock_ms
        self.rng = rng
        self.habits = habits
        self.plan = plan
        self.hardware = SimulatedHardware(
            clock=lambda: clock_ms() / 1000,
            rng=rng,
            scenarios=hardware_scenarios,
            batt_pct=batt_pct if batt_pct is not None else rng.uniform(50, 100),
        )
        self.agent = Agent(
            identity,
            self.hardware,
            store,
            public_keys=public_keys,
            enforce_limits=Misbehaviour.UNENFORCED_FIRMWARE not in self.misbehaviours,
        )
        self.link = Link(
            identity.device_id,
            address,
            store,
            self._on_config,
            loop=asyncio.get_running_loop(),
            rng=rng,
            backoff_max_s=backoff_max_s,
            delete_on=delete_on,
        )
        self.refusals = 0
        self._in_session = False
        self._next_use_ms: int | None = None
        self._next_reboot_ms: int | None = None

    @property
    def device_id(self) -> str:
        """The device's id."""
        return self.agent.identity.device_id

    def start(self) -> None:
        """Power on: boot the agent and connect."""
        now = self.clock_ms()
        self.agent.boot(now)
        if Misbehaviour.REBOOT_LOOP in self.misbehaviours:
            self._next_reboot_ms = now + REBOOT_LOOP_INTERVAL_MS
        if self.plan is not None:
            self._next_use_ms = now
        elif self.habits is not None:
            self._next_use_ms = now + self._gap_ms(first=True)
        self.link.start()

    def end_use(self) -> None:
        """Power-off, first half: end a running session and queue what it produced."""
        now = self.clock_ms()
        self.agent.stop_session(now)
        self.agent.tick(now + SAMPLE_INTERVAL_MS)
        self.link.pump()

    @property
    def drained(self) -> bool:
        """Nothing left in the outbox (stored, or in the legacy mode delivered), or no
        connection to deliver it on."""
        return not self.link.connected or self.agent.store.backlog()[0] == 0

    def tick(self) -> int:
        """Run whatever is due; returns the milliseconds until the next tick."""
        now = self.clock_ms()
        self._person(now)
        if self._next_reboot_ms is not None and now >= self._next_reboot_ms:
            self._next_reboot_ms = now + REBOOT_LOOP_INTERVAL_MS
            self.agent.reboot(now, "watchdog")
        self.agent.tick(now)
        self.link.pump()
        self.link.service()
        return self.agent.interval_ms

    def _on_config(self, raw: bytes) -> None:
        if Misbehaviour.IGNORE_CONFIG not in self.misbehaviours:
            self.agent.on_config(self.clock_ms(), raw)

    # -- the person ------------------------------------------------------------------------

    def _person(self, now: int) -> None:
        if self.agent.session is not None:
            self._in_session = True
            return
        if self._in_session:
            self._in_session = False
            self._after_session(now)
        reading = self.hardware.read()
        if reading.batt_pct < CHARGE_BELOW_PCT and not reading.charging:
            self.hardware.plug_charger()
        elif reading.batt_pct > UNPLUG_ABOVE_PCT and reading.charging:
            self.hardware.unplug_charger()
        if self._next_use_ms is not None and now >= self._next_use_ms:
            self._use(now)

    def _use(self, now: int) -> None:
        if self.plan is not None:
            mode, level, seconds = self.plan.mode, self.plan.level, self.plan.seconds
            user = None
            self._next_use_ms = (
                None if self.plan.every_s is None else now + int(1000 * self.plan.every_s)
            )
        else:
            assert self.habits is not None
            habits = self.habits
            mode = self.rng.choice(habits.modes)
            level = max(1, min(10, habits.level + self.rng.randint(-1, 1)))
            seconds = 60 * self.rng.randint(*habits.minutes)
            user = habits.user_id
            self._next_use_ms = now + self._gap_ms()
        gel = not (self.habits and self.rng.random() < self.habits.gel_forgotten)
        self.hardware.unplug_charger()
        self.hardware.place_on_skin(gel=gel)
        try:
            self.agent.start_session(now, mode, level, user=user, seconds=seconds)
        except SessionRefused as refused:
            self.refusals += 1
            log.info("%s: session refused: %s", self.device_id, refused)
            self.hardware.lift_off()

    def _after_session(self, now: int) -> None:
        self.hardware.lift_off()
        if Misbehaviour.REPORT_BURN in self.misbehaviours:
            self.agent.report_user(now, "burn", "stinging under the left electrode")
        elif Misbehaviour.REPORT_REDNESS in self.misbehaviours:
            self.agent.report_user(now, "redness", "red patches after the session")

    def _gap_ms(self, *, first: bool = False) -> int:
        assert self.habits is not None
        mean_ms = WEEK_MS / max(self.habits.sessions_per_week, 0.01)
        if first:
            return int(self.rng.uniform(0, mean_ms))
        return int(self.rng.expovariate(1 / mean_ms))


async def power_off(devices: Sequence[SimulatedDevice], timeout_s: float = DRAIN_TIMEOUT_S) -> None:
    """End sessions, let the outboxes drain for up to ``timeout_s``, then disconnect.

    Whatever is still undelivered stays in the outboxes for the next start.
    """
    for device in devices:
        device.end_use()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    waiting = list(devices)
    while waiting and loop.time() < deadline:
        await asyncio.sleep(0.1)
        waiting = [device for device in waiting if not device.drained]
    for device in devices:
        device.link.stop()
    await asyncio.sleep(0.5)  # the offline presences and the disconnects
