"""A lean closed-loop HTTP/1.1 load generator on asyncio protocols (uvloop).

It shares the cores with the server it measures, so it does little per request: requests
are formatted from a prepared head, responses are split on ``Content-Length`` without a
general HTTP parser, and each answer is checked (status and body) by a small function the
caller gives. Each client keeps one keep-alive connection and sends its next request when
the previous answer has arrived.
"""

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, cast

import uvloop

CONNECT_TIMEOUT_S: Final = 10.0
# Check = (path, status, body) -> None if the answer is right, else what is wrong.
Check = Callable[[str, int, bytes], str | None]


@dataclass
class Result:
    """Latencies (s) of requests completed inside the measured window, and what went wrong."""

    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str | None = None
    window_s: float = 0.0


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.lost: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or ConnectionError("the server closed the connection")
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(self.lost)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        head_end = self.buffer.find(b"\r\n\r\n")
        if head_end < 0 or self.waiter is None:
            return
        head = bytes(self.buffer[:head_end]).lower()
        at = head.find(b"content-length:")
        if at < 0:
            self.waiter.set_exception(ValueError("a response without Content-Length"))
            return
        line_end = head.find(b"\r\n", at)
        length = int(head[at + 15 : line_end if line_end >= 0 else len(head)])
        if len(self.buffer) < head_end + 4 + length:
            return
        status = int(head[9:12])
        body = bytes(self.buffer[head_end + 4 : head_end + 4 + length])
        del self.buffer[: head_end + 4 + length]
        waiter, self.waiter = self.waiter, None
        waiter.set_result((status, body))

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        if self.lost is not None:
            raise self.lost
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        return await self.waiter


async def _client(
    host: str,
    port: int,
    head: bytes,
    paths: Callable[[random.Random], str],
    check: Check,
    rng: random.Random,
    measure_from: float,
    measure_to: float,
    result: Result,
) -> None:
    loop = asyncio.get_running_loop()

    async def connect() -> _Connection:
        _, conn = await asyncio.wait_for(
            loop.create_connection(_Connection, host, port), CONNECT_TIMEOUT_S
        )
        return conn

    conn = await connect()
    try:
        while True:
            path = paths(rng)
            raw = b"GET " + path.encode() + head
            sent = time.perf_counter()
            if sent >= measure_to:
                return
            try:
                status, body = await conn.request(raw)
            except (ConnectionError, ValueError) as exc:
                # A failed request counts as an error; the next one gets a new connection.
                assert conn.transport is not None
                conn.transport.close()
                conn = await connect()
                status, body = 0, repr(exc).encode()
            took = time.perf_counter() - sent
            if sent < measure_from:
                continue
            problem = check(path, status, body)
            if problem is None:
                result.latencies.append(took)
            else:
                result.errors += 1
                if result.first_error is None:
                    result.first_error = f"{path}: {problem}"
    finally:
        assert conn.transport is not None
        conn.transport.close()


def run_load(
    host: str,
    port: int,
    headers: dict[str, str],
    paths: Callable[[random.Random], str],
    check: Check,
    *,
    clients: int,
    warmup_s: float,
    seconds: float,
    seed: int,
) -> Result:
    """``clients`` closed loops for ``warmup_s`` + ``seconds``; only the latter is measured."""
    head = (
        b" HTTP/1.1\r\nHost: "
        + host.encode()
        + b"\r\n"
        + b"".join(f"{k}: {v}\r\n".encode() for k, v in headers.items())
        + b"\r\n"
    )
    result = Result(window_s=seconds)

    async def main() -> None:
        start = time.perf_counter()
        measure_from, measure_to = start + warmup_s, start + warmup_s + seconds
        await asyncio.gather(
            *(
                _client(
                    host,
                    port,
                    head,
                    paths,
                    check,
                    random.Random(seed * 1000 + n),
                    measure_from,
                    measure_to,
                    result,
                )
                for n in range(clients)
            )
        )

    uvloop.run(main())
    return result


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile by nearest rank."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]
