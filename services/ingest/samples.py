"""The samples of a batch's new telemetry, by binary COPY, and the hours they make stale.

Samples are the hot path: a row per reading, ten a second per running device. The ledger has
already kept redelivered messages out, so a batch's samples are new unless two messages carry
the same sample time; they are copied straight into the hypertable inside a savepoint. Only
when the primary key refuses that COPY does the batch stage them (COPY into a temporary
table, ``INSERT … ON CONFLICT DO NOTHING``) and find which stored times hold other readings:
staging costs PostgreSQL about twice the CPU per row, so it is paid only on that rare path.

A sample whose device time is a suspect clock (outside ``[received - 30 days, received +
5 minutes]``, ``services.common.protocol.limits``) goes to ``suspect_samples`` instead: a
plain table keyed by the message and the sample's place in it, trimmed by receipt time
(migration 0010). In the hypertable, a wrong clock's times made a chunk a day they spanned and
a rollup hour per past hour; there, they make one row each and nothing else.
"""

from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Final

from psycopg import errors, sql
from psycopg.rows import args_row

from services.common.db import Conn
from services.ingest.batch import BatchOutcome
from services.ingest.decode import (
    ROW_DEVICE,
    ROW_RECEIVED_AT,
    ROW_SUSPECT,
    ROW_TS,
    SAMPLE_COLUMNS,
    SAMPLE_TYPES,
    SampleRow,
    TelemetryIn,
)

# A sample time already taken by other readings, and the seq of the message that took it.
Taken = tuple[datetime, int]

# Samples older than this on arrival (a device's offline buffer) mark their hour for the
# maintenance service to recompute, which otherwise recomputes only recent hours.
LATE_SAMPLE_AFTER: Final = timedelta(hours=1)
ONE_HOUR: Final = timedelta(hours=1)

_COLUMNS: Final = sql.SQL(", ").join(map(sql.Identifier, SAMPLE_COLUMNS))
COPY_SAMPLES: Final = sql.SQL("COPY samples ({}) FROM STDIN (FORMAT BINARY)").format(_COLUMNS)
COPY_STAGED: Final = sql.SQL("COPY samples_in ({}) FROM STDIN (FORMAT BINARY)").format(_COLUMNS)
INSERT_STAGED: Final = sql.SQL(
    "INSERT INTO samples ({}) SELECT {} FROM samples_in ON CONFLICT DO NOTHING"
    " RETURNING device_id, ts"
).format(_COLUMNS, _COLUMNS)
# What a sample reads. A staged sample whose time is stored with other readings is a conflict;
# seq, receipt time and the suspect flag describe the message, not the reading.
READINGS: Final = [
    c for c in SAMPLE_COLUMNS if c not in ("device_id", "ts", "seq", "received_at", "ts_suspect")
]
FIND_TAKEN: Final = sql.SQL(
    "SELECT i.device_id, i.seq, i.ts, s.seq FROM samples_in i"
    " JOIN samples s ON s.device_id = i.device_id AND s.ts = i.ts"
    " WHERE ({}) IS DISTINCT FROM ({})"
).format(
    sql.SQL(", ").join(sql.Identifier("s", c) for c in READINGS),
    sql.SQL(", ").join(sql.Identifier("i", c) for c in READINGS),
)


# suspect_samples' columns in COPY order: the message's key and the sample's place in it, the
# device time as sent, the readings, the receipt time. The readings are SampleRow's columns
# from ``session`` to ``charging``.
SUSPECT_COLUMNS: Final = ("device_id", "seq", "idx", "ts", *SAMPLE_COLUMNS[3:15], "received_at")
SUSPECT_TYPES: Final = ("text", "int8", "int2", "timestamptz", *SAMPLE_TYPES[3:15], "timestamptz")
SuspectRow = tuple[object, ...]
_SUSPECT: Final = sql.SQL(", ").join(map(sql.Identifier, SUSPECT_COLUMNS))
COPY_SUSPECT: Final = sql.SQL("COPY suspect_samples ({}) FROM STDIN (FORMAT BINARY)").format(
    _SUSPECT
)
COPY_SUSPECT_STAGED: Final = sql.SQL(
    "COPY suspect_samples_in ({}) FROM STDIN (FORMAT BINARY)"
).format(_SUSPECT)
INSERT_SUSPECT_STAGED: Final = sql.SQL(
    "INSERT INTO suspect_samples ({}) SELECT {} FROM suspect_samples_in ON CONFLICT DO NOTHING"
    " RETURNING device_id, seq, idx"
).format(_SUSPECT, _SUSPECT)


def write_samples(
    conn: Conn, messages: list[TelemetryIn], outcome: BatchOutcome
) -> tuple[list[SampleRow], dict[int, list[Taken]]]:
    """Store the samples of ``messages``; return the rows stored and, by position in
    ``messages``, the times whose samples were already stored with other readings.

    A batch holding two payloads under one ``(device_id, seq)`` writes them in turns, so
    the conflicts of each turn name each message by its key alone.
    """
    turns: list[tuple[set[tuple[str, int]], list[int]]] = []
    for i, message in enumerate(messages):
        key = (message.device_id, message.seq)
        turn = next((t for t in turns if key not in t[0]), None)
        if turn is None:
            turn = (set(), [])
            turns.append(turn)
        turn[0].add(key)
        turn[1].append(i)
    stored: list[SampleRow] = []
    taken: dict[int, list[Taken]] = {}
    for _, positions in turns:
        rows, found = _insert_samples(conn, [messages[i] for i in positions], outcome)
        stored += rows
        for i in positions:
            times = found.get((messages[i].device_id, messages[i].seq))
            if times:
                taken[i] = times
    return stored, taken


def _insert_samples(
    conn: Conn, messages: list[TelemetryIn], outcome: BatchOutcome
) -> tuple[list[SampleRow], dict[tuple[str, int], list[Taken]]]:
    """COPY the samples of messages with distinct keys; return the rows that were stored and
    the taken times by message key. Suspect-clock samples go to ``suspect_samples``."""
    rows: list[SampleRow] = []
    suspect: list[SampleRow] = []
    suspect_rows: list[SuspectRow] = []
    for message in messages:
        if not message.ts_suspect:
            rows += message.rows
            continue
        for idx, row in enumerate(message.rows):
            if row[ROW_SUSPECT]:
                suspect.append(row)
                suspect_rows.append(_suspect_row(message.seq, idx, row))
            else:
                rows.append(row)
    stored_suspect = _insert_suspect(conn, suspect, suspect_rows) if suspect else []
    outcome.samples_suspect += len(stored_suspect)
    latest = outcome.suspect_received
    for row in stored_suspect:
        device_id, at = row[ROW_DEVICE], row[ROW_RECEIVED_AT]
        latest[device_id] = max(at, latest.get(device_id, at))
    if not rows:
        return stored_suspect, {}
    # Fast path: the ledger already filtered out redelivered messages, so these samples are
    # new unless a device sent two messages with overlapping times. COPY into the hypertable
    # inside a savepoint; if the primary key objects, fall back to a keyed insert.
    taken: dict[tuple[str, int], list[Taken]] = {}
    if _copied(conn, COPY_SAMPLES, SAMPLE_TYPES, rows):
        stored = rows
    else:
        stored, taken = _insert_samples_keyed(conn, rows)
    outcome.samples_stored += len(stored)
    outcome.samples_conflicting += len(rows) - len(stored)
    return stored + stored_suspect, taken


def _copied(
    conn: Conn, statement: sql.Composed, types: Sequence[str], rows: Sequence[Sequence[object]]
) -> bool:
    """COPY ``rows`` in a savepoint; False (and nothing written) if a key was already taken."""
    try:
        with conn.transaction(), conn.cursor() as cur, cur.copy(statement) as copy:
            copy.set_types(types)
            for row in rows:
                copy.write_row(row)
    except errors.UniqueViolation:
        return False
    return True


def _suspect_key(device_id: str, seq: int, idx: int) -> tuple[str, int, int]:
    return device_id, seq, idx


def _suspect_row(seq: int, idx: int, row: SampleRow) -> SuspectRow:
    return (row[ROW_DEVICE], seq, idx, row[ROW_TS], *row[3:15], row[ROW_RECEIVED_AT])


def _insert_suspect(
    conn: Conn, samples: list[SampleRow], rows: list[SuspectRow]
) -> list[SampleRow]:
    """COPY suspect-clock samples into ``suspect_samples``; return those stored.

    Their key is new unless a message under a stored seq carries them (a reused seq, whose
    message is recorded whole in ``message_conflicts``): then the rows are staged and
    inserted where their key is free, as the keyed path of ``samples`` does.
    """
    if _copied(conn, COPY_SUSPECT, SUSPECT_TYPES, rows):
        return samples
    conn.execute(
        "CREATE TEMP TABLE IF NOT EXISTS suspect_samples_in (LIKE suspect_samples)"
        " ON COMMIT DELETE ROWS"
    )
    with conn.cursor() as cur, cur.copy(COPY_SUSPECT_STAGED) as copy:
        copy.set_types(SUSPECT_TYPES)
        for row in rows:
            copy.write_row(row)
    with conn.cursor(row_factory=args_row(_suspect_key)) as cur:
        inserted = set(cur.execute(INSERT_SUSPECT_STAGED).fetchall())
    conn.execute("TRUNCATE suspect_samples_in")
    return [
        sample
        for sample, row in zip(samples, rows, strict=True)
        if _suspect_key(*row[:3]) in inserted  # type: ignore[arg-type]
    ]


def _sample_key(device_id: str, ts: datetime) -> tuple[str, datetime]:
    return device_id, ts


def _taken(
    device_id: str, seq: int, ts: datetime, stored_seq: int
) -> tuple[tuple[str, int], Taken]:
    return (device_id, seq), (ts, stored_seq)


def _insert_samples_keyed(
    conn: Conn, rows: list[SampleRow]
) -> tuple[list[SampleRow], dict[tuple[str, int], list[Taken]]]:
    conn.execute("CREATE TEMP TABLE IF NOT EXISTS samples_in (LIKE samples) ON COMMIT DELETE ROWS")
    with conn.cursor() as cur, cur.copy(COPY_STAGED) as copy:
        copy.set_types(SAMPLE_TYPES)
        for row in rows:
            copy.write_row(row)
    with conn.cursor(row_factory=args_row(_sample_key)) as cur:
        inserted = set(cur.execute(INSERT_STAGED).fetchall())
    taken: dict[tuple[str, int], list[Taken]] = {}
    # Compared in PostgreSQL, column against column of the same types: a reading sent again
    # as the same float4 is no conflict, whatever its Python float was.
    with conn.cursor(row_factory=args_row(_taken)) as cur:
        for message_key, time in cur.execute(FIND_TAKEN).fetchall():
            taken.setdefault(message_key, []).append(time)
    conn.execute("TRUNCATE samples_in")
    stored: list[SampleRow] = []
    for row in rows:
        key = (row[ROW_DEVICE], row[ROW_TS])
        if key in inserted:
            inserted.discard(key)  # the first of two rows with one key is the one stored
            stored.append(row)
    return stored, taken


def late_hours(messages: Iterable[TelemetryIn]) -> set[tuple[str, datetime]]:
    """The (device, hour) of every sample older than ``LATE_SAMPLE_AFTER`` on arrival.

    A message's samples nearly always lie within one hour, so that case costs two
    comparisons per message rather than an hour computed per sample. Samples a conflict kept
    out of the table (a second sample with the same time) still mark their hour: it holds
    the first one, so a recompute is at worst unneeded. Suspect-clock samples mark nothing:
    they are not in ``samples``, so no rollup holds them. A message therefore marks at most
    the 720 hours (30 days) a plausible time can be late by, and ``rollup_dirty`` holds a
    device's hour once.
    """
    late: set[tuple[str, datetime]] = set()
    for message in messages:
        cutoff = message.received_at - LATE_SAMPLE_AFTER
        if message.ts_suspect:
            times = [row[ROW_TS] for row in message.rows if not row[ROW_SUSPECT]]
            if not times:
                continue
        else:
            times = [row[ROW_TS] for row in message.rows]
        first, last = min(times), max(times)
        if first >= cutoff:
            continue
        hour = _hour(first)
        if last < cutoff and last < hour + ONE_HOUR:
            late.add((message.device_id, hour))
        else:
            late.update((message.device_id, _hour(ts)) for ts in times if ts < cutoff)
    return late


def _hour(ts: datetime) -> datetime:
    return ts.replace(minute=0, second=0, microsecond=0)


def mark_late_hours(conn: Conn, messages: list[TelemetryIn]) -> None:
    """Mark for recompute the rollup hours that ``messages`` bring late samples to."""
    late = late_hours(messages)
    if late:
        conn.execute(
            "INSERT INTO rollup_dirty (device_id, hour)"
            " SELECT * FROM unnest(%b::text[], %b::timestamptz[]) ON CONFLICT DO NOTHING",
            [[d for d, _ in late], [h for _, h in late]],
        )
