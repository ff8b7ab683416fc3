"""A backend worker's MQTT session: persistent, shared, acknowledged only after commit.

Ingest and rules each run workers of their own share group on it (services.common.worker).
The connection itself (connect, subscribe, keepalive, backoff, a lost session) is
:mod:`services.common.broker_session`'s; this module is what arrives on it and what the
worker sends back.

* Acknowledged after commit: nothing is acknowledged on receipt; the worker acknowledges each
  message after the transaction that stores it commits, in arrival order, all of a batch's
  PUBACKs in one write.
* Bounded memory: the worker asks for at most ``receive_maximum`` unacknowledged messages
  (MQTT 5 Receive Maximum) and also stops reading its socket once it holds that many.
  Mosquitto 2.0 honours Receive Maximum only until the first acknowledgements arrive and
  then sends everything queued (measured: 300 requested, 9,850 received after 150 acks), so
  the worker's own limit is what holds; the rest waits in TCP buffers and the broker's queue.
* QoS 0 publishes (:meth:`Subscriber.publish`) leave in the same write as a batch's PUBACKs.

The MQTT client is this module's own (packets in :mod:`services.common.mqtt5`), not paho's:
paho reads each packet with three or four system calls (its first byte, each length byte, the
rest) and sends each PUBACK with two more, which ``make bench-ingest-floor`` measured at 4.3
to 7.1 µs of CPU per stored sample, over a third of issue 3's budget. Here one read of
up to 256 KiB is parsed into every message it holds (over TLS, one read is a ``recv`` per
16 KiB record, until the socket is drained).

Single-threaded by design: the worker calls :meth:`poll` to run the network and
:meth:`ack` after a commit from the same thread, so an acknowledgement can never be queued
on a connection other than the one the message arrived on.
"""

import logging
import random
import select
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Final, NamedTuple

from services.common import mqtt5
from services.common.broker_session import (
    MAXIMUM_PACKET_SIZE_BYTES,
    READ_SIZE,
    BrokerSession,
    ConnectionLost,
    SubscriberConfig,
    SubscriberStats,
)
from services.common.mqtt5 import PacketType, ProtocolViolation

# The session's names stay importable from here, where the workers have always found them.
__all__ = ["Inbound", "Subscriber", "SubscriberConfig", "SubscriberStats"]

log = logging.getLogger(__name__)


class Inbound(NamedTuple):
    """One message as the subscriber received it."""

    topic: str
    payload: bytes
    mid: int  # the broker's packet id, echoed in the PUBACK (0 at QoS 0)
    qos: int
    received_at: datetime
    generation: int  # which connection it arrived on


# Reads per poll before the worker looks at its batch again; bounds the time between flushes.
MAX_READS_PER_POLL: Final = 8


def _receive(sock: socket.socket) -> bytes | None:
    """What the socket holds, up to READ_SIZE; None if nothing yet."""
    if isinstance(sock, ssl.SSLSocket):
        return _receive_tls(sock)
    try:
        data = sock.recv(READ_SIZE)
    except BlockingIOError:
        return None
    except OSError as exc:
        raise ConnectionLost(f"read failed: {exc}") from exc
    if not data:
        raise ConnectionLost("the broker closed the connection")
    return data


def _receive_tls(sock: ssl.SSLSocket) -> bytes | None:
    """What the TLS socket holds, up to READ_SIZE; None if nothing yet.

    An SSLSocket's recv returns at most one TLS record (16 KiB of plaintext), so one read of
    the socket is as many recvs as it takes to drain it or fill READ_SIZE. "Nothing more now"
    is SSLWantReadError (SSLWantWriteError while OpenSSL must write first), OSErrors that are
    not BlockingIOError.
    """
    chunks: list[bytes] = []
    size = 0
    while size < READ_SIZE:
        try:
            data = sock.recv(READ_SIZE - size)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            break
        except OSError as exc:
            raise ConnectionLost(f"read failed: {exc}") from exc
        if not data:
            if chunks:
                break  # hand over what arrived; the next read finds the end again
            raise ConnectionLost("the broker closed the connection")
        chunks.append(data)
        size += len(data)
    if not chunks:
        return None
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _buffered(sock: socket.socket) -> bool:
    """Whether decrypted data waits inside the TLS object, where select() cannot see it."""
    return isinstance(sock, ssl.SSLSocket) and sock.pending() > 0


class Subscriber(BrokerSession):
    """One worker's MQTT session and the messages it holds but has not acknowledged."""

    def __init__(
        self, config: SubscriberConfig, *, draw: Callable[[], float] = random.random
    ) -> None:
        """``draw`` gives the uniform [0, 1) numbers that jitter reconnect delays."""
        super().__init__(config, draw=draw)
        self.pending: deque[tuple[Inbound, float]] = deque()

    def poll(self, timeout_s: float) -> None:
        """Run the network for up to ``timeout_s``: read, write, keep alive, reconnect."""
        if self._sock is None and not self._try_connect():
            time.sleep(min(timeout_s, max(0.0, self._next_attempt - time.monotonic())))
            return
        if self.full():
            self._hold(timeout_s)
            return
        sock = self._writing()
        if sock is None:
            return
        if self._in:  # read earlier, past a window that was full then
            before = len(self.pending)
            self._guarded(self._parse)
            if len(self.pending) > before or self._sock is None:
                return
        # A read stopped at READ_SIZE or a full window can leave a record's rest decrypted in
        # the SSL object, with nothing left in the kernel for select() to report.
        buffered = _buffered(sock)
        readable, _, _ = select.select(
            [sock], [sock] if self._out else [], [], 0.0 if buffered else timeout_s
        )
        self._flush()
        if readable or buffered:
            self._guarded(self._read)

    def full(self) -> bool:
        """Whether the worker holds as many messages as it allows itself."""
        limit = self.config.receive_maximum
        return self.unacked >= limit or len(self.pending) >= limit

    def _hold(self, timeout_s: float) -> None:
        # Leave incoming data in the socket: TCP pushes back on the broker, which queues. Keep
        # sending (acknowledgements, pings); if a ping goes unanswered for a keepalive because
        # its PINGRESP sits unread, the connection is closed and the next poll reconnects,
        # after which the broker redelivers what was not acknowledged.
        self._writing()
        time.sleep(timeout_s)

    def _read(self) -> None:
        for _ in range(MAX_READS_PER_POLL):
            if self._sock is None or self.full():
                return
            data = _receive(self._sock)
            if data is None:
                return
            self._last_in = time.monotonic()
            self._in += data
            self._parse()
            if len(data) < READ_SIZE:
                return  # the socket is drained; a further recv would only say so

    def _parse(self) -> None:
        """Handle the complete packets in the input buffer and drop them from there.

        Stops at a PUBLISH that would take the worker past its window; that and what follows
        stay in the buffer (at most one read) until acknowledgements make room.
        """
        buf = self._in
        limit = self.config.receive_maximum
        pending = self.pending
        size = len(buf)
        pos = 0
        arrived = self._last_in
        received_at = datetime.now(UTC)
        generation = self._generation
        try:
            while size - pos >= 2:
                header = mqtt5.read_varint(buf, pos + 1, size)
                if header is None:
                    break
                length, start = header
                end = start + length
                if end > size:
                    # Only an incomplete packet is checked: one over the limit is longer than
                    # a read, so it is incomplete here before the buffer grows to hold it.
                    if end - pos > MAXIMUM_PACKET_SIZE_BYTES:
                        raise ProtocolViolation(
                            f"a packet of {end - pos} bytes, over the Maximum Packet Size of"
                            f" {MAXIMUM_PACKET_SIZE_BYTES} the CONNECT set",
                            mqtt5.PACKET_TOO_LARGE,  # 3.1.2.11.4
                        )
                    break
                first = buf[pos]
                if first >> 4 == PacketType.PUBLISH and self._connacked:
                    if self.unacked >= limit or len(pending) >= limit:
                        break
                    topic, mid, qos, payload = mqtt5.read_publish(buf, start, end, first & 0x0F)
                    inbound = Inbound(topic, payload, mid, qos, received_at, generation)
                    pending.append((inbound, arrived))
                    if qos:
                        self.unacked += 1
                else:
                    self._control(first >> 4, bytes(buf[start:end]))
                pos = end
        finally:
            del buf[:pos]

    def oldest_age_s(self) -> float:
        """Seconds since the oldest pending message arrived (0 when none is pending)."""
        return time.monotonic() - self.pending[0][1] if self.pending else 0.0

    def take(self, limit: int) -> list[Inbound]:
        """Remove and return up to ``limit`` pending messages, oldest first."""
        count = min(limit, len(self.pending))
        return [self.pending.popleft()[0] for _ in range(count)]

    def ack(self, messages: list[Inbound]) -> int:
        """Acknowledge stored messages in arrival order, in one write; returns how many.

        Messages that arrived on an earlier connection are skipped: the broker redelivers
        them on this one, and their stored copies make the redelivery a duplicate.
        """
        if self._sock is None:
            return 0  # lost: everything unacknowledged comes again on the next connection
        generation = self._generation
        acks = [mqtt5.puback(m.mid) for m in messages if m.qos and m.generation == generation]
        if acks:
            self.unacked -= len(acks)
            self._queue(b"".join(acks))
            self._flush()
        return len(acks)

    def publish(self, topic: str, payload: bytes) -> None:
        """Queue a QoS 0 message, not retained, to leave with the next write: that of
        :meth:`ack` when called before it, else the next poll's.

        QoS 0 is at most once (4.3.1), and so is this: without an accepted connection the
        message is dropped (``stats.publishes_dropped``), and one still queued when the
        connection is lost goes with it; a receiver that needs it must ask again. A packet over
        the broker's Maximum Packet Size is never sent (3.2.2.3.6) but counted
        (``stats.publishes_too_large``).
        """
        if not self._connacked:
            self.stats.publishes_dropped += 1
            return
        packet = mqtt5.publish(topic, payload)
        if len(packet) > self._broker_maximum_packet_size:
            self.stats.publishes_too_large += 1
            log.warning(
                "not publishing %d bytes on %s: the broker takes packets of at most %d",
                len(packet),
                topic,
                self._broker_maximum_packet_size,
            )
            return
        self._queue(packet)
