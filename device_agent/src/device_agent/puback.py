"""What a PUBACK's reason code (MQTT 5.0 section 3.4.2.1) does to an outbox message.

A QoS 1 PUBLISH the broker did not take comes back with a reason code, and the message is
still the outbox's only copy. Which codes are waited out, how long, and which give the
message up are a policy of their own, kept here apart from :mod:`device_agent.link`, which
carries it out (it holds back the publish window and moves its read cursor back):

- ``NO_MATCHING_SUBSCRIBERS`` (0x10): the broker took it and dropped it, as a restarted broker
  does before ingest subscribes again. Kept, waited out, sent again, for as long as it takes;
- ``RETRY_ALWAYS`` (0x97, quota exceeded): clears by itself; the same;
- ``GIVE_UP`` (0x87, 0x90, 0x99): never clears for this message; given up at once, since
  keeping it would block the outbox behind it forever;
- any other failure (0x80, 0x83, 0x91, a code newer than this list): may or may not clear;
  waited out ``REFUSED_RETRIES`` times, then given up.

Over MQTT 3.1.1 a PUBACK has no reason code: every one is a success. A broker that will not
take a message either drops it and PUBACKs it all the same (Mosquitto 2.0 and NATS do, for an
ACL refusal) or closes the connection (``HUNG_UP``, counted by the link): the latter is a failure
that may or may not clear, waited out ``REFUSED_RETRIES`` times like the codes above.

The wait starts at ``RETRY_BACKOFF_MIN_S``, doubles to ``RETRY_BACKOFF_MAX_S`` (or the link's
own cap if lower) and is jittered between half the ceiling and the ceiling, so a fleet meeting a
restarted broker together does not return together; the next success resets it.
"""

import random
from typing import Final

# After PUBACK 0x10 or a refusal that may clear, the link waits before it sends from that
# message again: doubling from the minimum to the cap, jittered, reset by the next success.
RETRY_BACKOFF_MIN_S: Final = 1.0
RETRY_BACKOFF_MAX_S: Final = 30.0
# How often a message refused with a code that may or may not clear is sent again before it
# is given up (dropped and reported as a drop).
REFUSED_RETRIES: Final = 5

NO_MATCHING_SUBSCRIBERS: Final = 0x10
# Refusals that clear by themselves: the broker's quota (a rate or queue limit).
RETRY_ALWAYS: Final = frozenset({0x97})
# Refusals that never clear for this message: not authorized (0x87), topic name invalid
# (0x90), payload format invalid (0x99). Keeping it would block the outbox behind it forever.
GIVE_UP: Final = frozenset({0x87, 0x90, 0x99})
# Not a reason code: an MQTT 3.1.1 connection the broker ended while the message awaited its
# PUBACK (0x80 is "unspecified error", what MQTT 5 would call it).
HUNG_UP: Final = 0x80


class Refusals:
    """One link's refusals so far: how often each outbox message met a code that may clear,
    and how many waits in a row have gone by without a success."""

    def __init__(self) -> None:
        self._counts: dict[int, int] = {}  # outbox id -> retryable refusals so far
        self._attempt = 0

    def may_retry(self, outbox_id: int, code: int) -> bool:
        """Whether a message refused with ``code`` is sent again after a wait (counting the
        refusal when the code may not clear) rather than given up."""
        if code in RETRY_ALWAYS:
            return True
        count = self._counts.get(outbox_id, 0)
        if code in GIVE_UP or count >= REFUSED_RETRIES:
            return False
        self._counts[outbox_id] = count + 1
        return True

    def delivered(self, outbox_id: int) -> None:
        """The broker took a message: the waits start over at their shortest."""
        self._attempt = 0
        if self._counts:
            self._counts.pop(outbox_id, None)

    def forget(self, outbox_id: int) -> None:
        """The message was given up: nothing more to count."""
        self._counts.pop(outbox_id, None)

    def wait_s(self, rng: random.Random, cap_s: float) -> float:
        """The next wait before sending again, never above ``cap_s``; each doubles the next."""
        ceiling = min(cap_s, RETRY_BACKOFF_MAX_S, RETRY_BACKOFF_MIN_S * 2**self._attempt)
        self._attempt = min(self._attempt + 1, 30)
        # Never at once (what caused it takes time to clear), and jittered, so a fleet that met
        # a restarted broker together does not come back together.
        return rng.uniform(ceiling / 2, ceiling)
