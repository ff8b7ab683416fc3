"""The broker settings: which engine, the NATS servers and the MQTT nodes.

``GALVANI_BROKER``, ``GALVANI_NATS_URLS`` and ``GALVANI_MQTT_NODES`` are installation-wide,
read by every service whatever its own prefix. NATS needs its server list, each URL
nats:// or tls://, and tls:// only outside development; the backend's MQTT clients speak
3.1.1 to NATS's MQTT gateway (it refuses an MQTT 5 CONNECT) and 5 to Mosquitto.
"""

import os
from typing import Any

import pytest
from pydantic import ValidationError

from services.common.broker import BrokerKind
from services.common.broker.jetstream import JetStreamSource
from services.common.subscriber import Subscriber
from services.common.worker import inbound_source
from services.ingest.settings import IngestSettings
from services.rules.settings import RulesSettings

DATABASE_URL = "postgresql://galvani_x:a-real-secret@127.0.0.1/galvani"
BROKER_PASSWORD = "a-real-broker-secret"


@pytest.fixture(autouse=True)
def no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The settings under test are only what each test passes."""
    for name in list(os.environ):
        if name.startswith("GALVANI_"):
            monkeypatch.delenv(name)


def make(**values: Any) -> IngestSettings:
    return IngestSettings(database_url=DATABASE_URL, mqtt_password=BROKER_PASSWORD, **values)


def test_default_is_mosquitto_with_mqtt_5_on_the_one_host() -> None:
    settings = make(mqtt_host="broker.example", mqtt_port=8885)
    assert settings.broker is BrokerKind.MOSQUITTO
    assert settings.mqtt_protocol() == 5
    assert settings.mqtt_addresses() == [("broker.example", 8885)]
    assert settings.nats_servers() == []


def test_installation_wide_variables_reach_every_service(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GALVANI_BROKER", "nats")
    monkeypatch.setenv("GALVANI_NATS_URLS", "nats://127.0.0.1:4301, nats://127.0.0.1:4302")
    monkeypatch.setenv("GALVANI_MQTT_NODES", "127.0.0.1:1901,127.0.0.1:1902")
    for cls in (IngestSettings, RulesSettings):
        settings = cls(database_url=DATABASE_URL, mqtt_password=BROKER_PASSWORD)
        assert settings.broker is BrokerKind.NATS
        assert settings.mqtt_protocol() == 4
        assert settings.nats_servers() == ["nats://127.0.0.1:4301", "nats://127.0.0.1:4302"]
        assert settings.mqtt_addresses() == [("127.0.0.1", 1901), ("127.0.0.1", 1902)]


def test_nats_without_servers_is_refused() -> None:
    with pytest.raises(ValidationError, match="nats_urls is empty"):
        make(broker="nats")


@pytest.mark.parametrize(
    "urls", ["http://127.0.0.1:4222", "127.0.0.1:4222", "nats://127.0.0.1", "tls://a:1,mqtt://b:2"]
)
def test_a_url_that_is_not_nats_or_tls_is_refused(urls: str) -> None:
    with pytest.raises(ValidationError, match="is not nats://host:port"):
        make(broker="nats", nats_urls=urls)


def test_plaintext_nats_is_refused_outside_development() -> None:
    with pytest.raises(ValidationError, match="every NATS server URL is tls://"):
        make(
            environment="production",
            broker="nats",
            nats_urls="tls://n1.example:4222,nats://n2.example:4222",
        )
    settings = make(environment="production", broker="nats", nats_urls="tls://n1.example:4222")
    assert settings.nats_servers() == ["tls://n1.example:4222"]


def test_tls_servers_need_the_broker_tls_on() -> None:
    with pytest.raises(ValidationError, match="mqtt_tls is off"):
        make(broker="nats", nats_urls="tls://127.0.0.1:4222", mqtt_tls=False)
    assert make(broker="nats", nats_urls="nats://127.0.0.1:4222", mqtt_tls=False).nats_servers()


@pytest.mark.parametrize("nodes", ["127.0.0.1", "127.0.0.1:0", ":1883", "h:port"])
def test_a_malformed_mqtt_node_is_refused(nodes: str) -> None:
    with pytest.raises(ValidationError, match="is not host:port"):
        make(mqtt_nodes=nodes)


def test_an_unknown_broker_is_refused() -> None:
    with pytest.raises(ValidationError):
        make(broker="rabbitmq")


def test_the_worker_loop_consumes_jetstream_on_nats_and_mqtt_on_mosquitto() -> None:
    nats = make(broker="nats", nats_urls="nats://127.0.0.1:4301,nats://127.0.0.1:4302")
    source = inbound_source(nats)
    assert isinstance(source, JetStreamSource)
    assert source.config.servers == ("nats://127.0.0.1:4301", "nats://127.0.0.1:4302")
    assert source.config.durable == "ingest"
    assert source.config.user == "galvani-ingest"
    assert source.config.receive_maximum == nats.receive_maximum
    assert isinstance(inbound_source(make()), Subscriber)
