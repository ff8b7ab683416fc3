"""The API's server processes: each a uvicorn server with a listening socket of its own on the
shared port (``SO_REUSEPORT``), so the kernel spreads new connections across them.

uvicorn's own ``--workers`` shares one socket between the processes, and the process that is
woken first accepts every connection waiting. A burst of keep-alive connections (a proxy's
upstream pool, a load balancer's, twenty dashboards opened at once) then lands on one process
while the others idle: measured with ``make bench-api``, one process at 100 % of a core and
the other at 1 % (``bench/README.md``). With a socket per process, the kernel picks the
process by a hash of each connection's addresses.

The supervisor starts ``workers`` processes, starts another when one dies, and on SIGTERM or
SIGINT stops them all (each finishes the requests it has) before it exits. A process that dies
within :data:`MIN_UPTIME_S` of its start counts as a failure to start; after
:data:`MAX_QUICK_FAILURES` in a row (a port that cannot be bound, a broken configuration), the
supervisor stops instead of restarting forever.
"""

import ctypes
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Final

import uvicorn

from services.api.settings import ApiSettings
from services.common.logs import configure_logging

log = logging.getLogger(__name__)

APP: Final = "services.api.main:app_from_environment"
BACKLOG: Final = 2048  # uvicorn's default
MIN_UPTIME_S: Final = 10.0
MAX_QUICK_FAILURES: Final = 3
STOP_TIMEOUT_S: Final = 15.0
_PR_SET_PDEATHSIG: Final = 1


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket listening on ``host:port`` that other sockets (of this user) may share."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def config(settings: ApiSettings) -> uvicorn.Config:
    """uvicorn's configuration of a server process: HTTPS when ``settings.tls`` is on (the
    settings refuse TLS on without its certificate and key files)."""
    tls = settings.tls
    return uvicorn.Config(
        APP,
        factory=True,
        log_level="warning",
        ssl_certfile=str(settings.tls_cert_file) if tls and settings.tls_cert_file else None,
        ssl_keyfile=str(settings.tls_key_file) if tls and settings.tls_key_file else None,
    )


def serve() -> None:
    """Run one server process until SIGTERM or SIGINT (settings from ``GALVANI_API_*``)."""
    settings = ApiSettings()
    configure_logging(settings.log_level)
    sock = listening_socket(settings.host, settings.port)
    server = uvicorn.Server(config(settings))
    server.run(sockets=[sock])
    if not server.started:
        raise SystemExit("the API did not start (see the log above)")


def _serve_child(supervisor: int) -> None:
    """A supervised process: as :func:`serve`, and stopped if the supervisor dies (even by
    SIGKILL), so no server is left holding the port."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != supervisor:  # it died before the line above
        return
    serve()


@dataclass
class _Worker:
    process: BaseProcess
    started: float


def supervise(workers: int) -> int:
    """Run ``workers`` server processes until SIGTERM or SIGINT; the exit status."""
    context = multiprocessing.get_context("spawn")
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("received %s: stopping the API", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def start() -> _Worker:
        process = context.Process(
            target=_serve_child, args=(os.getpid(),), name="galvani-api", daemon=False
        )
        process.start()
        return _Worker(process, time.monotonic())

    running = [start() for _ in range(workers)]
    log.info("API started: %d server processes", workers)
    quick_failures = 0
    status = 0
    while not stop.wait(0.5):
        for n, worker in enumerate(running):
            if worker.process.is_alive():
                continue
            lived_s = time.monotonic() - worker.started
            log.error(
                "API server process %s exited (status %s) after %.1f s",
                worker.process.pid,
                worker.process.exitcode,
                lived_s,
            )
            quick_failures = quick_failures + 1 if lived_s < MIN_UPTIME_S else 0
            if quick_failures >= MAX_QUICK_FAILURES:
                log.error("API server processes keep failing to start: stopping")
                status = 1
                stop.set()
                break
            running[n] = start()
    for worker in running:
        if worker.process.is_alive():
            worker.process.terminate()
    for worker in running:
        worker.process.join(STOP_TIMEOUT_S)
        if worker.process.is_alive():
            log.warning("API server process %s did not stop: killing it", worker.process.pid)
            worker.process.kill()
            worker.process.join()
    return status
