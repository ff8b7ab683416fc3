"""Each message of a batch stored as its own row, keyed so that a redelivery adds nothing.

Telemetry (``telemetry_messages``, the ledger its samples hang off), events and state
reports are keyed by ``(device_id, seq)``; each insert returns the keys that were new, which
is how the writer tells new messages from the rest, and stores the payload's CRC-32 for
:mod:`services.ingest.redelivery` to compare. Presence is keyed by device and time. Dead
letters are copied as they come.
"""

from typing import LiteralString
from zlib import crc32

from psycopg.rows import args_row
from psycopg.types.json import Jsonb

from services.common.db import Conn
from services.ingest.decode import DeadLetter, EventIn, PresenceIn, StateIn, TelemetryIn


def _key(device_id: str, seq: int) -> tuple[str, int]:
    return device_id, seq


def _new_keys(
    conn: Conn, insert: LiteralString, columns: list[list[object]]
) -> set[tuple[str, int]]:
    """Run a keyed ``INSERT … ON CONFLICT DO NOTHING RETURNING device_id, seq`` of one row per
    element of ``columns``' lists; the keys that were new."""
    with conn.cursor(row_factory=args_row(_key)) as cur:
        return set(cur.execute(insert, columns).fetchall())


def insert_telemetry(
    conn: Conn, telemetry: dict[tuple[str, int], TelemetryIn]
) -> set[tuple[str, int]]:
    """Insert the telemetry ledger rows; return the keys that were new."""
    if not telemetry:
        return set()
    items = list(telemetry.values())
    return _new_keys(
        conn,
        """
        INSERT INTO telemetry_messages
            (device_id, seq, ts, session, samples, received_at, ts_suspect, payload_crc32)
        SELECT * FROM unnest(%b::text[], %b::int8[], %b::timestamptz[], %b::text[],
                             %b::int2[], %b::timestamptz[], %b::bool[], %b::int8[])
        ON CONFLICT DO NOTHING
        RETURNING device_id, seq""",
        [
            [t.device_id for t in items],
            [t.seq for t in items],
            [t.ts for t in items],
            [t.session for t in items],
            [len(t.rows) for t in items],
            [t.received_at for t in items],
            [t.ts_suspect for t in items],
            # zlib's CRC-32: 0.5 µs for a message of 10 samples, against 2.4 µs for an 8-byte
            # BLAKE2b. It only has to tell a resent payload from a different one.
            [crc32(t.payload) for t in items],
        ],
    )


def insert_events(conn: Conn, events: dict[tuple[str, int], EventIn]) -> set[tuple[str, int]]:
    """Insert the events; return the keys that were new."""
    if not events:
        return set()
    items = list(events.values())
    return _new_keys(
        conn,
        """
        INSERT INTO events (device_id, seq, ts, type, session, body, received_at, ts_suspect,
                            payload_crc32)
        SELECT device_id, seq, ts, type, session, body::jsonb, received_at, ts_suspect, crc
        FROM unnest(%b::text[], %b::int8[], %b::timestamptz[], %b::text[], %b::text[],
                    %b::text[], %b::timestamptz[], %b::bool[], %b::int8[])
             AS u(device_id, seq, ts, type, session, body, received_at, ts_suspect, crc)
        ON CONFLICT DO NOTHING
        RETURNING device_id, seq""",
        [
            [e.device_id for e in items],
            [e.event.seq for e in items],
            [e.ts for e in items],
            [e.event.type for e in items],
            [getattr(e.event, "session", None) for e in items],
            [e.body for e in items],
            [e.received_at for e in items],
            [e.ts_suspect for e in items],
            [crc32(e.payload) for e in items],
        ],
    )


def insert_states(conn: Conn, states: dict[tuple[str, int], StateIn]) -> set[tuple[str, int]]:
    """Insert the state reports; return the keys that were new."""
    if not states:
        return set()
    items = list(states.values())
    configs = [s.state.config for s in items]
    return _new_keys(
        conn,
        """
        INSERT INTO state_reports (device_id, seq, ts, fw, hw, config_version, config_sha256,
                                   config_status, config_reason, received_at, dropped,
                                   payload_crc32)
        SELECT * FROM unnest(%b::text[], %b::int8[], %b::timestamptz[], %b::text[], %b::text[],
                             %b::int4[], %b::text[], %b::text[], %b::text[], %b::timestamptz[],
                             %b::jsonb[], %b::int8[])
        ON CONFLICT DO NOTHING
        RETURNING device_id, seq""",
        [
            [s.device_id for s in items],
            [s.state.seq for s in items],
            [s.ts for s in items],
            [s.state.fw for s in items],
            [s.state.hw for s in items],
            [c.version if c else None for c in configs],
            [c.sha256 if c else None for c in configs],
            [c.status.value if c else None for c in configs],
            [c.reason.value if c and c.reason else None for c in configs],
            [s.received_at for s in items],
            [Jsonb(s.state.dropped.model_dump()) if s.state.dropped else None for s in items],
            [crc32(s.payload) for s in items],
        ],
    )


def insert_presence(conn: Conn, presences: list[PresenceIn]) -> int:
    """Log the presence messages; return how many were new."""
    if not presences:
        return 0
    # A device's own presence carries ts and is stored once; the last will has no ts (the
    # broker sends it), so a will redelivered after an ingest crash is logged again.
    rows = conn.execute(
        """
        INSERT INTO presence_log (device_id, online, ts, received_at)
        SELECT * FROM unnest(%b::text[], %b::bool[], %b::timestamptz[], %b::timestamptz[])
        ON CONFLICT DO NOTHING
        RETURNING id""",
        [
            [p.device_id for p in presences],
            [p.online for p in presences],
            [p.ts for p in presences],
            [p.received_at for p in presences],
        ],
    ).fetchall()
    return len(rows)


def insert_dead_letters(conn: Conn, dead: list[DeadLetter]) -> None:
    """Copy the dead letters in, whole."""
    with (
        conn.cursor() as cur,
        cur.copy(
            "COPY dead_letters (topic, device_id, channel, payload, payload_size, reason,"
            " detail, received_at) FROM STDIN"
        ) as copy,
    ):
        for d in dead:
            copy.write_row(
                (
                    d.topic,
                    d.device_id,
                    d.channel,
                    d.payload,
                    d.payload_size,
                    d.reason,
                    d.detail,
                    d.received_at,
                )
            )
