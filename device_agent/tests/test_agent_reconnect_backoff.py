"""The reconnect backoff starts again only after a stable connection: a broker that accepts
the device and ends its session at once (a flood ban of a certificate device ends sessions by
takeover) meets a growing backoff, not a reconnect a second."""

import asyncio
from pathlib import Path

import pytest
from scripted_broker import Device, ScriptedBroker, run_linked

from device_agent import connection as connection_module


async def _hang_up_and_reconnect(device: Device, broker: ScriptedBroker) -> None:
    before = broker.connects
    broker.hang_up()
    await device.until(
        lambda: broker.connects > before and device.link.connected, "the link to reconnect"
    )


@pytest.mark.usefixtures("quick")
def test_short_connections_grow_the_backoff_and_a_stable_one_resets_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(connection_module, "STABLE_CONNECTION_S", 0.5)
    broker = ScriptedBroker()

    async def scenario(device: Device) -> None:
        connection = device.link._connection
        for ended in range(1, 5):
            await _hang_up_and_reconnect(device, broker)
            # Each connection ended within the stable time: one more step of backoff.
            assert connection._attempt == ended
        await asyncio.sleep(0.6)  # this connection is stable
        await _hang_up_and_reconnect(device, broker)
        assert connection._attempt == 1  # from the start again: one reconnect since

    run_linked(scenario, tmp_path, broker)
