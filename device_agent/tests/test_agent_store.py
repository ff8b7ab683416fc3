"""The rest of the device agent's SQLite store: small state, session history, the file.

The outbox: test_agent_outbox.py and test_agent_outbox_limits.py. Every test uses a real
database file under tmp_path; reopening it is how a restart is shown.
"""

import sqlite3
from pathlib import Path

import pytest
from device_agent.store import DeviceStore, SessionRecord, open_database, total_backlog
from store_helpers import DEVICE, T0, Opener, send

# -- small state ---------------------------------------------------------------------------


def test_get_and_put_round_trip_json_and_survive_reopen(db: Opener) -> None:
    conn = db()
    store = DeviceStore(conn, DEVICE)
    table = {"version": 7, "modes": {"LIFT": {"i_max_ua": 400}}, "locked_modes": ["INFUSE"]}
    assert store.get("table") is None
    store.put("table", table)
    store.put("config_seen", "ab12")
    store.put("config_seen", "cd34")
    conn.close()

    store = DeviceStore(db(), DEVICE)
    assert store.get("table") == table
    assert store.get("config_seen") == "cd34"
    assert store.get("missing") is None


def test_state_of_one_device_is_invisible_to_another(db: Opener) -> None:
    conn = db()
    DeviceStore(conn, "dev-a").put("table", {"version": 1})
    assert DeviceStore(conn, "dev-b").get("table") is None


def test_put_refuses_what_json_cannot_carry(db: Opener) -> None:
    store = DeviceStore(db(), DEVICE)
    with pytest.raises(ValueError):
        store.put("progress", {"output_s": float("nan")})
    assert store.get("progress") is None


# -- session history -----------------------------------------------------------------------

MIN_MS = 60_000


def test_sessions_are_recorded_and_ended(db: Opener) -> None:
    conn = db()
    store = DeviceStore(conn, DEVICE)
    assert store.last_session() is None
    store.record_session_start("s-1", "LIFT", T0)
    assert store.last_session() == SessionRecord("s-1", "LIFT", T0, None, 0.0)
    store.record_session_end("s-1", T0 + 5 * MIN_MS, 290.5)
    conn.close()

    store = DeviceStore(db(), DEVICE)
    assert store.last_session() == SessionRecord("s-1", "LIFT", T0, T0 + 5 * MIN_MS, 290.5)
    assert store.open_session() is None


def test_sessions_since_includes_only_sessions_started_at_or_after(db: Opener) -> None:
    store = DeviceStore(db(), DEVICE)
    for n, started in enumerate([T0, T0 + 10 * MIN_MS, T0 + 20 * MIN_MS]):
        store.record_session_start(f"s-{n}", "LIFT", started)
        store.record_session_end(f"s-{n}", started + 15 * MIN_MS, 600.0)

    # s-0 ended after the cut-off but started before it: not counted.
    since = store.sessions_since(T0 + 10 * MIN_MS)
    assert [s.session_id for s in since] == ["s-1", "s-2"]
    assert [s.session_id for s in store.sessions_since(T0)] == ["s-0", "s-1", "s-2"]
    assert store.sessions_since(T0 + 21 * MIN_MS) == []


def test_last_session_is_the_one_started_last(db: Opener) -> None:
    store = DeviceStore(db(), DEVICE)
    store.record_session_start("s-late", "TONE", T0 + MIN_MS)
    store.record_session_start("s-early", "LIFT", T0)
    last = store.last_session()
    assert last is not None
    assert last.session_id == "s-late"


def test_open_session_is_the_latest_one_never_ended(db: Opener) -> None:
    store = DeviceStore(db(), DEVICE)
    store.record_session_start("s-1", "LIFT", T0)
    store.record_session_start("s-2", "TONE", T0 + MIN_MS)
    store.record_session_start("s-3", "LIFT", T0 + 2 * MIN_MS)
    store.record_session_end("s-3", T0 + 3 * MIN_MS, 60.0)

    cut = store.open_session()
    assert cut is not None
    assert (cut.session_id, cut.ended_ms) == ("s-2", None)
    store.record_session_end("s-2", T0 + 2 * MIN_MS, 30.0)
    cut = store.open_session()
    assert cut is not None
    assert cut.session_id == "s-1"


def test_prune_sessions_forgets_those_started_before(db: Opener) -> None:
    store = DeviceStore(db(), DEVICE)
    for n in range(4):
        store.record_session_start(f"s-{n}", "LIFT", T0 + n * MIN_MS)
    store.prune_sessions(T0 + 2 * MIN_MS)
    assert [s.session_id for s in store.sessions_since(0)] == ["s-2", "s-3"]


def test_session_history_is_per_device(db: Opener) -> None:
    conn = db()
    DeviceStore(conn, "dev-a").record_session_start("s-1", "LIFT", T0)
    other = DeviceStore(conn, "dev-b")
    assert other.sessions_since(0) == []
    assert other.open_session() is None
    other.prune_sessions(T0 + MIN_MS)
    assert DeviceStore(conn, "dev-a").open_session() is not None


# -- the file ------------------------------------------------------------------------------


def test_the_database_is_in_wal_mode(db: Opener) -> None:
    conn = db()
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL: a device's flash


def test_the_fleet_simulator_database_syncs_at_checkpoints_only(tmp_path: Path) -> None:
    conn = open_database(tmp_path / "fleet.sqlite3", durable=False)
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    conn.close()


def test_a_database_from_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "agent.db"
    open_database(path).close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(RuntimeError, match="schema 99"):
        open_database(path)


def test_total_backlog_sums_every_device_in_the_database(db: Opener) -> None:
    conn = db()
    first, second = DeviceStore(conn, "dev-a"), DeviceStore(conn, "dev-b")
    send(first, "events", 100)
    send(first, "telemetry", 200)
    send(second, "state", 50)
    assert total_backlog(conn) == (3, 350)
    first.delete(m.id for m in first.pending(limit=1))
    assert total_backlog(conn) == (2, 250)
    assert (first.enqueued, second.enqueued) == (2, 1)
