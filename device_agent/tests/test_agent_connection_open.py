"""A connection attempt to a node whose kernel completes the TCP handshake and which then
answers nothing (stopped with SIGSTOP, or wedged) must not hold the event loop: a fleet's
devices share one, and paho's TLS handshake waits 5 s for such a node."""

import asyncio
import random
import socket
import ssl

import pytest
from device_agent.connection import MQTT_311, BrokerAddress, Connection
from device_agent.link import LinkStats

WATCH_S = 2.0
TICK_S = 0.05


async def _worst_stall(port: int) -> float:
    """Watch the loop while a device tries a TLS node at ``port``; the longest tick."""
    loop = asyncio.get_running_loop()
    address = BrokerAddress(
        "127.0.0.1",
        port,
        "secret",
        ca_file="unused: the context is given",
        tls_context=ssl.create_default_context(),
        protocol=MQTT_311,
    )
    connection = Connection(
        "dev-00001",
        address,
        loop=loop,
        rng=random.Random(1),
        backoff_max_s=1.0,
        subscriptions={},
        max_inflight=1,
        stats=LinkStats(),
        on_connected=lambda: None,
        on_forget=lambda: None,
        on_publish=lambda *_: None,
        on_message=lambda *_: None,
    )
    started = last = loop.time()
    loop.call_soon(connection.start)
    worst = 0.0
    while last - started < WATCH_S:
        await asyncio.sleep(TICK_S)
        now = loop.time()
        worst = max(worst, now - last)
        last = now
        connection.service()
    assert not connection.connected
    connection.stop()
    # The handshake on its thread ends at paho's connect timeout; the loop stays until then.
    for _ in range(int(10 / TICK_S)):
        if connection._opening is None:
            break
        await asyncio.sleep(TICK_S)
    return worst


# paho leaves the socket of a timed-out TLS handshake to the garbage collector, which warns.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_node_that_answers_nothing_does_not_hold_the_loop() -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes handshakes; nothing ever accepts or answers
        worst = asyncio.run(_worst_stall(silent.getsockname()[1]))
    assert worst < 0.5, f"the loop stalled {worst:.1f} s"
