"""Fixtures the device agent's tests share: a store database, an agent rig, quick backoffs
and the stored-ack timeouts on a fake clock."""

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_rig import Rig
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from device_agent.store import open_database
from scripted_broker import FakeClock
from store_helpers import Opener

from device_agent import connection as connection_module
from device_agent import puback as puback_module
from device_agent import unstored as unstored_module


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Opener]:
    """Opens the test's database file; every connection it opened is closed afterwards."""
    opened: list[sqlite3.Connection] = []

    def open_() -> sqlite3.Connection:
        opened.append(open_database(tmp_path / "agent.db"))
        return opened[-1]

    yield open_
    for conn in opened:
        conn.close()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    rig = Rig(tmp_path / "agent.sqlite3", Ed25519PrivateKey.generate())
    yield rig
    rig.conn.close()


@pytest.fixture
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    """Backoffs in tens of milliseconds (the stored-ack timeouts run on a fake clock)."""
    monkeypatch.setattr(connection_module, "BACKOFF_MIN_S", 0.02)
    monkeypatch.setattr(puback_module, "RETRY_BACKOFF_MIN_S", 0.05)
    monkeypatch.setattr(puback_module, "RETRY_BACKOFF_MAX_S", 0.1)


@pytest.fixture
def ack_timeouts(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """The stored-ack timeouts as shipped (30 s doubling to 480 s), on a fake clock."""
    monkeypatch.setattr(unstored_module, "ACK_TIMEOUT_S", 30.0)
    monkeypatch.setattr(unstored_module, "ACK_TIMEOUT_MAX_S", 480.0)
    return FakeClock()
