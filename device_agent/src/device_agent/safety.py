"""The agent's local safety: the checks before a session starts and on every sample.

The output MCU cuts faults in hardware within milliseconds; these checks are the application
processor's slower, second line, so a fault still shows in the samples the rules engine reads.
They need no cloud: the mode table in force and the local session history are enough.
"""

from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from device_agent.hardware import Reading
from device_agent.modes import ModeSpec, ModeTable
from device_agent.session import MAX_LEVEL, Session
from device_agent.store import DeviceStore

HARD_CURRENT_LIMIT_UA: Final = 1000.0
OVERCURRENT_TRIP_MS: Final = 300  # above i_max_ua this long: fault, output off
BATTERY_CUTOFF_C: Final = 55.0  # below the Li-ion abuse range; charging window ends at 45
CONTACT_LOST_OHM: Final = 200_000.0
CONTACT_PAUSE_MS: Final = 3000  # contact lost this long: output paused until it is back
CONTACT_GIVE_UP_MS: Final = 30_000  # paused this long: the session ends with no_contact
LOW_BATTERY_STOP_PCT: Final = 5  # a running session ends with low_battery below this
COOLDOWN_AFTER_S: Final = 300  # cooldown_s applies after a session that lasted over 5 min
DAY_MS: Final = 24 * 3600 * 1000


class Refusal(StrEnum):
    """Why the agent would not start a session (shown to the user by the device's UI)."""

    BUSY = "session_running"
    UNKNOWN_MODE = "unknown_mode"
    LOCKED = "mode_locked"
    BAD_LEVEL = "bad_level"
    CHARGING = "charging"
    LOW_BATTERY = "low_battery"
    DAILY_LIMIT = "daily_limit"
    WEEKLY_LIMIT = "weekly_limit"
    COOLDOWN = "cooldown"


class SessionRefused(Exception):
    """A session could not start; ``reason`` says why."""

    def __init__(self, reason: Refusal, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Fault:
    """A sample the output must stop on, reported as a ``fault`` event."""

    code: str
    detail: dict[str, object]


def usable_spec(table: ModeTable, mode: str, level: int) -> ModeSpec:
    """The spec ``mode`` runs with at ``level``, or ``SessionRefused`` (no reading needed)."""
    if mode not in table.modes:
        raise SessionRefused(Refusal.UNKNOWN_MODE, f"the mode table has no {mode}")
    spec = table.usable(mode)
    if spec is None:
        raise SessionRefused(Refusal.LOCKED, f"{mode} is locked by mode table {table.version}")
    if not 1 <= level <= MAX_LEVEL:
        raise SessionRefused(Refusal.BAD_LEVEL, f"level must be 1..{MAX_LEVEL}")
    return spec


def check_start(
    store: DeviceStore,
    now_ms: int,
    mode: str,
    spec: ModeSpec,
    reading: Reading,
    *,
    enforce_limits: bool,
) -> None:
    """``SessionRefused`` if the device may not start ``mode`` now: charging, or, with
    ``enforce_limits``, the battery, the counts a day and a week, or the cooldown."""
    if reading.charging:
        raise SessionRefused(Refusal.CHARGING, "no output while charging")
    if not enforce_limits:
        return
    if reading.batt_pct < spec.min_batt_pct:
        raise SessionRefused(
            Refusal.LOW_BATTERY,
            f"battery {reading.batt_pct} % is below {spec.min_batt_pct} % for {mode}",
        )
    day = store.sessions_since(now_ms - DAY_MS)
    if len(day) >= spec.max_sessions_24h:
        raise SessionRefused(
            Refusal.DAILY_LIMIT,
            f"{len(day)} sessions in 24 h; {mode} allows {spec.max_sessions_24h}",
        )
    week = store.sessions_since(now_ms - 7 * DAY_MS)
    if len(week) >= spec.max_sessions_7d:
        raise SessionRefused(
            Refusal.WEEKLY_LIMIT,
            f"{len(week)} sessions in 7 days; {mode} allows {spec.max_sessions_7d}",
        )
    last = store.last_session()
    if last is not None and last.ended_ms is not None and spec.cooldown_s > 0:
        lasted_s = (last.ended_ms - last.started_ms) / 1000
        ready_ms = last.ended_ms + 1000 * spec.cooldown_s
        if lasted_s > COOLDOWN_AFTER_S and now_ms < ready_ms:
            raise SessionRefused(
                Refusal.COOLDOWN,
                f"cooling down for {(ready_ms - now_ms + 999) // 1000} s more",
            )


def check_sample(
    session: Session, now_ms: int, reading: Reading, *, enforce_limits: bool
) -> Fault | str | None:
    """What one sample of a running session calls for, most severe first: a ``Fault``, the
    reason to end the session, or None. Times how long the current has been over the limit."""
    spec = session.spec
    if reading.output_on and reading.charging:
        return Fault("output_while_charging", {"batt_pct": reading.batt_pct})
    if reading.i_ua > HARD_CURRENT_LIMIT_UA:
        return Fault("overcurrent", {"i_ua": reading.i_ua})
    if reading.i_ua > spec.i_max_ua:
        session.over_limit_ms = session.over_limit_ms or now_ms
        if now_ms - session.over_limit_ms >= OVERCURRENT_TRIP_MS:
            return Fault("overcurrent", {"i_ua": reading.i_ua, "i_max_ua": spec.i_max_ua})
    else:
        session.over_limit_ms = None
    if reading.t_elec_c > spec.t_elec_max_c:
        return Fault(
            "overtemp_electrode", {"t_elec_c": reading.t_elec_c, "limit_c": spec.t_elec_max_c}
        )
    if reading.t_batt_c > BATTERY_CUTOFF_C:
        return Fault(
            "overtemp_battery", {"t_batt_c": reading.t_batt_c, "limit_c": BATTERY_CUTOFF_C}
        )
    elapsed_ms = now_ms - session.started_ms
    if enforce_limits and elapsed_ms >= 1000 * spec.session_cap_s:
        return "auto_shutoff"
    if elapsed_ms >= session.planned_ms:
        return "completed"
    if enforce_limits and reading.batt_pct < LOW_BATTERY_STOP_PCT:
        return "low_battery"
    return None
