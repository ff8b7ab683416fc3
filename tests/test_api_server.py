"""``python -m services.api.main`` with several server processes: connections spread across
them, a dead one replaced, and none left behind when the supervisor stops or dies."""

import contextlib
import http.client
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from deploy.stack.ports import TCP_ESTABLISHED, TCP_LISTEN, free_port, listeners, tcp_sockets
from deploy.stack.processes import child_pids
from tests.api import auth

START_TIMEOUT_S = 30.0
REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Api:
    supervisor: subprocess.Popen[bytes]
    port: int

    def servers(self) -> list[int]:
        """The pids of the live server processes (not multiprocessing's helpers)."""
        return [
            child for child in child_pids(self.supervisor.pid) if b"spawn_main" in _cmdline(child)
        ]

    def get(self, path: str, key: str | None = None) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            conn.request("GET", path, headers=auth(key) if key else {})
            return conn.getresponse().status
        finally:
            conn.close()


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists() and b"zombie" not in _status(pid)


def _status(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/status").read_bytes().lower()
    except OSError:
        return b""


def _wait(condition: "object", what: str, timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@contextmanager
def api_processes(database_url: str, tmp_path: Path, workers: int) -> Iterator[Api]:
    port = free_port()
    env = dict(os.environ)
    env.update(
        {
            "GALVANI_API_DATABASE_URL": database_url,
            "GALVANI_API_MQTT_PASSWORD": "x",
            "GALVANI_API_DATA_DIR": str(tmp_path),
            "GALVANI_API_PORT": str(port),
            "GALVANI_API_WORKERS": str(workers),
        }
    )
    log = (tmp_path / "api.log").open("wb")
    supervisor = subprocess.Popen(
        [sys.executable, "-m", "services.api.main"],
        cwd=REPO_ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    api = Api(supervisor, port)
    try:
        _wait(lambda: len(api.servers()) == workers, f"{workers} server processes")
        _wait(lambda: listeners(port) == workers, "every server process to listen")
        assert _all_listening(api), "each server process has a listening socket of its own"
        _wait(lambda: _answers(api), "the API to answer")
        yield api
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait()
        log.close()


def _answers(api: Api) -> bool:
    try:
        return api.get("/healthz") == 200
    except OSError:
        return False


def _sockets_by_server(api: Api, state: str) -> dict[int, int]:
    """Sockets on the API's port in ``state``, counted by the server process holding them:
    each process's socket inodes against /proc/net/tcp's."""
    wanted = tcp_sockets(api.port, state)
    counts = {}
    for pid in api.servers():
        inodes = set()
        with contextlib.suppress(OSError):  # a process that has just exited
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("socket:["):
                        inodes.add(target[len("socket:[") : -1])
        counts[pid] = len(inodes & wanted)
    return counts


def _all_listening(api: Api) -> bool:
    listening = _sockets_by_server(api, TCP_LISTEN)
    return len(listening) > 0 and all(count == 1 for count in listening.values())


def _burst_of_connections(port: int, count: int) -> list[http.client.HTTPConnection]:
    """``count`` connections opened at once, as a client's pool opens them: every SYN is sent
    before the first is accepted."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    for sock in sockets:
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", port))
    _, writable, _ = select.select([], sockets, [], 5)
    assert len(writable) == count, "not every connection was established"
    clients = []
    for sock in sockets:
        sock.setblocking(True)
        client = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        client.sock = sock
        clients.append(client)
    return clients


def test_a_burst_of_keep_alive_connections_is_spread_over_the_server_processes(
    database_url: str, keys: dict[str, str], tmp_path: Path
) -> None:
    with api_processes(database_url, tmp_path, workers=2) as api:
        clients = _burst_of_connections(api.port, 20)
        try:
            for client in clients:
                client.request("GET", "/v1/fleet/summary", headers=auth(keys["viewer"]))
                answer = client.getresponse()
                answer.read()
                assert answer.status == 200
            counts = _sockets_by_server(api, TCP_ESTABLISHED)
        finally:
            for client in clients:
                client.close()
    assert sum(counts.values()) == 20
    # One socket per process: the kernel hashes each connection to one of them. With a
    # shared socket, the first process woken accepted all 20.
    assert all(count > 0 for count in counts.values()), counts


def test_a_killed_server_process_is_replaced_and_sigterm_stops_them_all(
    database_url: str, tmp_path: Path
) -> None:
    with api_processes(database_url, tmp_path, workers=2) as api:
        first, second = api.servers()
        os.kill(first, signal.SIGKILL)
        _wait(
            lambda: first not in api.servers() and len(api.servers()) == 2,
            "a replacement server process",
        )
        _wait(lambda: _answers(api), "the API to answer again")
        servers = api.servers()
        assert second in servers
        api.supervisor.send_signal(signal.SIGTERM)
        assert api.supervisor.wait(timeout=30) == 0
        assert not any(_alive(pid) for pid in servers)


def test_the_server_processes_stop_when_the_supervisor_is_killed(
    database_url: str, tmp_path: Path
) -> None:
    with api_processes(database_url, tmp_path, workers=2) as api:
        servers = api.servers()
        api.supervisor.kill()
        api.supervisor.wait()
        _wait(lambda: not any(_alive(pid) for pid in servers), "the servers to stop", 15)
        with pytest.raises(OSError):
            api.get("/healthz")
