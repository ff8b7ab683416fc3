"""The messages delivered on a connection that no stored-ack has covered yet, and their timers.

A PUBACK only says the broker took a message; the backend's stored-ack on
``galvani/v1/d/{id}/ack`` says it is stored, and only then does the outbox delete it. Between
the two, :class:`Unstored` keeps each message's outbox id, seq and timer, and says when a
single message should be sent again, as TCP retransmits a segment (never the outbox on a
timer):

- acks for later seqs arrived but not for it, and it has waited its own timeout
  (``ACK_TIMEOUT_S``, doubling with each copy up to ``ACK_TIMEOUT_MAX_S``) both from its
  delivery and from the first ack that passed it over: its ack was lost (an ingest worker
  killed between its commit and its publish) or it sits in a lagging worker's queue
  (:meth:`Unstored.timed_out`);
- no ack has arrived and no copy has been sent for the probe's wait (doubling the same way
  with each probe, back to ``ACK_TIMEOUT_S`` at every ack): the backend is away. One probe,
  the oldest delivered message (unless acks passed it over: then its own timer sends it), not
  the outbox, which the broker holds for the backend anyway (:meth:`Unstored.probe`). When
  acks come back, messages they pass over follow by the first rule, so a backend that works
  through its queue in order, acking the oldest first, is sent no copies.

It is bookkeeping only, kept apart from :mod:`device_agent.link` so that the publishing and
the timer rules can each be read alone: it reads no outbox and publishes nothing; the link does
both and tells it what happened. Memory and work are per message delivered and per ack, never per
tick: a tick looks only at the tops of two heaps. Everything here means something only on the
connection it was delivered on; the next connection sends the whole outbox again.
"""

import heapq
import logging
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass
from typing import Final

# The link's logger, so that a filter on galvani.agent.link sees all of the link.
log = logging.getLogger("galvani.agent.link")

# How long a delivered message waits for its stored-ack, from its delivery and from the first
# ack for a later seq, before it is sent again; doubling with each copy up to the cap. The same
# wait, doubling the same way and starting over at every ack, times the probe sent when no ack
# arrives at all.
ACK_TIMEOUT_S: Final = 30.0
ACK_TIMEOUT_MAX_S: Final = 480.0
# Delivered messages waiting for stored-acks at which the link first checks that the outbox
# still holds them (then each time their number doubles).
PRUNE_MIN: Final = 1024


@dataclass(slots=True)
class Unacked:
    """A message delivered on this connection (PUBACK 0x00) that no stored-ack has covered."""

    id: int
    seq: int
    since: float  # clock() of its first delivery on this connection
    timeout_s: float  # its wait for a stored-ack: ACK_TIMEOUT_S, doubled by each copy sent
    due: float  # clock() when that wait is over
    sending: bool = False  # a copy is in flight: its PUBACK is not back yet


class Unstored:
    """One link's delivered messages waiting for their stored-acks, with their timers.

    Every method takes ``now``, the link's clock in seconds, so the timers run on whatever
    clock the link is given.
    """

    def __init__(self, device_id: str, *, slack: int) -> None:
        """``slack``: stale heap items tolerated beyond twice the messages waiting (the link's
        publish window: copies in flight are off the heap)."""
        self.device_id = device_id
        self.slack = slack
        # By seq, in the order of their first delivery (dicts keep insertion order). Read it;
        # change it only through the methods.
        self.entries: dict[int, Unacked] = {}
        self.acked_max = 0  # the highest seq a stored-ack named on this connection
        # Seqs of entries below acked_max were passed over: the backend stored a later one, so
        # their acks may be lost. Those wait on _passed, a heap of (due, seq); the others on
        # _unpassed, a heap of seqs, until an ack passes them. Both heaps may hold stale items
        # (acked, dropped, or re-timed messages), skipped when they surface.
        self._passed: list[tuple[float, int]] = []
        self._unpassed: list[int] = []
        # The last time the backend could answer or did: an ack, a copy sent, or a delivery
        # when nothing waited.
        self._silent_since = 0.0
        self._probe_wait_s = ACK_TIMEOUT_S  # the probe's wait for an ack, doubling
        self._prune_at = PRUNE_MIN  # len(entries) at which to forget what the outbox dropped

    def clear(self) -> None:
        """Forget every message: the connection ended (the probe's wait carries over)."""
        self.entries.clear()
        self._prune_at = PRUNE_MIN
        self.acked_max = 0
        self._passed.clear()
        self._unpassed.clear()

    def delivered(self, outbox_id: int, seq: int, now: float) -> bool:
        """Start a first delivery's wait for its stored-ack; whether it is time to
        :meth:`prune`."""
        if not self.entries:
            self._silent_since = now
        entry = Unacked(outbox_id, seq, now, ACK_TIMEOUT_S, now + ACK_TIMEOUT_S)
        self.entries[seq] = entry
        if seq < self.acked_max:
            heapq.heappush(self._passed, (entry.due, seq))
        else:
            heapq.heappush(self._unpassed, seq)
        return len(self.entries) >= self._prune_at

    def prune(self, kept: Callable[[Iterable[int]], Container[int]]) -> None:
        """Forget delivered messages the outbox has dropped since (over its limits, while no
        ack came): with acks that never arrive, they would pile up for as long as the
        connection lasts. ``kept`` says which outbox ids the outbox still holds. Called when
        the count doubles, so its cost is O(1) per delivery."""
        still = kept(entry.id for entry in self.entries.values())
        self.entries = {seq: e for seq, e in self.entries.items() if e.id in still}
        self._prune_at = max(PRUNE_MIN, 2 * len(self.entries))
        self._unpassed = [seq for seq in self.entries if seq >= self.acked_max]
        heapq.heapify(self._unpassed)
        self._rebuild_passed()

    def forget(self, seq: int) -> None:
        """Stop waiting for ``seq``: the outbox no longer holds it (dropped, or given up)."""
        del self.entries[seq]

    def copy_sent(self, entry: Unacked, now: float) -> None:
        """A copy of ``entry`` went out: its wait doubles, and no probe goes while it is in
        flight (a copy is something the backend can answer)."""
        entry.sending = True
        entry.timeout_s = min(ACK_TIMEOUT_MAX_S, 2 * entry.timeout_s)
        self._silent_since = now

    def wait_again(self, entry: Unacked, now: float) -> None:
        """Start ``entry``'s wait for its stored-ack over, from now, with its current timeout
        (its copy was delivered, or refused with a code that may clear)."""
        entry.sending = False
        entry.due = now + entry.timeout_s
        if entry.seq < self.acked_max:
            heapq.heappush(self._passed, (entry.due, entry.seq))
        # Otherwise it is still on _unpassed (only a pass takes it off), or acked.

    def acked(self, ranges: Iterable[tuple[int, int]], now: float) -> None:
        """A stored-ack covered these inclusive seq ranges: forget them, start the probe's
        wait over at its shortest, and put the messages the ack passed over on their timers."""
        self._probe_wait_s = ACK_TIMEOUT_S
        self._silent_since = now
        for first, last in ranges:
            if last - first < len(self.entries):
                for seq in range(first, last + 1):
                    self.entries.pop(seq, None)
            elif self.entries:
                self.entries = {
                    seq: entry for seq, entry in self.entries.items() if not first <= seq <= last
                }
            self.acked_max = max(self.acked_max, last)
        self._pass_over(now)

    def timed_out(self, now: float, limit: int) -> list[Unacked]:
        """Up to ``limit`` messages acks passed over whose own waits are over: to send again."""
        due: list[Unacked] = []
        passed = self._passed
        while passed and passed[0][0] <= now and len(due) < limit:
            at, seq = heapq.heappop(passed)
            entry = self.entries.get(seq)
            if entry is not None and not entry.sending and entry.due == at:
                due.append(entry)
        return due

    def probe(self, now: float) -> Unacked | None:
        """The oldest message, to send again as a probe, if no ack has come and no copy has
        gone for the probe's wait (which then doubles); call only while messages wait."""
        if now - self._silent_since < self._probe_wait_s:
            return None
        oldest = next(iter(self.entries.values()))
        if oldest.sending or oldest.seq < self.acked_max:
            # A copy is in flight, or acks passed the oldest over and it waits on its own timer,
            # whose copies ask the backend as well as a probe would.
            self._silent_since = now
            return None
        # An outage of the backend reaches here again and again: warn once it has lasted.
        log.log(
            logging.WARNING if self._probe_wait_s >= ACK_TIMEOUT_MAX_S else logging.INFO,
            "%s: no stored-ack for %.0f s, %d delivered messages wait for one: sending seq %d "
            "again as a probe",
            self.device_id,
            now - self._silent_since,
            len(self.entries),
            oldest.seq,
        )
        self._probe_wait_s = min(ACK_TIMEOUT_MAX_S, 2 * self._probe_wait_s)
        return oldest

    def waited_too_long(self, now: float) -> bool:
        """Whether a message has waited longer than ``ACK_TIMEOUT_MAX_S`` since its first
        delivery on this connection."""
        if not self.entries:
            return False
        oldest = next(iter(self.entries.values()))
        return now - oldest.since > ACK_TIMEOUT_MAX_S

    def _pass_over(self, now: float) -> None:
        """Put the messages an ack passed over (a later seq stored) on their timers.

        Each waits its timeout from now, not only from its delivery: after an outage every
        message's wait is long over, and workers of a share group draining their queues side
        by side ack out of order by moments, which must not send copies.
        """
        unpassed = self._unpassed
        while unpassed and unpassed[0] < self.acked_max:
            entry = self.entries.get(heapq.heappop(unpassed))
            if entry is None:
                continue
            entry.due = max(entry.due, now + entry.timeout_s)
            if not entry.sending:
                heapq.heappush(self._passed, (entry.due, entry.seq))
        # Acked messages leave their items on _passed behind; rebuilt when they outnumber the
        # live ones, so the heap stays proportional to what waits.
        if len(self._passed) > 2 * len(self.entries) + self.slack:
            self._rebuild_passed()

    def _rebuild_passed(self) -> None:
        self._passed = [
            (entry.due, entry.seq)
            for entry in self.entries.values()
            if entry.seq < self.acked_max and not entry.sending
        ]
        heapq.heapify(self._passed)
