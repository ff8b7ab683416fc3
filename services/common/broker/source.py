"""What the worker loop (services.common.worker) uses of its broker session, whichever the
engine: :class:`services.common.subscriber.Subscriber` on Mosquitto,
:class:`services.common.broker.jetstream.JetStreamSource` on NATS."""

from collections import deque
from typing import Protocol

from services.common.broker_session import SubscriberStats
from services.common.subscriber import Inbound


class InboundSource(Protocol):
    """Messages held until acknowledged after commit, and the publishes that leave with the
    acknowledgements."""

    # (message, time.monotonic() at arrival), oldest first.
    pending: deque[tuple[Inbound, float]]
    # Received on the current connection and not yet acknowledged.
    unacked: int
    # Connected and consuming.
    connected: bool
    stats: SubscriberStats

    def poll(self, timeout_s: float) -> None:
        """Run the network for up to ``timeout_s``: read, write, keep alive, reconnect."""

    def full(self) -> bool:
        """Whether the worker holds as many messages as it allows itself."""

    def oldest_age_s(self) -> float:
        """Seconds since the oldest pending message arrived (0 when none is pending)."""

    def take(self, limit: int) -> list[Inbound]:
        """Remove and return up to ``limit`` pending messages, oldest first."""

    def ack(self, messages: list[Inbound]) -> int:
        """Acknowledge stored messages in arrival order, in one write; returns how many."""

    def publish(self, topic: str, payload: bytes) -> None:
        """Queue an at-most-once publish to ``topic`` (an MQTT topic), to leave with the next
        write."""

    def close(self) -> None:
        """Send what is queued and disconnect."""
