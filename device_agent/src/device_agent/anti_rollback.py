"""The highest mode table a device has applied, kept where wiping its store does not reach.

A device refuses any table not newer than the one it runs. That check alone reads the store,
so deleting the store (a "factory reset") would let the device accept any old table the cloud
ever signed for it, for example one from before a rule locked it into SAFE. So each applied
table is also written here, beside the store database and outside it: a small file per
device, only ever raised, written atomically (temporary file, fsync, rename, fsync of the
directory). A wiped store comes back with this record and the agent restores the table in it.

On a real device this lives in storage a factory reset leaves alone (a protected flash page,
an RPMB partition); the simulator's stand-in is ``<store file>.anti-rollback/<device>.json``.
A store with no file (SQLite ``:memory:``) keeps the record in memory only.
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

SUFFIX: Final = ".anti-rollback"


class AntiRollbackError(RuntimeError):
    """The record exists but cannot be read: the agent refuses to guess a lower floor."""


@dataclass(frozen=True, slots=True)
class AppliedRecord:
    """The newest table the device has applied: its version, fingerprint and payload."""

    version: int
    sha256: str
    table: Mapping[str, object]


class AntiRollback:
    """One device's applied-table record, beside (not inside) its store database."""

    def __init__(self, directory: Path | None, device_id: str) -> None:
        self.path = None if directory is None else directory / f"{device_id}.json"
        self._memory: AppliedRecord | None = None

    @classmethod
    def beside(cls, conn: sqlite3.Connection, device_id: str) -> AntiRollback:
        """The record beside the database file ``conn`` has open (in memory for ``:memory:``)."""
        rows = conn.execute("PRAGMA database_list").fetchall()
        main = next((row[2] for row in rows if row[1] == "main"), "")
        directory = Path(main + SUFFIX) if main else None
        return cls(directory, device_id)

    def read(self) -> AppliedRecord | None:
        """The record, or None if this device has never applied a cloud table."""
        if self.path is None:
            return self._memory
        try:
            data = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise AntiRollbackError(f"cannot read {self.path}: {exc}") from None
        version, sha256, table = data.get("version"), data.get("sha256"), data.get("table")
        if type(version) is not int or not isinstance(sha256, str) or not isinstance(table, dict):
            raise AntiRollbackError(f"{self.path} is not an applied-table record")
        return AppliedRecord(version, sha256, table)

    def raise_to(self, record: AppliedRecord) -> None:
        """Keep ``record`` if it is newer than the one kept; never lower it."""
        kept = self.read()
        if kept is not None and kept.version >= record.version:
            return
        if self.path is None:
            self._memory = record
            return
        body = {"version": record.version, "sha256": record.sha256, "table": dict(record.table)}
        directory = self.path.parent
        directory.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=directory, prefix=".applied-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(json.dumps(body, separators=(",", ":")).encode())
                handle.flush()
                os.fsync(handle.fileno())
            # rename(2) replaces atomically: a power loss leaves the old record or the new one.
            os.replace(name, self.path)
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise
        # The rename is durable only once the directory entry is: fsync the directory too.
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
