"""Signed tables bound to their device, expiry checked when a table is applied, the applied
version kept across a wiped store, and the keys a device trusts during a key rotation
(issue 19, item 6). Fake clock, no broker."""

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from agent_rig import DURABLE, Rig
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from device_agent.anti_rollback import SUFFIX, AntiRollback, AntiRollbackError
from device_agent.arguments import read_public_keys
from device_agent.store import DeviceStore, open_database

SAFE_LOCK = ["LIFT", "TIGHTEN", "INFUSE"]


def _answer(rig: Rig) -> tuple[int, str, str | None]:
    config: dict[str, Any] = rig.states()[-1]["config"]
    return config["version"], config["status"], config["reason"]


def _public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _lock_to_safe(rig: Rig, version: int = 3) -> None:
    rig.agent.on_config(rig.clock.ms, rig.signed(version=version, locked_modes=SAFE_LOCK))
    assert _answer(rig) == (version, "applied", None)
    assert rig.agent.table.usable("LIFT") is None


def test_a_table_signed_for_another_device_is_rejected_and_keeps_the_safe_lock(rig: Rig) -> None:
    _lock_to_safe(rig, 3)
    # Device A's table (version 50, nothing locked), republished on this device's config topic.
    rig.agent.on_config(rig.clock.ms, rig.signed(version=50, device="dev-0777"))
    assert _answer(rig) == (50, "rejected", "wrong_device")
    assert rig.agent.table.version == 3
    assert rig.agent.table.usable("LIFT") is None
    stored = rig.store.get("table")
    assert isinstance(stored, dict)
    assert stored["version"] == 3


def test_a_table_naming_no_device_is_rejected_as_unbound(rig: Rig) -> None:
    rig.agent.on_config(rig.clock.ms, rig.signed(version=4, device=None))
    assert _answer(rig) == (4, "rejected", "unbound_table")
    assert rig.agent.table.version == 0


def test_a_device_field_that_is_not_a_string_is_malformed(rig: Rig) -> None:
    rig.agent.on_config(rig.clock.ms, rig.signed(version=4, device=7))
    assert _answer(rig) == (4, "rejected", "malformed")


def test_a_table_that_expires_while_it_waits_for_the_session_is_rejected_when_applied(
    rig: Rig,
) -> None:
    rig.start(seconds=30)
    rig.run(5_000)
    # Valid on receipt (expires 10 s from now), but the session has 25 s to go.
    rig.agent.on_config(rig.clock.ms, rig.signed(version=6, expires_at=rig.clock.ms + 10_000))
    assert rig.agent.pending_table is not None
    rig.run(30_000)
    assert rig.events("session_end")
    assert rig.agent.pending_table is None
    assert rig.agent.table.version == 0
    assert _answer(rig) == (6, "rejected", "expired")


def test_a_waiting_table_still_valid_at_the_end_of_the_session_is_applied(rig: Rig) -> None:
    rig.start(seconds=10)
    rig.run(2_000)
    rig.agent.on_config(rig.clock.ms, rig.signed(version=6, expires_at=rig.clock.ms + 60_000))
    rig.run(15_000)
    assert _answer(rig) == (6, "applied", None)


def _wipe_store(rig: Rig) -> None:
    """A factory reset: the store database (and its WAL) deleted, the agent started afresh."""
    rig.conn.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{rig.path}{suffix}").unlink(missing_ok=True)
    rig.conn = open_database(rig.path, durable=DURABLE)
    rig.store = DeviceStore(rig.conn, "dev-0001", rig.limits)
    rig.agent = rig.new_agent()
    rig.agent.boot(rig.clock.ms)


def test_a_wiped_store_still_refuses_an_older_table_and_keeps_the_lock(rig: Rig) -> None:
    older = rig.signed(version=4)  # a valid table from before the lock, nothing locked
    rig.agent.on_config(rig.clock.ms, older)
    _lock_to_safe(rig, 5)
    _wipe_store(rig)
    assert rig.store.get("table") is None
    assert rig.agent.table.version == 5, "the wiped device forgot the table it applied"
    assert rig.agent.table.usable("LIFT") is None

    rig.agent.on_config(rig.clock.ms, older)
    assert _answer(rig) == (4, "rejected", "stale_version")
    assert rig.agent.table.version == 5


def test_the_running_table_redelivered_to_a_wiped_store_is_answered_applied(rig: Rig) -> None:
    raw = rig.signed(version=5, locked_modes=SAFE_LOCK)
    rig.agent.on_config(rig.clock.ms, raw)
    _wipe_store(rig)
    rig.agent.on_config(rig.clock.ms, raw)  # the broker's retained table, on reconnect
    assert _answer(rig) == (5, "applied", None)
    assert rig.store.get("table") == json.loads(raw)
    rig.agent.on_config(rig.clock.ms, rig.signed(version=6))
    assert _answer(rig) == (6, "applied", None)


def test_the_anti_rollback_record_only_rises_and_sits_beside_the_store(rig: Rig) -> None:
    rig.agent.on_config(rig.clock.ms, rig.signed(version=7))
    floor = AntiRollback(Path(f"{rig.path}{SUFFIX}"), "dev-0001")
    kept = floor.read()
    assert kept is not None
    assert kept.version == 7
    floor.raise_to(type(kept)(3, "00", {}))
    assert floor.read() == kept
    assert floor.path is not None
    floor.path.write_text("{not json")
    try:
        floor.read()
    except AntiRollbackError:
        pass
    else:
        raise AssertionError("an unreadable record was read as no record")


def test_a_table_signed_by_the_next_key_is_refused_until_the_device_trusts_it(rig: Rig) -> None:
    next_key = Ed25519PrivateKey.generate()
    rig.agent.on_config(rig.clock.ms, rig.signed(version=8, key=next_key))
    assert _answer(rig) == (8, "rejected", "bad_signature")
    assert rig.agent.table.version == 0

    rig.also_trusted = [_public(next_key)]  # provisioned with the next key before it is used
    rig.restart()
    rig.agent.on_config(rig.clock.ms, rig.signed(version=9, key=next_key))
    assert _answer(rig) == (9, "applied", None)
    rig.agent.on_config(rig.clock.ms, rig.signed(version=10))  # the current key still works
    assert _answer(rig) == (10, "applied", None)


def test_a_kid_naming_a_trusted_key_does_not_let_another_key_sign(rig: Rig) -> None:
    trusted_kid = json.loads(rig.signed())["kid"]
    # Signed by an untrusted key over content that names the trusted key's id.
    forged = rig.signed(version=8, key=Ed25519PrivateKey.generate(), kid=trusted_kid)
    rig.agent.on_config(rig.clock.ms, forged)
    assert _answer(rig) == (8, "rejected", "bad_signature")


def test_the_key_file_holds_the_trusted_keys_one_a_line(tmp_path: Path) -> None:
    current, upcoming = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    path = tmp_path / "config-public-key"
    lines = [base64.b64encode(_public(k)).decode() for k in (current, upcoming)]
    path.write_text(f"# current\n{lines[0]}\n\n{lines[1]}  # next, from the rotation\n")
    assert read_public_keys(path) == (_public(current), _public(upcoming))
    path.write_text(f"{lines[0]}\nnot-a-key\n")
    with pytest.raises(SystemExit, match=":2: not"):
        read_public_keys(path)
