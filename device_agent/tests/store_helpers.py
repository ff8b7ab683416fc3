"""What the store's tests share: a device id, a start time, and messages of a chosen size."""

import json
import sqlite3
from collections.abc import Callable

from device_agent.store import DeviceStore

T0 = 1_763_805_600_000
DEVICE = "dev-0001"

Opener = Callable[[], sqlite3.Connection]


def message(size: int) -> Callable[[int], bytes]:
    """A build() whose payload carries its seq and is exactly size bytes long."""

    def build(seq: int) -> bytes:
        body = json.dumps({"seq": seq}).encode()
        assert len(body) <= size
        return body.ljust(size)

    return build


def send(store: DeviceStore, channel: str, size: int = 100, now_ms: int = T0) -> int:
    return store.enqueue(channel, message(size), now_ms=now_ms)


def seqs(store: DeviceStore) -> list[int]:
    return [m.seq for m in store.pending(limit=1_000_000)]
