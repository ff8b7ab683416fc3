"""Every service's metrics address is a setting: notify, maintenance and the auth-callout
responder listen on ``GALVANI_<SERVICE>_METRICS_HOST`` (default 127.0.0.1), as the workers
do, so a pod can bind 0.0.0.0 for its kubelet's probes and Prometheus (deploy/k8s).

Live: maintenance (needs only its database) and the responder's metrics endpoint as its main
opens it once it serves; the notification dispatcher's is tested in
tests/test_notify_dispatcher.py. Each is bound to 127.0.0.2, another loopback address, so
answering there and refusing 127.0.0.1 shows the setting is what it binds.
"""

import os
import socket
import urllib.request
from pathlib import Path

import pytest
from pydantic_settings import BaseSettings

from deploy.stack.ports import free_port
from services.broker_access.main import serving
from services.broker_access.settings import BrokerAccessSettings
from services.maintenance.settings import MaintenanceSettings
from services.notify.settings import NotifySettings
from tests.ingest import wait_until
from tests.maintenance import spawn_maintenance

OTHER_LOOPBACK = "127.0.0.2"
REQUIRED: dict[type[BaseSettings], dict[str, str]] = {
    NotifySettings: {"database_url": "postgresql://n@h/db"},
    MaintenanceSettings: {"database_url": "postgresql://m@h/db"},
    BrokerAccessSettings: {
        "database_url": "postgresql://b@h/db",
        "mqtt_password": "pw",
        "nats_urls": "nats://127.0.0.1:4222",
    },
}


@pytest.mark.parametrize("settings", list(REQUIRED), ids=lambda s: s.__name__)
def test_metrics_host_defaults_to_loopback_and_is_read_from_the_environment(
    settings: type[BaseSettings], monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = str(settings.model_config.get("env_prefix"))
    for name in [n for n in os.environ if n.startswith(prefix)]:
        monkeypatch.delenv(name)
    assert settings(**REQUIRED[settings]).metrics_host == "127.0.0.1"  # type: ignore[attr-defined]
    monkeypatch.setenv(f"{prefix}METRICS_HOST", "0.0.0.0")  # noqa: S104 - what a pod binds
    assert settings(**REQUIRED[settings]).metrics_host == "0.0.0.0"  # type: ignore[attr-defined]  # noqa: S104


def answers(host: str, port: int) -> bool:
    """Whether ``http://host:port/metrics`` answers 200."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def assert_only_on_other_loopback(port: int) -> None:
    assert answers(OTHER_LOOPBACK, port)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_maintenance_serves_its_metrics_on_metrics_host(
    maintenance_database_url: str, tmp_path: Path
) -> None:
    port = free_port()
    maintenance = spawn_maintenance(
        maintenance_database_url,
        tmp_path / "maintenance.log",
        metrics_host=OTHER_LOOPBACK,
        metrics_port=port,
    )
    try:

        def serving() -> bool:
            assert maintenance.alive(), maintenance.log_tail(20)
            return answers(OTHER_LOOPBACK, port)

        wait_until(serving, 30, "maintenance's metrics on 127.0.0.2")
        assert_only_on_other_loopback(port)
    finally:
        maintenance.stop()


def test_the_responder_opens_its_metrics_on_metrics_host() -> None:
    """What services/broker_access/main.py runs once the responder serves (in this process:
    the endpoint's thread is a daemon and lives on until the test run ends)."""
    port = free_port()
    settings = BrokerAccessSettings(
        **REQUIRED[BrokerAccessSettings],  # type: ignore[arg-type]
        metrics_host=OTHER_LOOPBACK,
        metrics_port=port,
    )
    serving(settings)()
    assert_only_on_other_loopback(port)
