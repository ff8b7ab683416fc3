"""What the agent sends: its messages built, checked and queued in the outbox.

Nothing here touches the network: every message is written to the store's outbox, which
allocates its ``seq``, and the link publishes from there.
"""

import json
from dataclasses import dataclass

from device_agent.hardware import Reading
from device_agent.protocol import PROTOCOL_VERSION, Channel, validate_outgoing
from device_agent.session import Session
from device_agent.store import DeviceStore


@dataclass(frozen=True)
class Identity:
    """What the device reports about itself."""

    device_id: str
    fw: str = "1.0.0"
    hw: str = "A"


class Reporter:
    """One device's outgoing messages: telemetry, events and the retained ``state``."""

    def __init__(self, identity: Identity, store: DeviceStore) -> None:
        self.identity = identity
        self.store = store
        self._reported_drops = 0

    def publish(self, now_ms: int, channel: Channel, body: dict[str, object]) -> int:
        """Queue ``body`` on ``channel`` with the next seq; the seq."""

        def build(seq: int) -> bytes:
            payload = {"v": PROTOCOL_VERSION, "seq": seq, **body}
            problems = validate_outgoing(channel, payload)
            if problems:
                # A bug in the agent, not in the device: refuse to send what the cloud would
                # dead-letter, and say exactly what is wrong.
                raise ValueError(f"refusing to send an invalid {channel} message: {problems}")
            return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()

        return self.store.enqueue(str(channel), build, now_ms=now_ms)

    def event(self, now_ms: int, event_type: str, **fields: object) -> None:
        """Queue an ``events`` message of ``event_type``."""
        self.publish(now_ms, Channel.EVENTS, {"ts": now_ms, "type": event_type, **fields})

    def state(self, now_ms: int, answer: dict[str, object] | None = None) -> None:
        """Queue the retained ``state``: firmware, hardware, the last config answer (``answer``
        replaces the stored one) and what the outbox has dropped."""
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
        self.publish(now_ms, Channel.STATE, payload)

    def drops_unreported(self) -> bool:
        """Whether the outbox has dropped messages since the last ``state`` said how many."""
        return self.store.dropped().messages != self._reported_drops


def session_sample(now_ms: int, session: Session, reading: Reading) -> dict[str, object]:
    """One sample of a running session, as ``telemetry`` carries it."""
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


def idle_sample(now_ms: int, reading: Reading) -> dict[str, object]:
    """The heartbeat sample of an idle device."""
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
