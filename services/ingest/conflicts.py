"""The records of conflicting messages in ``message_conflicts``, and the seq resets they mark.

Two reasons: ``seq_reused``, a message under a stored ``(device_id, seq)`` that says something
else (as :mod:`services.ingest.redelivery` decides), and ``sample_conflict``, a message with a
sample at a stored ``(device_id, ts)`` with other readings (as :mod:`services.ingest.samples`
finds on its staged path). Each conflicting message is recorded once, whole, with a ``detail``
naming what its key or its sample times hold; a redelivered conflict or a batch written again
adds nothing (the unique index decides). Recorded reuses also mark the device
(``seq_reused``, ``seq_resets``): see :func:`_mark_reuse`.
"""

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final
from zlib import crc32

from psycopg.types.json import Jsonb

from services.common.db import Conn
from services.common.protocol import Channel
from services.ingest.batch import BatchOutcome, M, moment
from services.ingest.decode import TelemetryIn
from services.ingest.redelivery import Held
from services.ingest.samples import Taken

SEQ_REUSED: Final = "seq_reused"
SAMPLE_CONFLICT: Final = "sample_conflict"
# A device reusing seqs after this long without reusing one has reset again (see _mark_reuse).
SEQ_RESET_QUIET: Final = timedelta(hours=1)


@dataclass(frozen=True, slots=True)
class Conflict:
    """One row of message_conflicts."""

    device_id: str
    channel: Channel
    seq: int
    ts: datetime
    reason: str
    payload: bytes
    received_at: datetime
    detail: dict[str, object]


def telemetry_conflicts(
    new: list[TelemetryIn],
    reused: list[tuple[TelemetryIn, Held]],
    taken: dict[int, list[Taken]],
) -> list[Conflict]:
    """A conflict for each reused message, and for each new one with samples at taken times.

    ``taken`` is by position in ``new`` followed by ``reused``, as written."""
    conflicts = [
        Conflict(
            m.device_id,
            Channel.TELEMETRY,
            m.seq,
            m.ts,
            SAMPLE_CONFLICT,
            m.payload,
            m.received_at,
            {"crc32": _hex(crc32(m.payload)), **_samples_detail(m, taken[i])},
        )
        for i, m in enumerate(new)
        if i in taken
    ]
    for i, (m, held) in enumerate(reused, start=len(new)):
        conflicts.append(reuse(Channel.TELEMETRY, m, held, _samples_detail(m, taken.get(i, []))))
    return conflicts


def _samples_detail(message: TelemetryIn, taken: list[Taken]) -> dict[str, object]:
    # Bounded by the message: at most one entry per sample it carries.
    return {
        "samples": len(message.rows),
        "conflicting_samples": [
            {"ts": ts.isoformat(), "stored_seq": seq} for ts, seq in sorted(taken)
        ],
    }


def reuse(channel: Channel, item: M, held: Held, extra: dict[str, object]) -> Conflict:
    """The conflict record of a message whose seq its key holds for another."""
    return Conflict(
        item.device_id,
        channel,
        item.seq,
        item.ts,
        SEQ_REUSED,
        item.payload,
        item.received_at,
        {"crc32": _hex(crc32(item.payload)), "stored": _stored(held), **extra},
    )


def _hex(crc: int) -> str:
    return f"{crc:08x}"


def _stored(held: Held) -> dict[str, object]:
    return {
        "crc32": _hex(held.crc32) if held.crc32 is not None else None,
        "ts": held.ts.isoformat(),
        "received_at": held.received_at.isoformat(),
    }


def record_conflicts(
    conn: Conn, conflicts: list[Conflict], known: set[str], outcome: BatchOutcome
) -> None:
    """Insert each conflict once (a redelivered conflicting message or a batch written again
    adds nothing: the unique index decides) and mark devices that reused seqs."""
    rows = conn.execute(
        """
        INSERT INTO message_conflicts (device_id, channel, seq, ts, reason, payload,
                                       payload_crc32, received_at, detail)
        SELECT * FROM unnest(%b::text[], %b::text[], %b::int8[], %b::timestamptz[], %b::text[],
                             %b::bytea[], %b::int8[], %b::timestamptz[], %b::jsonb[])
        ON CONFLICT DO NOTHING
        RETURNING device_id, reason, received_at""",
        [
            [c.device_id for c in conflicts],
            [c.channel.value for c in conflicts],
            [c.seq for c in conflicts],
            [c.ts for c in conflicts],
            [c.reason for c in conflicts],
            [c.payload for c in conflicts],
            [crc32(c.payload) for c in conflicts],
            [c.received_at for c in conflicts],
            [Jsonb(c.detail) for c in conflicts],
        ],
    ).fetchall()
    reuses: dict[str, list[datetime]] = {}
    for device_id, reason, received_at in rows:
        outcome.conflicts[str(reason)] += 1
        if reason == SEQ_REUSED and device_id in known:
            reuses.setdefault(str(device_id), []).append(moment(received_at))
    if reuses:
        outcome.seq_resets.extend(_mark_reuse(conn, reuses))


def _mark_reuse(conn: Conn, reuses: dict[str, list[datetime]]) -> list[str]:
    """Count each device's newly recorded seq reuses; return the devices whose seq reset.

    A reset device counts up from its first seq again and reuses one seq after another, so a
    reset shows as a run of reuses: one that follows no reuse for ``SEQ_RESET_QUIET`` begins a
    run (``seq_resets``, ``seq_reset_at``). Receipt times, not seqs, delimit runs: two workers
    can commit one device's messages out of order, which would make a seq-based run restart
    at every swap. A device offline longer than that in the middle of a run counts twice.
    """
    ids = sorted(reuses)
    rows = conn.execute(
        """
        UPDATE devices d SET
            seq_reused = d.seq_reused + u.n,
            seq_reused_at = GREATEST(d.seq_reused_at, u.last_at),
            seq_resets = d.seq_resets + u.starts::int,
            seq_reset_at = CASE WHEN u.starts THEN u.first_at ELSE d.seq_reset_at END
        FROM (SELECT u.id, u.n, u.first_at, u.last_at,
                     (o.seq_reused_at IS NULL OR u.first_at > o.seq_reused_at + %s) AS starts
              FROM unnest(%b::text[], %b::int8[], %b::timestamptz[], %b::timestamptz[])
                   AS u(id, n, first_at, last_at)
              JOIN devices o ON o.id = u.id) u
        WHERE d.id = u.id
        RETURNING d.id, u.starts""",
        [
            SEQ_RESET_QUIET,
            ids,
            [len(reuses[i]) for i in ids],
            [min(reuses[i]) for i in ids],
            [max(reuses[i]) for i in ids],
        ],
    ).fetchall()
    return sorted(str(device_id) for device_id, starts in rows if starts)
