"""The fleet's status report, from stand-in devices (no broker, no store)."""

from pathlib import Path
from types import SimpleNamespace

from device_agent.fleet import Fleet, FleetOptions
from device_agent.link import LinkStats


def _device(*, acks_overdue: bool, subscribe_refused: int = 0) -> SimpleNamespace:
    return SimpleNamespace(
        link=SimpleNamespace(
            connected=True,
            node=("127.0.0.1", 1883),
            acks_overdue=acks_overdue,
            stats=LinkStats(subscribe_refused=subscribe_refused),
        ),
        agent=SimpleNamespace(session=None),
        refusals=0,
    )


def test_the_status_counts_devices_whose_stored_acks_are_overdue_and_refused_subscriptions(
    tmp_path: Path,
) -> None:
    fleet = Fleet(
        FleetOptions(
            devices=3,
            credentials=tmp_path / "credentials.json",
            nodes=(("127.0.0.1", 1883),),
            public_keys=(bytes(32),),
            store=tmp_path / "fleet.sqlite3",
        )
    )
    fleet.devices = [  # type: ignore[list-item]
        _device(acks_overdue=True, subscribe_refused=2),
        _device(acks_overdue=False),
        _device(acks_overdue=True, subscribe_refused=1),
    ]

    status = fleet.status()

    assert status["acks_overdue"] == 2
    assert status["subscribe_refused"] == 3
