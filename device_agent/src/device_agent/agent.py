"""The agent's core: sessions, local safety, telemetry, events and mode tables.

The core does no I/O of its own beyond the :class:`~device_agent.hardware.Hardware` it is
given and its :class:`~device_agent.store.DeviceStore`: every message it produces is written
to the store's outbox (which allocates ``seq``) and the MQTT link publishes from there. So
everything here works with the cloud unreachable, and a test drives it with a fake clock.

Time: ``tick(now_ms)`` is called about every :data:`SAMPLE_INTERVAL_MS` while output runs and
every :data:`IDLE_POLL_MS` otherwise; ``now_ms`` is the device clock in epoch milliseconds.
"""

import hashlib
import json
import logging
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final

from device_agent.hardware import Hardware, Output, Reading
from device_agent.modes import (
    ModeSpec,
    ModeTable,
    check_table,
    factory_table,
    table_from_payload,
    table_sha256,
)
from device_agent.protocol import (
    PROTOCOL_VERSION,
    Channel,
    ConfigRejected,
    validate_outgoing,
)
from device_agent.store import DeviceStore

log = logging.getLogger("galvani.agent")

SAMPLE_INTERVAL_MS: Final = 100  # 10 Hz while output runs
TELEMETRY_BATCH_MS: Final = 1000  # one telemetry message a second in a session
HEARTBEAT_INTERVAL_MS: Final = 60_000  # one sample a minute while idle
IDLE_POLL_MS: Final = 1000  # charger and stuck-output checks while idle
# Levels scale the mode's i_target_ua: level 5 delivers it, each level is a fifth of it, and
# no level goes above i_max_ua.
REFERENCE_LEVEL: Final = 5
MAX_LEVEL: Final = 10
# Local protection. The output MCU cuts within milliseconds in hardware; these are the
# application processor's slower, second line, so a fault still shows in the samples.
HARD_CURRENT_LIMIT_UA: Final = 1000.0
OVERCURRENT_TRIP_MS: Final = 300  # above i_max_ua this long: fault, output off
BATTERY_CUTOFF_C: Final = 55.0  # below the Li-ion abuse range; charging window ends at 45
CONTACT_LOST_OHM: Final = 200_000.0
CONTACT_PAUSE_MS: Final = 3000  # contact lost this long: output paused until it is back
CONTACT_GIVE_UP_MS: Final = 30_000  # paused this long: the session ends with no_contact
LOW_BATTERY_STOP_PCT: Final = 5  # a running session ends with low_battery below this
COOLDOWN_AFTER_S: Final = 300  # cooldown_s applies after a session that lasted over 5 min
HISTORY_KEEP_MS: Final = 8 * 24 * 3600 * 1000  # session history older than 7 days + margin


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
class Identity:
    """What the device reports about itself."""

    device_id: str
    fw: str = "1.0.0"
    hw: str = "A"


@dataclass
class _Session:
    id: str
    mode: str
    level: int
    spec: ModeSpec
    output: Output
    started_ms: int
    planned_ms: int
    user: str | None
    output_ms: int = 0
    last_sample_ms: int = 0
    stopping: str | None = None  # the end reason once output was asked to stop
    contact_lost_ms: int | None = None
    paused_ms: int | None = None
    over_limit_ms: int | None = None
    samples: list[dict[str, object]] = field(default_factory=list)
    batch_started_ms: int = 0


class Agent:
    """One device's agent. Not thread-safe: one caller drives it."""

    def __init__(
        self,
        identity: Identity,
        hardware: Hardware,
        store: DeviceStore,
        *,
        public_key: bytes,
        enforce_limits: bool = True,
        session_ids: Callable[[], str] = lambda: f"s-{secrets.token_hex(6)}",
    ) -> None:
        self.identity = identity
        self.hardware = hardware
        self.store = store
        self.public_key = public_key
        # False models a firmware build without local limits (cap, battery, cooldown, counts),
        # so the cloud rules that only such a device can trigger are reproducible on demand.
        self.enforce_limits = enforce_limits
        self._session_ids = session_ids
        stored = store.get("table")
        self.table: ModeTable = (
            table_from_payload(stored) if isinstance(stored, dict) else factory_table()
        )
        self.pending_table: ModeTable | None = None
        self._pending_fingerprint: str | None = None
        self.session: _Session | None = None
        self._charging: bool | None = None
        self._next_heartbeat_ms = 0
        self._next_poll_ms = 0
        self._reported_drops = 0

    # -- lifecycle -----------------------------------------------------------------------

    def boot(self, now_ms: int, reason: str = "power_on") -> None:
        """Start up: close a session a crash cut short, report the reboot and the state."""
        cut = self.store.open_session()
        if cut is not None:
            progress = self.store.get("progress")
            last_ms = cut.started_ms
            output_s = 0.0
            if isinstance(progress, dict) and progress.get("session") == cut.session_id:
                last_ms = int(progress.get("ms", last_ms))
                output_s = float(progress.get("output_s", 0.0))
            duration_s = max(0, (last_ms - cut.started_ms) // 1000)
            # The end queued and recorded together: apart, a crash between them would end the
            # same session again at the next boot.
            with self.store.transaction():
                self._event(
                    now_ms,
                    "session_end",
                    session=cut.session_id,
                    duration_s=duration_s,
                    reason="fault",
                )
                self.store.record_session_end(cut.session_id, last_ms, output_s)
        self._event(now_ms, "reboot", reason=reason)
        self.report_state(now_ms)
        self._next_heartbeat_ms = now_ms
        self._next_poll_ms = now_ms

    def reboot(self, now_ms: int, reason: str) -> None:
        """A simulated watchdog or panic reset: output off, in-memory state lost."""
        self.hardware.stop_output()
        if self.session is not None:
            self._record_progress(self.session, now_ms)
        self.session = None
        self.pending_table = None
        self._pending_fingerprint = None
        self._charging = None
        self.boot(now_ms, reason)

    # -- sessions ------------------------------------------------------------------------

    def start_session(
        self, now_ms: int, mode: str, level: int, *, user: str | None = None, seconds: int = 0
    ) -> str:
        """Start output in ``mode`` at ``level``; the session id, or ``SessionRefused``.

        ``seconds`` is how long the user asked for (0: the mode's default); the mode's
        ``session_cap_s`` cuts it regardless.
        """
        if self.session is not None:
            raise SessionRefused(Refusal.BUSY, f"session {self.session.id} is running")
        if mode not in self.table.modes:
            raise SessionRefused(Refusal.UNKNOWN_MODE, f"the mode table has no {mode}")
        spec = self.table.usable(mode)
        if spec is None:
            raise SessionRefused(
                Refusal.LOCKED, f"{mode} is locked by mode table {self.table.version}"
            )
        if not 1 <= level <= MAX_LEVEL:
            raise SessionRefused(Refusal.BAD_LEVEL, f"level must be 1..{MAX_LEVEL}")
        reading = self.hardware.read()
        if reading.charging:
            raise SessionRefused(Refusal.CHARGING, "no output while charging")
        if self.enforce_limits:
            self._check_limits(now_ms, mode, spec, reading)
        session = _Session(
            id=self._session_ids(),
            mode=mode,
            level=level,
            spec=spec,
            output=_output(mode, level, spec),
            started_ms=now_ms,
            planned_ms=1000 * (seconds or spec.session_default_s),
            user=user,
            last_sample_ms=now_ms,
            batch_started_ms=now_ms,
        )
        self._event(now_ms, "session_start", session=session.id, mode=mode, level=level, user=user)
        self.store.record_session_start(session.id, mode, now_ms)
        self.session = session
        self.hardware.start_output(session.output)
        return session.id

    def stop_session(self, now_ms: int) -> None:
        """The user pressed stop."""
        if self.session is not None and self.session.stopping is None:
            self._stop(self.session, "user_stopped")

    def _check_limits(self, now_ms: int, mode: str, spec: ModeSpec, reading: Reading) -> None:
        if reading.batt_pct < spec.min_batt_pct:
            raise SessionRefused(
                Refusal.LOW_BATTERY,
                f"battery {reading.batt_pct} % is below {spec.min_batt_pct} % for {mode}",
            )
        day = self.store.sessions_since(now_ms - 24 * 3600 * 1000)
        if len(day) >= spec.max_sessions_24h:
            raise SessionRefused(
                Refusal.DAILY_LIMIT,
                f"{len(day)} sessions in 24 h; {mode} allows {spec.max_sessions_24h}",
            )
        week = self.store.sessions_since(now_ms - 7 * 24 * 3600 * 1000)
        if len(week) >= spec.max_sessions_7d:
            raise SessionRefused(
                Refusal.WEEKLY_LIMIT,
                f"{len(week)} sessions in 7 days; {mode} allows {spec.max_sessions_7d}",
            )
        last = self.store.last_session()
        if last is not None and last.ended_ms is not None and spec.cooldown_s > 0:
            lasted_s = (last.ended_ms - last.started_ms) / 1000
            ready_ms = last.ended_ms + 1000 * spec.cooldown_s
            if lasted_s > COOLDOWN_AFTER_S and now_ms < ready_ms:
                raise SessionRefused(
                    Refusal.COOLDOWN,
                    f"cooling down for {(ready_ms - now_ms + 999) // 1000} s more",
                )

    # -- the clock -----------------------------------------------------------------------

    def tick(self, now_ms: int) -> None:
        """Sample, enforce and publish whatever is due at ``now_ms``."""
        session = self.session
        if session is not None:
            while now_ms - session.last_sample_ms >= SAMPLE_INTERVAL_MS:
                # A stalled caller catches up with one sample, not a burst of stale ones.
                if now_ms - session.last_sample_ms >= 2 * TELEMETRY_BATCH_MS:
                    session.last_sample_ms = now_ms - SAMPLE_INTERVAL_MS
                session.last_sample_ms += SAMPLE_INTERVAL_MS
                self._session_sample(session, session.last_sample_ms)
                if self.session is None:
                    break
            return
        if now_ms >= self._next_poll_ms:
            self._next_poll_ms = now_ms + IDLE_POLL_MS
            self._idle_poll(now_ms)

    @property
    def interval_ms(self) -> int:
        """How soon the agent wants its next tick."""
        return SAMPLE_INTERVAL_MS if self.session is not None else IDLE_POLL_MS

    def _session_sample(self, session: _Session, now_ms: int) -> None:
        reading = self.hardware.read()
        session.samples.append(_sample(now_ms, session, reading))
        if reading.output_on:
            session.output_ms += SAMPLE_INTERVAL_MS
        if session.stopping is not None:
            if reading.output_on:
                self.hardware.stop_output()  # a stuck relay: keep asking, keep reporting
            else:
                self._end(session, now_ms, session.stopping)
                return
        else:
            self._protect(session, now_ms, reading)
        if self.session is not None and now_ms - session.batch_started_ms >= TELEMETRY_BATCH_MS:
            self._flush(session, now_ms)

    def _protect(self, session: _Session, now_ms: int, reading: Reading) -> None:
        """The local safety checks on one sample, most severe first."""
        spec = session.spec
        if reading.output_on and reading.charging:
            self._fault(session, now_ms, "output_while_charging", {"batt_pct": reading.batt_pct})
            return
        if reading.i_ua > HARD_CURRENT_LIMIT_UA:
            self._fault(session, now_ms, "overcurrent", {"i_ua": reading.i_ua})
            return
        if reading.i_ua > spec.i_max_ua:
            session.over_limit_ms = session.over_limit_ms or now_ms
            if now_ms - session.over_limit_ms >= OVERCURRENT_TRIP_MS:
                detail = {"i_ua": reading.i_ua, "i_max_ua": spec.i_max_ua}
                self._fault(session, now_ms, "overcurrent", detail)
                return
        else:
            session.over_limit_ms = None
        if reading.t_elec_c > spec.t_elec_max_c:
            detail = {"t_elec_c": reading.t_elec_c, "limit_c": spec.t_elec_max_c}
            self._fault(session, now_ms, "overtemp_electrode", detail)
            return
        if reading.t_batt_c > BATTERY_CUTOFF_C:
            detail = {"t_batt_c": reading.t_batt_c, "limit_c": BATTERY_CUTOFF_C}
            self._fault(session, now_ms, "overtemp_battery", detail)
            return
        elapsed_ms = now_ms - session.started_ms
        if self.enforce_limits and elapsed_ms >= 1000 * spec.session_cap_s:
            self._stop(session, "auto_shutoff")
            return
        if elapsed_ms >= session.planned_ms:
            self._stop(session, "completed")
            return
        if self.enforce_limits and reading.batt_pct < LOW_BATTERY_STOP_PCT:
            self._stop(session, "low_battery")
            return
        self._watch_contact(session, now_ms, reading)

    def _watch_contact(self, session: _Session, now_ms: int, reading: Reading) -> None:
        if reading.z_ohm > CONTACT_LOST_OHM:
            session.contact_lost_ms = session.contact_lost_ms or now_ms
            if session.paused_ms is None and now_ms - session.contact_lost_ms >= CONTACT_PAUSE_MS:
                session.paused_ms = now_ms
                self.hardware.stop_output()
            elif session.paused_ms is not None and now_ms - session.paused_ms >= CONTACT_GIVE_UP_MS:
                self._stop(session, "no_contact")
            return
        session.contact_lost_ms = None
        if session.paused_ms is not None:
            session.paused_ms = None
            self.hardware.start_output(session.output)

    def _fault(
        self, session: _Session, now_ms: int, code: str, detail: Mapping[str, object]
    ) -> None:
        log.warning("%s: fault %s %s", self.identity.device_id, code, detail)
        self._flush(session, now_ms)
        self._event(now_ms, "fault", code=code, detail={"session": session.id, **detail})
        self._stop(session, "fault")

    def _stop(self, session: _Session, reason: str) -> None:
        session.stopping = reason
        self.hardware.stop_output()

    def _end(self, session: _Session, now_ms: int, reason: str) -> None:
        self._flush(session, now_ms)
        duration_s = (now_ms - session.started_ms) // 1000
        with self.store.transaction():  # as in boot: a session ends once
            self._event(
                now_ms, "session_end", session=session.id, duration_s=duration_s, reason=reason
            )
            self.store.record_session_end(session.id, now_ms, session.output_ms / 1000)
        self.store.prune_sessions(now_ms - HISTORY_KEEP_MS)
        self.session = None
        self._next_heartbeat_ms = now_ms + HEARTBEAT_INTERVAL_MS
        self._next_poll_ms = now_ms + IDLE_POLL_MS
        if self.pending_table is not None and self._pending_fingerprint is not None:
            self._apply(self.pending_table, self._pending_fingerprint, now_ms)

    def _flush(self, session: _Session, now_ms: int) -> None:
        if session.samples:
            self._publish(
                now_ms,
                Channel.TELEMETRY,
                {"session": session.id, "samples": session.samples},
            )
            session.samples = []
            self._record_progress(session, now_ms)
        session.batch_started_ms = now_ms

    def _record_progress(self, session: _Session, now_ms: int) -> None:
        progress = {"session": session.id, "ms": now_ms, "output_s": session.output_ms / 1000}
        self.store.put("progress", progress)

    def _idle_poll(self, now_ms: int) -> None:
        reading = self.hardware.read()
        if self._charging is not None and reading.charging != self._charging:
            self._event(now_ms, "charging", on=reading.charging)
        self._charging = reading.charging
        if reading.output_on:
            # Output with no session (a relay stuck across a reboot): keep cutting it and
            # report every poll, so the cloud sees what is flowing.
            self.hardware.stop_output()
        heartbeat = now_ms >= self._next_heartbeat_ms
        if heartbeat and self.store.dropped().messages != self._reported_drops:
            self.report_state(now_ms)  # the outbox had to drop something: say what
        if reading.output_on or heartbeat:
            self._next_heartbeat_ms = now_ms + HEARTBEAT_INTERVAL_MS
            self._publish(
                now_ms,
                Channel.TELEMETRY,
                {"session": None, "samples": [_idle_sample(now_ms, reading)]},
            )

    # -- reports and events ----------------------------------------------------------------

    def report_user(self, now_ms: int, kind: str, note: str | None = None) -> None:
        """The user reported how a session felt (the app's "report a problem")."""
        self._event(now_ms, "user_report", kind=kind, note=note)

    def report_state(self, now_ms: int, answer: dict[str, object] | None = None) -> None:
        """Publish the retained ``state``: firmware, hardware and the last config answer."""
        if answer is not None:
            self.store.put("config_answer", answer)
        else:
            stored = self.store.get("config_answer")
            answer = stored if isinstance(stored, dict) else None
        payload: dict[str, object] = {
            "ts": now_ms,
            "fw": self.identity.fw,
            "hw": self.identity.hw,
        }
        if answer is not None:
            payload["config"] = answer
        dropped = self.store.dropped()
        self._reported_drops = dropped.messages
        if dropped.messages:
            # An optional v1 extension: what the outbox had to drop, so a gap in seq is
            # explained rather than guessed at.
            payload["dropped"] = {
                "messages": dropped.messages,
                "telemetry": dropped.telemetry,
                "events": dropped.events,
                "state": dropped.state,
                "first_seq": dropped.first_seq,
                "last_seq": dropped.last_seq,
            }
        self._publish(now_ms, Channel.STATE, payload)

    def _event(self, now_ms: int, event_type: str, **fields: object) -> None:
        self._publish(now_ms, Channel.EVENTS, {"ts": now_ms, "type": event_type, **fields})

    def _publish(self, now_ms: int, channel: Channel, body: dict[str, object]) -> int:
        def build(seq: int) -> bytes:
            payload = {"v": PROTOCOL_VERSION, "seq": seq, **body}
            problems = validate_outgoing(channel, payload)
            if problems:
                # A bug in the agent, not in the device: refuse to send what the cloud would
                # dead-letter, and say exactly what is wrong.
                raise ValueError(f"refusing to send an invalid {channel} message: {problems}")
            return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()

        return self.store.enqueue(str(channel), build, now_ms=now_ms)

    # -- mode tables -----------------------------------------------------------------------

    def on_config(self, now_ms: int, raw: bytes) -> None:
        """A table arrived on ``config``: check it, apply it now or after the session, answer."""
        fingerprint = _fingerprint(raw)
        if fingerprint in (self.store.get("config_seen"), self._pending_fingerprint):
            return  # the retained table again, after a reconnect: answered or waiting
        try:
            payload = json.loads(raw)
        except (UnicodeDecodeError, ValueError):
            log.warning("%s: config payload is not JSON; cannot answer it", self.identity.device_id)
            self.store.put("config_seen", fingerprint)
            return
        applied = max(self.table.version, self.pending_table.version if self.pending_table else 0)
        try:
            table = check_table(
                payload, public_key=self.public_key, applied_version=applied, now_ms=now_ms
            )
        except ConfigRejected as rejected:
            # One transaction, as in _apply: answered and marked seen together, so a power
            # loss between the two can neither answer it twice nor leave it unanswered.
            with self.store.transaction():
                self._reject(now_ms, payload, rejected)
                self.store.put("config_seen", fingerprint)
            return
        if self.session is not None:
            # Kept in memory only: after a crash the broker delivers the retained table
            # again and it is checked afresh.
            log.info(
                "%s: mode table %d waits for session %s to end",
                self.identity.device_id,
                table.version,
                self.session.id,
            )
            self.pending_table = table
            self._pending_fingerprint = fingerprint
            return
        self._apply(table, fingerprint, now_ms)

    def _apply(self, table: ModeTable, fingerprint: str, now_ms: int) -> None:
        answer = {
            "version": table.version,
            "sha256": table.sha256,
            "status": "applied",
            "reason": None,
        }
        # The table, the payload seen and the answer queued on state in one transaction. Apart,
        # a power loss after the table but before the rest would have the redelivered table
        # rejected as stale_version (it is not newer than itself) while it runs, and one after
        # config_seen would leave it never answered (the redelivery is skipped as seen).
        with self.store.transaction():
            self.store.put("table", dict(table.payload))
            self.store.put("config_seen", fingerprint)
            self.report_state(now_ms, answer)
        self.table = table
        self.pending_table = None
        self._pending_fingerprint = None
        log.info("%s: applied mode table %d", self.identity.device_id, table.version)

    def _reject(self, now_ms: int, payload: object, rejected: ConfigRejected) -> None:
        log.warning("%s: rejected mode table: %s", self.identity.device_id, rejected)
        version = payload.get("version") if isinstance(payload, dict) else None
        if not isinstance(payload, dict) or type(version) is not int or version < 1:
            # state.config.version is required and >= 1: a table without one cannot be
            # answered in v1. It is logged; the cloud sees no answer (config_unacked).
            return
        try:
            sha256 = table_sha256(payload)
        except (TypeError, ValueError):  # no canonical JSON: NaN, non-string keys
            sha256 = ""
        answer = {
            "version": version,
            "sha256": sha256,
            "status": "rejected",
            "reason": rejected.reason,
        }
        self.report_state(now_ms, answer)


def _output(mode: str, level: int, spec: ModeSpec) -> Output:
    i_set = min(float(spec.i_max_ua), spec.i_target_ua * level / REFERENCE_LEVEL)
    return Output(
        mode=mode,
        waveform=spec.waveform,
        i_set_ua=i_set,
        v_max_v=float(spec.v_max_v),
        freq_hz=spec.freq_hz,
        pulse_ms=spec.pulse_ms,
    )


def _sample(now_ms: int, session: _Session, reading: Reading) -> dict[str, object]:
    return {
        "ts": now_ms,
        "mode": session.mode,
        "level": session.level,
        "out": reading.output_on,
        "i_ua": round(reading.i_ua, 1),
        "i_set_ua": round(session.output.i_set_ua, 1),
        "v_v": round(reading.v_v, 2),
        "z_ohm": round(reading.z_ohm),
        "t_elec_c": round(reading.t_elec_c, 2),
        "t_batt_c": round(reading.t_batt_c, 2),
        "batt_pct": reading.batt_pct,
        "charging": reading.charging,
    }


def _idle_sample(now_ms: int, reading: Reading) -> dict[str, object]:
    return {
        "ts": now_ms,
        "out": reading.output_on,
        "i_ua": round(reading.i_ua, 1),
        "z_ohm": round(reading.z_ohm),
        "t_elec_c": round(reading.t_elec_c, 2),
        "t_batt_c": round(reading.t_batt_c, 2),
        "batt_pct": reading.batt_pct,
        "charging": reading.charging,
    }


def _fingerprint(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()
