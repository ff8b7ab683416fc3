"""Child processes the stack starts: started, waited for, and stopped by their own pid."""

import os
import pwd
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

STOP_TIMEOUT_S = 20.0


def child_pids(pid: int) -> list[int]:
    """The live children of ``pid`` (Linux, from /proc)."""
    with open(f"/proc/{pid}/task/{pid}/children") as children:
        return [int(child) for child in children.read().split()]


def service_user() -> str | None:
    """The unprivileged account servers run as when Galvani is started by root.

    PostgreSQL refuses to run as root; Mosquitto warns and should not. ``None`` means the
    current (non-root) user runs them.
    """
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    return None


def chown_to(path: Path, user: str | None) -> None:
    """Give ``path`` (recursively) to ``user`` when servers run as another account."""
    if user is None:
        return
    entry = pwd.getpwnam(user)
    os.chown(path, entry.pw_uid, entry.pw_gid)
    for root, dirs, files in os.walk(path):
        os.chown(root, entry.pw_uid, entry.pw_gid)
        for name in dirs + files:
            os.chown(os.path.join(root, name), entry.pw_uid, entry.pw_gid, follow_symlinks=False)


@dataclass
class Child:
    """A process this stack started; stopped by its pid, never by name."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    _log: IO[bytes] | None = field(default=None, repr=False)
    # Set once asked to stop, so that ``stop`` does not send a second signal (to some servers,
    # uvicorn's among them, a second one means "stop now, drop what is in flight").
    _asked: bool = field(default=False, repr=False)

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self.process.pid

    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.process.poll() is None

    def log_tail(self, lines: int = 5) -> str:
        """The last lines of the child's log, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def ask_to_stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Send ``sig`` without waiting (``stop`` then waits), so children stop side by side."""
        if self.alive() and not self._asked:
            self.process.send_signal(sig)
            self._asked = True

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Ask the child to stop with ``sig`` (unless asked already); kill it if it has not
        stopped in time."""
        if self.alive():
            self.ask_to_stop(sig)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None


def spawn(
    name: str,
    argv: Sequence[str],
    log_path: Path,
    *,
    env: dict[str, str] | None = None,
    user: str | None = None,
    cwd: Path | None = None,
) -> Child:
    """Start ``argv`` in its own process group with output appended to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "ab")  # noqa: SIM115 - owned by the Child, closed in stop()
    process = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=cwd,
        user=user,
        # A new session: Ctrl-C in the terminal reaches the runner only, which then stops
        # each child in order (database last) instead of all of them at once.
        start_new_session=True,
    )
    return Child(name=name, process=process, log_path=log_path, _log=log)


def wait_until(check: Callable[[], bool], *, child: Child, timeout_s: float, what: str) -> None:
    """Poll ``check`` until it returns True; fail early when ``child`` exits."""
    deadline = time.monotonic() + timeout_s
    delay = 0.02
    while True:
        if check():
            return
        if not child.alive():
            child.stop()  # reaps it and closes its log
            raise ChildExited(
                f"{what} exited during start-up; its log ends with:\n{child.log_tail()}"
            )
        if time.monotonic() > deadline:
            raise ChildExited(
                f"{what} did not become ready within {timeout_s:.0f} s; "
                f"its log ends with:\n{child.log_tail()}"
            )
        time.sleep(delay)
        delay = min(delay * 2, 0.25)


def service_env(prefix: str, **values: str | int) -> dict[str, str]:
    """The process environment plus ``GALVANI_<PREFIX>_<KEY>`` settings."""
    env = dict(os.environ)
    env.update({f"GALVANI_{prefix}_{key.upper()}": str(value) for key, value in values.items()})
    return env


def http_get(
    url: str, timeout_s: float = 2.0, *, tls: ssl.SSLContext | None = None
) -> bytes | None:
    """The body of ``url``'s answer (a loopback endpoint), or None when it does not answer 200.
    An https URL is verified with ``tls`` (the system's trust store when None)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s, context=tls) as response:  # noqa: S310
            return bytes(response.read()) if response.status == 200 else None
    except (urllib.error.URLError, OSError):
        return None


def http_ok(url: str, *, tls: ssl.SSLContext | None = None) -> bool:
    """Whether ``url`` answers 200 (a readiness or health endpoint)."""
    return http_get(url, tls=tls) is not None


class ChildExited(RuntimeError):
    """A server stopped or never became ready."""
