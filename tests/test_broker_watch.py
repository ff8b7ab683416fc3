"""The broker watch: Mosquitto's $SYS statistics as maintenance metrics, drops counted exactly."""

import itertools
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from pydantic import ValidationError

from deploy.stack.mosquitto import BrokerConfig, MosquittoBroker, render_config
from deploy.stack.pki import DevelopmentPKI
from deploy.stack.ports import free_port
from deploy.stack.processes import service_user
from services.common.broker_auth import SERVICE_ACLS, ServiceAccount
from services.maintenance.broker_watch import (
    DROPPED_TOPIC,
    UPTIME_TOPIC,
    BrokerAddress,
    BrokerCollector,
    BrokerStats,
    BrokerWatch,
    parse_value,
)
from services.maintenance.settings import MaintenanceSettings
from tests.ingest import wait_until
from tests.mqtt import MqttClient

QUEUE_CAP = 10  # max_queued_messages of the test's own broker
EXTRA = 7  # messages published past the cap
OFFLINE_SESSIONS = 2
_brokers = itertools.count(1)


def exported(stats: BrokerStats) -> str:
    """The metrics page the maintenance endpoint would serve for ``stats``."""
    registry = CollectorRegistry()
    registry.register(BrokerCollector(stats))
    return generate_latest(registry).decode()


def sample(page: str, name: str) -> float | None:
    match = re.search(rf"^{name} (\S+)$", page, re.M)
    return float(match.group(1)) if match else None


def test_sys_payloads_are_read_as_numbers() -> None:
    assert parse_value(b"42") == 42
    assert parse_value(b"3600 seconds") == 3600
    assert parse_value(b"") is None
    assert parse_value(b"many") is None
    assert parse_value(b"9" * 100) is None


def test_dropped_count_is_a_counter_and_a_broker_restart_forgets_it() -> None:
    stats = BrokerStats()
    assert set(re.findall(r"^(galvani_\w+) ", exported(stats), re.M)) == {
        "galvani_broker_watch_connected",
        "galvani_broker_watch_last_message_timestamp_seconds",
    }, "nothing is known of the broker before it speaks"
    stats.set_connected(True)
    stats.update(UPTIME_TOPIC, b"500 seconds")
    stats.update(DROPPED_TOPIC, b"12")
    stats.update("$SYS/broker/shared_subscriptions/count", b"12")
    page = exported(stats)
    assert "# TYPE galvani_broker_messages_dropped_total counter" in page
    assert sample(page, "galvani_broker_messages_dropped_total") == 12
    assert sample(page, "galvani_broker_shared_subscriptions") == 12
    assert sample(page, "galvani_broker_watch_connected") == 1
    assert sample(page, "galvani_broker_watch_last_message_timestamp_seconds") > 0

    # A smaller uptime is a new broker: the old one's count and gauges no longer hold.
    stats.update(UPTIME_TOPIC, b"3 seconds")
    page = exported(stats)
    assert sample(page, "galvani_broker_messages_dropped_total") is None
    assert sample(page, "galvani_broker_shared_subscriptions") is None
    assert sample(page, "galvani_broker_uptime_seconds") == 3
    stats.update(DROPPED_TOPIC, b"0")
    assert sample(exported(stats), "galvani_broker_messages_dropped_total") == 0


def test_a_new_connection_forgets_what_the_watch_knew() -> None:
    """The broker may have restarted while the watch was away, and a restarted broker
    publishes its dropped count only when it changes: the old count must not stand for it."""
    stats = BrokerStats()
    stats.update(UPTIME_TOPIC, b"500 seconds")
    stats.update(DROPPED_TOPIC, b"12")
    stats.forget()
    assert sample(exported(stats), "galvani_broker_messages_dropped_total") is None
    assert stats.value(UPTIME_TOPIC) is None


def test_a_malformed_statistic_is_ignored() -> None:
    stats = BrokerStats()
    stats.update(DROPPED_TOPIC, b"5")
    stats.update(DROPPED_TOPIC, b"lots")
    assert stats.value(DROPPED_TOPIC) == 5


def test_maintenance_watches_the_broker_only_when_given_its_password() -> None:
    url = "postgresql://galvani:pw@127.0.0.1/galvani"
    assert not MaintenanceSettings(database_url=url).watches_broker
    settings = MaintenanceSettings(database_url=url, mqtt_password="s3cret-enough")
    assert settings.watches_broker
    assert settings.mqtt_username == ServiceAccount.MAINTENANCE
    with pytest.raises(ValidationError, match="mqtt_password"):
        MaintenanceSettings(database_url=url, mqtt_password="changeme", environment="production")


def test_broker_config_sets_the_sys_interval_and_the_maintenance_account_reads_only_sys(
    tmp_path: Path,
) -> None:
    pki = DevelopmentPKI.at(tmp_path / "pki")
    config = render_config(
        BrokerConfig(tmp_path, device_port=1, service_port=2, cert_port=3, pki=pki)
    )
    assert "\nsys_interval 10\n" in config
    assert SERVICE_ACLS[ServiceAccount.MAINTENANCE] == ("topic read $SYS/broker/#",)


@pytest.fixture
def small_queue_broker(
    stack_root: Path, service_passwords: dict[ServiceAccount, str], pki: DevelopmentPKI
) -> Iterator[MosquittoBroker]:
    """A broker of this test's own that queues at most QUEUE_CAP messages per session and
    publishes its statistics every second."""
    broker = MosquittoBroker(
        BrokerConfig(
            directory=stack_root / f"small-queue-broker-{next(_brokers)}",
            device_port=free_port(),
            service_port=free_port(),
            cert_port=free_port(),
            pki=pki,
            run_as=service_user(),
            max_queued_messages=QUEUE_CAP,
            sys_interval_s=1,
        ),
        service_passwords,
    )
    broker.start([])
    yield broker
    broker.stop()


def service_client(
    broker: MosquittoBroker, passwords, account: ServiceAccount, client_id: str, **kw
) -> MqttClient:
    return MqttClient(
        "127.0.0.1",
        broker.config.service_port,
        str(account),
        passwords[account],
        client_id=client_id,
        **kw,
    )


def test_exported_dropped_counter_equals_the_messages_the_broker_dropped(
    small_queue_broker: MosquittoBroker, service_passwords: dict[ServiceAccount, str]
) -> None:
    broker = small_queue_broker
    topic = "galvani/v1/d/watch-dev-1/config"
    # Persistent sessions subscribed at QoS 1 that then go away: the broker queues for them.
    for n in range(OFFLINE_SESSIONS):
        offline = service_client(
            broker,
            service_passwords,
            ServiceAccount.RULES,
            f"galvani-rules-offline-{n}",
            clean_start=False,
            session_expiry_s=600,
        ).connect()
        assert offline.subscribe(topic) == 1
        offline.close()

    stats = BrokerStats()
    watch = BrokerWatch(
        BrokerAddress(
            "127.0.0.1",
            broker.config.service_port,
            ServiceAccount.MAINTENANCE,
            service_passwords[ServiceAccount.MAINTENANCE],
            broker.tls_context(),
        ),
        stats,
    )
    watch.start()
    publisher = service_client(
        broker, service_passwords, ServiceAccount.API, "galvani-api-watch-test"
    ).connect()
    try:
        wait_until(lambda: stats.connected, 10, "the watch subscribed")
        # The broker publishes its count (0) at start, retained: the watch reads it.
        wait_until(lambda: stats.value(DROPPED_TOPIC) == 0, 10, "the broker's dropped count")

        codes = publisher.publish_many([(topic, b"{}")] * (QUEUE_CAP + EXTRA))
        assert set(codes) == {0}, "the broker accepted every message (it has subscribers)"

        # Counted once per subscriber whose queue was full: EXTRA for each offline session.
        expected = EXTRA * OFFLINE_SESSIONS
        wait_until(lambda: stats.value(DROPPED_TOPIC) == expected, 10, f"{expected} dropped")
        page = exported(stats)
        assert "# TYPE galvani_broker_messages_dropped_total counter" in page
        assert sample(page, "galvani_broker_messages_dropped_total") == expected
        assert sample(page, "galvani_broker_watch_connected") == 1
        assert sample(page, "galvani_broker_clients_disconnected") == OFFLINE_SESSIONS
    finally:
        publisher.close()
        watch.close()
    assert not stats.connected
    log = (broker.config.directory / "mosquitto.log").read_text(errors="replace")
    assert "Outgoing messages are being dropped for client galvani-rules-offline-0" in log
