"""The device agent as the suite runs it: ``galvani-agent run --simulate`` as a real process
with its own store and key, watched through its log and its SQLite outbox."""

import os
import re
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from services.common.signing import public_key_b64
from tests.ingest import REPO_ROOT, Device
from tests.mqtt import suite_ca_file


class AgentProcess:
    """``galvani-agent run --simulate`` as a subprocess with its own store and key."""

    def __init__(
        self,
        tmp_path: Path,
        device: Device,
        port: int,
        key: Ed25519PrivateKey,
        ca_file: Path | None = None,
    ) -> None:
        """``ca_file``: the CA the agent verifies the broker against (default: the run's;
        the agent connects in plaintext when neither is set)."""
        self.tmp_path = tmp_path
        self.ca_file = ca_file or suite_ca_file()
        self.device = device
        self.port = port
        self.public_key = tmp_path / "config-public-key"
        self.public_key.write_text(public_key_b64(key))
        self.log = tmp_path / f"{device.device_id}.log"
        self.store = tmp_path / "agent.sqlite3"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, *args: str) -> None:
        env = {**os.environ, "GALVANI_AGENT_PASSWORD": self.device.password}
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "device_agent.cli",
                    "run",
                    "--simulate",
                    f"--device-id={self.device.device_id}",
                    f"--port={self.port}",
                    f"--public-key={self.public_key}",
                    f"--store={self.store}",
                    "--backoff-max=2",
                    "--seed=1",
                    *([f"--ca-file={self.ca_file}"] if self.ca_file else []),
                    *args,
                ],
                env=env,
                cwd=REPO_ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)

    def kill(self) -> None:
        """SIGKILL: no drain, no DISCONNECT; the last will says offline."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def delivered(self) -> set[int]:
        """Seqs whose PUBACK 0x00 the agent has received (logged with ``--verbose``)."""
        pattern = rf"{re.escape(self.device.device_id)}: seq (\d+) delivered$"
        return {int(seq) for seq in re.findall(pattern, self.log_text(), re.MULTILINE)}

    def outbox(self, channel: str | None = None) -> list[int]:
        """Seqs in the agent's outbox now (read beside the running agent; WAL allows it)."""
        rows = self._query(
            "SELECT seq FROM outbox WHERE device_id = ? AND channel = coalesce(?, channel)"
            " ORDER BY seq",
            [self.device.device_id, channel],
        )
        return [seq for (seq,) in rows]

    def last_seq(self) -> int:
        """The last seq the agent handed out; 0 before its store exists."""
        rows = self._query(
            "SELECT last_seq FROM devices WHERE device_id = ?", [self.device.device_id]
        )
        return int(rows[0][0]) if rows else 0

    def _query(self, query: str, params: list[object]) -> list[tuple[Any, ...]]:
        try:
            # mode=rw: never create the file the agent has not created yet.
            conn = sqlite3.connect(f"file:{self.store}?mode=rw", uri=True)
        except sqlite3.OperationalError:
            return []
        try:
            return conn.execute(query, params).fetchall()
        except sqlite3.OperationalError:  # the agent is still creating its schema
            return []
        finally:
            conn.close()
