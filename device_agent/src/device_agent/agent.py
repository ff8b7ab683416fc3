"""The agent's core: the session loop that samples, enforces and reports on the device's clock.

The core does no I/O of its own beyond the :class:`~device_agent.hardware.Hardware` it is
given and its :class:`~device_agent.store.DeviceStore`: every message it produces is written
to the store's outbox (which allocates ``seq``) and the MQTT link publishes from there. So
everything here works with the cloud unreachable, and a test drives it with a fake clock.
Its parts: local safety (:mod:`device_agent.safety`), the running session
(:mod:`device_agent.session`), the messages (:mod:`device_agent.reports`) and pushed mode
tables (:mod:`device_agent.table_updates`).

Time: ``tick(now_ms)`` is called about every :data:`SAMPLE_INTERVAL_MS` while output runs and
every :data:`IDLE_POLL_MS` otherwise; ``now_ms`` is the device clock in epoch milliseconds.
"""

import logging
import secrets
from collections.abc import Callable, Iterable, Mapping
from typing import Final

from device_agent.hardware import Hardware, Reading
from device_agent.modes import ModeTable
from device_agent.protocol import Channel
from device_agent.reports import Identity, Reporter, idle_sample, session_sample
from device_agent.safety import (
    CONTACT_GIVE_UP_MS,
    CONTACT_LOST_OHM,
    CONTACT_PAUSE_MS,
    Fault,
    Refusal,
    SessionRefused,
    check_sample,
    check_start,
    usable_spec,
)
from device_agent.session import Session, output_for
from device_agent.store import DeviceStore
from device_agent.table_updates import TableUpdates

# Importable from here, where the agent's callers have always found them.
__all__ = [
    "CONTACT_GIVE_UP_MS",
    "CONTACT_PAUSE_MS",
    "HEARTBEAT_INTERVAL_MS",
    "SAMPLE_INTERVAL_MS",
    "Agent",
    "Identity",
    "Refusal",
    "SessionRefused",
]

log = logging.getLogger("galvani.agent")

SAMPLE_INTERVAL_MS: Final = 100  # 10 Hz while output runs
TELEMETRY_BATCH_MS: Final = 1000  # one telemetry message a second in a session
HEARTBEAT_INTERVAL_MS: Final = 60_000  # one sample a minute while idle
IDLE_POLL_MS: Final = 1000  # charger and stuck-output checks while idle
HISTORY_KEEP_MS: Final = 8 * 24 * 3600 * 1000  # session history older than 7 days + margin


class Agent:
    """One device's agent. Not thread-safe: one caller drives it."""

    def __init__(
        self,
        identity: Identity,
        hardware: Hardware,
        store: DeviceStore,
        *,
        public_keys: bytes | Iterable[bytes],
        enforce_limits: bool = True,
        session_ids: Callable[[], str] = lambda: f"s-{secrets.token_hex(6)}",
    ) -> None:
        self.identity = identity
        self.hardware = hardware
        self.store = store
        # False models a firmware build without local limits (cap, battery, cooldown, counts),
        # so the cloud rules that only such a device can trigger are reproducible on demand.
        self.enforce_limits = enforce_limits
        self._session_ids = session_ids
        self.reports = Reporter(identity, store)
        self.tables = TableUpdates(store, self.reports, public_keys=public_keys)
        self.session: Session | None = None
        self._charging: bool | None = None
        self._next_heartbeat_ms = 0
        self._next_poll_ms = 0

    @property
    def table(self) -> ModeTable:
        """The mode table in force."""
        return self.tables.table

    @property
    def pending_table(self) -> ModeTable | None:
        """A valid table waiting for the running session to end."""
        return self.tables.pending

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
                self.reports.event(
                    now_ms,
                    "session_end",
                    session=cut.session_id,
                    duration_s=duration_s,
                    reason="fault",
                )
                self.store.record_session_end(cut.session_id, last_ms, output_s)
        self.reports.event(now_ms, "reboot", reason=reason)
        self.reports.state(now_ms)
        self._next_heartbeat_ms = now_ms
        self._next_poll_ms = now_ms

    def reboot(self, now_ms: int, reason: str) -> None:
        """A simulated watchdog or panic reset: output off, in-memory state lost."""
        self.hardware.stop_output()
        if self.session is not None:
            self._record_progress(self.session, now_ms)
        self.session = None
        self.tables.forget_pending()
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
        spec = usable_spec(self.table, mode, level)
        reading = self.hardware.read()
        check_start(self.store, now_ms, mode, spec, reading, enforce_limits=self.enforce_limits)
        session = Session(
            id=self._session_ids(),
            mode=mode,
            level=level,
            spec=spec,
            output=output_for(mode, level, spec),
            started_ms=now_ms,
            planned_ms=1000 * (seconds or spec.session_default_s),
            user=user,
            last_sample_ms=now_ms,
            batch_started_ms=now_ms,
        )
        self.reports.event(
            now_ms, "session_start", session=session.id, mode=mode, level=level, user=user
        )
        self.store.record_session_start(session.id, mode, now_ms)
        self.session = session
        self.hardware.start_output(session.output)
        return session.id

    def stop_session(self, now_ms: int) -> None:
        """The user pressed stop."""
        if self.session is not None and self.session.stopping is None:
            self._stop(self.session, "user_stopped")

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

    def _session_sample(self, session: Session, now_ms: int) -> None:
        reading = self.hardware.read()
        session.samples.append(session_sample(now_ms, session, reading))
        if reading.output_on:
            session.output_ms += SAMPLE_INTERVAL_MS
        if session.stopping is not None:
            if reading.output_on:
                self.hardware.stop_output()  # a stuck relay: keep asking, keep reporting
            else:
                self._end(session, now_ms, session.stopping)
                return
        else:
            verdict = check_sample(session, now_ms, reading, enforce_limits=self.enforce_limits)
            if isinstance(verdict, Fault):
                self._fault(session, now_ms, verdict.code, verdict.detail)
            elif verdict is not None:
                self._stop(session, verdict)
            else:
                self._watch_contact(session, now_ms, reading)
        if self.session is not None and now_ms - session.batch_started_ms >= TELEMETRY_BATCH_MS:
            self._flush(session, now_ms)

    def _watch_contact(self, session: Session, now_ms: int, reading: Reading) -> None:
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
        self, session: Session, now_ms: int, code: str, detail: Mapping[str, object]
    ) -> None:
        log.warning("%s: fault %s %s", self.identity.device_id, code, detail)
        self._flush(session, now_ms)
        self.reports.event(now_ms, "fault", code=code, detail={"session": session.id, **detail})
        self._stop(session, "fault")

    def _stop(self, session: Session, reason: str) -> None:
        session.stopping = reason
        self.hardware.stop_output()

    def _end(self, session: Session, now_ms: int, reason: str) -> None:
        self._flush(session, now_ms)
        duration_s = (now_ms - session.started_ms) // 1000
        with self.store.transaction():  # as in boot: a session ends once
            self.reports.event(
                now_ms, "session_end", session=session.id, duration_s=duration_s, reason=reason
            )
            self.store.record_session_end(session.id, now_ms, session.output_ms / 1000)
        self.store.prune_sessions(now_ms - HISTORY_KEEP_MS)
        self.session = None
        self._next_heartbeat_ms = now_ms + HEARTBEAT_INTERVAL_MS
        self._next_poll_ms = now_ms + IDLE_POLL_MS
        self.tables.apply_pending(now_ms)

    def _flush(self, session: Session, now_ms: int) -> None:
        if session.samples:
            self.reports.publish(
                now_ms,
                Channel.TELEMETRY,
                {"session": session.id, "samples": session.samples},
            )
            session.samples = []
            self._record_progress(session, now_ms)
        session.batch_started_ms = now_ms

    def _record_progress(self, session: Session, now_ms: int) -> None:
        progress = {"session": session.id, "ms": now_ms, "output_s": session.output_ms / 1000}
        self.store.put("progress", progress)

    def _idle_poll(self, now_ms: int) -> None:
        reading = self.hardware.read()
        if self._charging is not None and reading.charging != self._charging:
            self.reports.event(now_ms, "charging", on=reading.charging)
        self._charging = reading.charging
        if reading.output_on:
            # Output with no session (a relay stuck across a reboot): keep cutting it and
            # report every poll, so the cloud sees what is flowing.
            self.hardware.stop_output()
        heartbeat = now_ms >= self._next_heartbeat_ms
        if heartbeat and self.reports.drops_unreported():
            self.reports.state(now_ms)  # the outbox had to drop something: say what
        if reading.output_on or heartbeat:
            self._next_heartbeat_ms = now_ms + HEARTBEAT_INTERVAL_MS
            self.reports.publish(
                now_ms,
                Channel.TELEMETRY,
                {"session": None, "samples": [idle_sample(now_ms, reading)]},
            )

    # -- what the outside world hands the agent ---------------------------------------------

    def report_user(self, now_ms: int, kind: str, note: str | None = None) -> None:
        """The user reported how a session felt (the app's "report a problem")."""
        self.reports.event(now_ms, "user_report", kind=kind, note=note)

    def report_state(self, now_ms: int, answer: dict[str, object] | None = None) -> None:
        """Publish the retained ``state``: firmware, hardware and the last config answer."""
        self.reports.state(now_ms, answer)

    def on_config(self, now_ms: int, raw: bytes) -> None:
        """A table arrived on ``config``: check it, apply it now or after the session, answer."""
        running = self.session.id if self.session is not None else None
        self.tables.receive(now_ms, raw, running=running)
