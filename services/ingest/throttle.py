"""A per-device message budget: a device sending past it is banned from the broker for a while.

Mosquitto 2.0 has no per-client rate limit. Its ``max_inflight_messages`` is also sent to
MQTT 5 clients as Receive Maximum, but the broker answers a QoS 1 PUBLISH with its PUBACK as
soon as it has queued the message (src/handle_publish.c), so a device's rate is bounded only
by its round trip, tens of thousands of messages a second on a fast link. Every message a
device gets a PUBACK for is queued for the ingest group in arrival order, and a shared
subscription has one queue per worker: whatever a flooding device sends before it is stopped
sits ahead of every other device's messages (measured: 20,000 msg/s from one device for 20 s,
another device's ingest lag 30 s).

So ingest counts each device's messages in every batch it takes, before storing the batch
(every message is stored, over the budget or not: the broker acknowledged it), and a device
past ``throttle_messages`` in a ``throttle_window_s`` window is banned for ``throttle_ban_s``
through the broker's password file (services.common.broker_auth.ban_devices): the broker
disconnects it at once and refuses its reconnects until the ban ends. What it had sent and
had acknowledged is still queued and stored; what it had not had acknowledged is still in its
outbox, to be sent after the ban. Nothing acknowledged is dropped, and what the flooder adds
to everyone's queue is bounded by the budget plus what it sends while ingest reaches its
messages and the broker reloads (measured by ``make bench-flood``).

Each ban is also recorded in ``device_throttles`` (a short transaction of its own, after the
broker has the ban: a failed write is logged and counted, the ban stands), from which the rules
raise ``device_flooding`` to the device's brand.

A device that connects with a certificate (``devices.auth = 'certificate'``, the certificate
listener) is not in the password file, so the reload neither disconnects nor refuses it, and
the topic ACL is no tool either (a publish it refuses is PUBACK 0x87, which the device agent
gives up: that would lose data). Such a device is kept down by session takeover instead
(services.common.broker_certificates.end_device_session, with ingest's own account on the
service listener): when its ban starts, and again whenever its messages keep arriving while it
is banned, at most once per ``takeover_interval_s`` per device (a background thread, so a slow
broker does not hold the batch). Each worker learns the bans the others made from the ban file
(every LIFT_CHECK_INTERVAL_S) and ends the sessions of the banned certificate devices whose
messages it receives. Every message the broker acknowledged is still stored; the rest stays in
the device's outbox. What this bounds depends on how soon the device reconnects: the broker
accepts each reconnect, so a device sends for up to one takeover interval per connection.

On the NATS cluster there is no password file: every login is decided by the auth-callout
responder from the database (services/broker_access), so a ban is a ``device_bans`` row
(services.common.broker.nats_access.DatabaseBans) that it reads at the device's next CONNECT,
and every banned device, password or not, is kept down by session takeover as certificate
devices are here: when its ban starts (after the ban's transaction has committed, so that the
reconnect it makes is refused) and whenever its messages keep arriving. Each worker learns the
others' bans from the table.

Each worker counts what it sees. A shared subscription deals one device's messages round-robin
over the group's workers, so with W workers a device is banned at about W times the budget.
"""

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final, Protocol

import psycopg

from services.common.broker_auth import BrokerFiles, ban_devices, lift_expired_bans
from services.common.db import Conn
from services.ingest import metrics
from services.ingest.decode import Decoded

log = logging.getLogger("galvani.ingest.throttle")

# How often a worker looks for bans that have ended (its own or another worker's).
LIFT_CHECK_INTERVAL_S: Final = 1.0

# How often a banned certificate device's session is ended at most, per device, while its
# messages keep arriving. Each takeover needs a reconnect first (the old connection is gone),
# so this caps takeovers only for a device reconnecting faster; what it decides is how long a
# reconnected device sends before it is cut off again. Measured (tests/test_flood_certificates.py,
# the device agent's backoff, which starts again from 1 s at each accepted connection): 1 s let
# a banned device through at ~57-60 % of its unbanned rate; 0.2 s at 8-15 %, with 1.8 times the
# takeovers (30 against 17 for two devices over 10 s).
TAKEOVER_INTERVAL_S: Final = 0.2

# Runs a function in a transaction of the worker's database (RetryingDatabase.transaction).
InTransaction = Callable[[Callable[[Conn], None]], None]
# Ends a device's session at the broker by session takeover; whether the broker accepted it.
EndSession = Callable[[str], bool]


class BanStore(Protocol):
    """Where a ban is kept so that the broker refuses the device's logins until it ends."""

    # Whether every banned device's live session must be ended by takeover (NATS: the auth
    # callout refuses new logins only), not only a certificate device's (Mosquitto: the
    # password-file reload disconnects the others).
    takeover_all: bool

    def ban(self, conn: Conn, bans: dict[str, float]) -> bool:
        """Keep ``bans`` (device id to its end, Unix seconds), in the caller's transaction;
        whether the broker will refuse them."""

    def current(self, transaction: InTransaction) -> dict[str, float]:
        """Every ban kept, ended or not."""

    def lift_expired(self, conn: Conn, now: float) -> list[str]:
        """Let back in the devices whose ban ended by ``now``; return them."""


class FileBans:
    """Mosquitto's ban file beside its password file (services.common.broker_auth)."""

    takeover_all = False

    def __init__(self, broker_dir: Path) -> None:
        self.files = BrokerFiles(broker_dir)

    def ban(self, conn: Conn, bans: dict[str, float]) -> bool:
        """Write the bans, re-render the password file and reload; False without a broker."""
        return ban_devices(conn, self.files, bans)

    def current(self, transaction: InTransaction) -> dict[str, float]:
        """The ban file's entries (no database needed)."""
        return self.files.bans()

    def lift_expired(self, conn: Conn, now: float) -> list[str]:
        """Render the ended bans' devices back and reload."""
        return lift_expired_bans(conn, self.files, now)


def certificate_devices(conn: Conn, device_ids: Iterable[str]) -> set[str]:
    """Which of ``device_ids`` connect with a certificate (no password file keeps them out)."""
    rows = conn.execute(
        "SELECT id FROM devices WHERE id = ANY(%s) AND auth = 'certificate'", [list(device_ids)]
    ).fetchall()
    return {str(row[0]) for row in rows}


def senders(decoded: Sequence[Decoded]) -> Iterator[str]:
    """The device of each message of a batch whose topic named one (dead letters too: a
    device flooding malformed payloads costs ingest as much as one flooding valid ones)."""
    for item in decoded:
        if item.device_id is not None:
            yield item.device_id


@dataclass(frozen=True)
class Budget:
    """How many messages one device may send in a window, as one worker counts them."""

    messages: int
    window_s: float


@dataclass
class Counts:
    """Messages per device in the current fixed window; says who is over the budget.

    Fixed windows: a device can send up to twice the budget across a window boundary, which a
    budget many times a device's legitimate rate allows for.
    """

    budget: Budget
    clock: Callable[[], float] = time.monotonic
    _started: float = field(init=False)
    _counts: Counter[str] = field(default_factory=Counter, init=False)

    def __post_init__(self) -> None:
        self._started = self.clock()

    def add(self, device_ids: Iterable[str]) -> tuple[list[str], int]:
        """Count a committed batch's messages by device; return the devices of the batch that
        are over the budget and how many of the batch's messages were past it."""
        now = self.clock()
        if now - self._started >= self.budget.window_s:
            self._started = now
            self._counts.clear()
        limit = self.budget.messages
        counts = self._counts
        over: list[str] = []
        over_messages = 0
        for device_id, count in Counter(device_ids).items():
            before = counts[device_id]
            after = before + count
            counts[device_id] = after
            if after > limit:
                over_messages += after - max(before, limit)
                over.append(device_id)
        return over, over_messages

    def seen(self, device_id: str) -> int:
        """How many of ``device_id``'s messages were counted in the current window."""
        return self._counts[device_id]

    def forget(self, device_id: str) -> None:
        """Count ``device_id`` from zero again (it has been banned: after the ban it starts
        afresh, whatever window the ban ends in)."""
        self._counts.pop(device_id, None)


class Throttle:
    """Counts committed messages per device and bans a device that goes over its budget."""

    def __init__(
        self,
        budget: Budget,
        ban_s: float,
        broker_dir: Path,
        transaction: InTransaction,
        *,
        end_session: EndSession | None = None,
        takeover_interval_s: float = TAKEOVER_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        store: BanStore | None = None,
    ) -> None:
        """``transaction`` runs the ban's reading of device credentials in the database;
        ``end_session`` ends a banned device's session where the ban alone does not (without
        it, such a device cannot be banned: counted as ``ban_failed``); ``store`` keeps the
        bans (default: Mosquitto's ban file in ``broker_dir``)."""
        self.counts = Counts(budget, clock)
        self.ban_s = ban_s
        self.store: BanStore = store if store is not None else FileBans(broker_dir)
        self._transaction = transaction
        self._clock = clock
        self._banned_until: dict[str, float] = {}  # by this worker, on its clock
        self._next_lift_check = 0.0
        self._end_session = end_session
        self.takeover_interval_s = takeover_interval_s
        # Banned certificate devices (by any worker) and when their ban ends (Unix seconds).
        self._certificate_bans: dict[str, float] = {}
        self._classified: set[str] = set()  # banned devices whose auth has been looked up
        self._ended_at: dict[str, float] = {}  # last takeover per device, on this clock
        self._under_way: dict[str, Future[None]] = {}  # so a slow broker gets no queue
        self._takeovers = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="takeover")
            if end_session is not None
            else None
        )

    def close(self) -> None:
        """Wait for the takeovers under way (each bounded by its timeout)."""
        if self._takeovers is not None:
            self._takeovers.shutdown(wait=True, cancel_futures=True)

    def observe(self, device_ids: Iterable[str]) -> None:
        """Count a committed batch; ban the devices that went over their budget with it."""
        batch = list(device_ids)
        over, over_messages = self.counts.add(batch)
        if over_messages:
            metrics.OVER_BUDGET_MESSAGES.inc(over_messages)
        now = self._clock()
        due = [d for d in over if self._banned_until.get(d, 0.0) <= now]
        if due:
            self._ban(due, now)
        if self._certificate_bans:
            # A banned certificate device that has reconnected: end its session again.
            wall = time.time()
            for device_id in set(batch).intersection(self._certificate_bans):
                if self._certificate_bans[device_id] > wall:
                    self._take_over(device_id, now)

    def _ban(self, device_ids: list[str], now: float) -> None:
        banned_at = datetime.now(UTC)
        until = banned_at.timestamp() + self.ban_s
        bans = dict.fromkeys(device_ids, until)
        budget = self.counts.budget
        over = {d: max(1, self.counts.seen(d) - budget.messages) for d in device_ids}
        for device_id in device_ids:
            # Also after a failed ban: try again when a ban would have ended, not every batch.
            self._banned_until[device_id] = now + self.ban_s
            self.counts.forget(device_id)
        reloaded: list[bool] = []
        certificate: set[str] = set()

        def ban(conn: Conn) -> None:
            reloaded[:] = [self.store.ban(conn, bans)]
            certificate.clear()
            certificate.update(
                device_ids if self.store.takeover_all else certificate_devices(conn, device_ids)
            )

        try:
            self._transaction(ban)
        except OSError:
            # The broker's directory is not this worker's to write (ingest on another host, or
            # a permission): the flood goes on, and the counter says so.
            metrics.THROTTLED.labels("ban_failed").inc(len(device_ids))
            log.exception("could not ban %s from the broker", ", ".join(device_ids))
            return
        failed = [d for d in device_ids if d not in certificate] if not reloaded[0] else []
        if failed:
            log.error(
                "could not ban %s: no broker runs from the broker directory (no pid file, or"
                " its process is gone)",
                ", ".join(failed),
            )
        if certificate and self._end_session is None:
            failed += sorted(certificate)
            log.error(
                "could not ban %s: a certificate device (any device on NATS) is kept out by"
                " session takeover, and this worker has no broker account to make one",
                ", ".join(sorted(certificate)),
            )
        elif certificate:
            for device_id in sorted(certificate):
                self._certificate_bans[device_id] = until
                self._classified.add(device_id)
                self._take_over(device_id, now)
        if failed:
            metrics.THROTTLED.labels("ban_failed").inc(len(failed))
        applied = [d for d in device_ids if d not in failed]
        if not applied:
            return
        metrics.THROTTLED.labels("banned").inc(len(applied))
        log.warning(
            "device flooding: %s sent over %d messages in %.0f s; banned from the broker for"
            " %.0f s (its messages acknowledged so far are stored; the rest wait in its outbox)",
            ", ".join(applied),
            budget.messages,
            budget.window_s,
            self.ban_s,
        )
        self._record(banned_at, {d: over[d] for d in applied})

    def _take_over(self, device_id: str, now: float) -> None:
        """End a banned certificate device's session, unless this worker did within the
        takeover interval (or one is still under way)."""
        if self._takeovers is None:
            return
        last = self._ended_at.get(device_id)
        if last is not None and now - last < self.takeover_interval_s:
            return
        under_way = self._under_way.get(device_id)
        if under_way is not None and not under_way.done():
            return
        self._ended_at[device_id] = now
        self._under_way[device_id] = self._takeovers.submit(self._end, device_id)

    def _end(self, device_id: str) -> None:
        assert self._end_session is not None
        if self._end_session(device_id):
            metrics.THROTTLED.labels("session_ended").inc()
        else:
            # Logged by end_device_session; tried again with the device's next messages.
            metrics.THROTTLED.labels("session_end_failed").inc()

    def _record(self, banned_at: datetime, over: dict[str, int]) -> None:
        """Keep the bans in ``device_throttles`` for the device's brand to see (as the rules'
        ``device_flooding`` alert), in a transaction of its own: the broker already has them."""
        budget = self.counts.budget
        failed: list[psycopg.Error] = []

        def record(conn: Conn) -> None:
            try:
                with conn.transaction():
                    conn.execute(
                        "INSERT INTO device_throttles (device_id, banned_at, until,"
                        " messages_over_budget, window_s, budget)"
                        " SELECT d.id, %s, %s, b.over, %s, %s FROM devices d"
                        " JOIN unnest(%s::text[], %s::int[]) AS b(device_id, over)"
                        " ON b.device_id = d.id",
                        [
                            banned_at,
                            banned_at + timedelta(seconds=self.ban_s),
                            budget.window_s,
                            budget.messages,
                            list(over),
                            list(over.values()),
                        ],
                    )
            except psycopg.OperationalError:
                raise  # the connection: retried as every transaction of the worker is
            except psycopg.Error as exc:
                # The table or its grant missing, a constraint: not worth holding ingest for.
                failed.append(exc)

        self._transaction(record)
        if failed:
            metrics.THROTTLED.labels("record_failed").inc(len(over))
            log.error(
                "banned %s, but could not record the ban for its brand: %s",
                ", ".join(over),
                failed[0],
            )

    def tick(self) -> None:
        """Between batches: let back in the devices whose ban has ended (on a timer of its own,
        so an idle worker still lifts bans)."""
        now = self._clock()
        if now < self._next_lift_check:
            return
        self._next_lift_check = now + LIFT_CHECK_INTERVAL_S
        self._banned_until = {d: u for d, u in self._banned_until.items() if u > now}
        wall = time.time()
        try:
            bans = self.store.current(self._transaction)
        except OSError:
            log.exception("could not read the broker's ban file")
            return
        self._learn_certificate_bans(bans, wall)
        if not any(until <= wall for until in bans.values()):
            return
        lifted: list[str] = []

        def lift(conn: Conn) -> None:
            lifted[:] = self.store.lift_expired(conn, wall)

        try:
            self._transaction(lift)
        except OSError:
            log.exception("could not lift bans at the broker")
            return
        if lifted:
            metrics.THROTTLED.labels("lifted").inc(len(lifted))
            log.info("ban ended: %s may connect again", ", ".join(lifted))

    def _learn_certificate_bans(self, bans: dict[str, float], wall: float) -> None:
        """Keep the current bans of certificate devices, whichever worker made them, so that
        this worker ends their sessions too when their messages reach it."""
        if self._end_session is None:
            return
        current = {d: u for d, u in bans.items() if u > wall}
        self._classified &= current.keys()
        self._certificate_bans = {
            d: current[d] for d in self._certificate_bans.keys() & current.keys()
        }
        self._ended_at = {d: t for d, t in self._ended_at.items() if d in current}
        self._under_way = {d: f for d, f in self._under_way.items() if d in current}
        unknown = current.keys() - self._classified
        if not unknown:
            return
        found: set[str] = set()

        def classify(conn: Conn) -> None:
            found.clear()
            found.update(certificate_devices(conn, unknown))

        if self.store.takeover_all:
            found.update(unknown)
        else:
            self._transaction(classify)
        self._classified |= unknown
        for device_id in found:
            self._certificate_bans[device_id] = current[device_id]
