"""Device traffic on NATS (services/common/broker/subjects.py): topic and subject mapping as
NATS's MQTT gateway does it, the stream and consumer configurations, and their idempotent
creation against a real nats-server."""

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.common.broker import subjects
from services.common.broker.nats_client import NatsClient
from services.common.broker.subjects import (
    STREAM,
    JetStreamError,
    consumer_config,
    ensure_consumer,
    ensure_stream,
    replicas_for,
    stream_config,
    subject_to_topic,
    topic_to_subject,
)
from services.common.protocol.topics import DEVICE_CHANNELS, device_topic
from tests.nats_single import single_nats

USERS = {"svc": "svc-test-password"}


@pytest.mark.parametrize("channel", [*DEVICE_CHANNELS, "ack", "config"])
def test_device_topics_and_subjects_map_both_ways(channel: str) -> None:
    topic = device_topic("dev-0001", channel)
    assert topic_to_subject(topic) == f"galvani.v1.d.dev-0001.{channel}"
    assert subject_to_topic(topic_to_subject(topic)) == topic


def test_a_dot_inside_a_level_maps_as_the_gateway_maps_it() -> None:
    assert topic_to_subject("a.b/c") == "a//b.c"
    assert subject_to_topic("a//b.c") == "a.b/c"


def test_the_stream_takes_the_four_device_channels_and_keeps_them_for_every_group() -> None:
    config = stream_config(3)
    assert config["subjects"] == [
        "galvani.v1.d.*.telemetry",
        "galvani.v1.d.*.events",
        "galvani.v1.d.*.state",
        "galvani.v1.d.*.presence",
    ]
    assert (config["retention"], config["storage"], config["discard"]) == (
        "interest",
        "file",
        "new",
    )
    assert config["num_replicas"] == 3


def test_a_consumer_acks_explicitly_and_redelivers_without_limit() -> None:
    config = consumer_config("ingest", ack_wait_s=2.5)
    assert config["durable_name"] == "ingest"
    assert config["ack_policy"] == "explicit"
    assert config["ack_wait"] == 2_500_000_000
    assert config["max_deliver"] == -1


def test_replicas_are_three_in_a_cluster_and_one_alone() -> None:
    assert replicas_for({"cluster": "galvani"}) == 3
    assert replicas_for({}) == 1


@pytest.fixture
def client(tmp_path: Path) -> Iterator[NatsClient]:
    with single_nats(tmp_path / "nats", USERS) as server:
        made = NatsClient(
            [server.url()], user="svc", password=USERS["svc"], tls=None, name="subjects"
        )
        made.connect(5.0)
        yield made
        made.close()


def info(client: NatsClient, subject: str) -> dict[str, object]:
    answer: dict[str, object] = json.loads(client.request(subject, b"", 5.0).payload)
    return answer


def test_stream_and_consumer_are_created_once_and_then_left_alone(client: NatsClient) -> None:
    assert ensure_stream(client) is True
    assert ensure_stream(client) is False
    assert ensure_consumer(client, "ingest") is True
    assert ensure_consumer(client, "ingest") is False
    assert ensure_consumer(client, "rules") is True
    stream = info(client, f"$JS.API.STREAM.INFO.{STREAM}")
    assert stream["config"]["num_replicas"] == 1  # type: ignore[index]
    assert stream["state"]["consumer_count"] == 2  # type: ignore[index]
    # A consumer whose ack_wait changed is brought up to date, not refused.
    ensure_consumer(client, "ingest", ack_wait_s=7.0)
    consumer = info(client, f"$JS.API.CONSUMER.INFO.{STREAM}.ingest")
    assert consumer["config"]["ack_wait"] == 7_000_000_000  # type: ignore[index]


def test_a_stream_made_by_another_worker_meanwhile_is_taken_as_it_is(
    client: NatsClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_api = subjects.api

    def info_says_missing(c: NatsClient, subject: str, body: object) -> dict[str, object]:
        if subject.startswith("$JS.API.STREAM.INFO."):
            # The other worker creates it with a different config between our INFO and CREATE.
            real_api(c, f"$JS.API.STREAM.CREATE.{STREAM}", {**stream_config(1), "max_msgs": 5})
            raise JetStreamError("stream not found", subjects.STREAM_NOT_FOUND)
        return real_api(c, subject, body)  # type: ignore[arg-type]

    monkeypatch.setattr(subjects, "api", info_says_missing)
    assert ensure_stream(client) is False


def test_an_api_error_carries_its_code(client: NatsClient) -> None:
    with pytest.raises(JetStreamError) as raised:
        subjects.api(client, f"$JS.API.CONSUMER.INFO.{STREAM}.nobody", None)
    assert raised.value.code == subjects.STREAM_NOT_FOUND


def test_a_server_without_jetstream_for_the_account_is_an_error(tmp_path: Path) -> None:
    with single_nats(tmp_path / "nats", USERS) as server:
        system = NatsClient(
            [server.url()],
            user="galvani-sys",
            password="sys-test-password",
            tls=None,
            name="sys",
        )
        system.connect(5.0)
        try:
            with pytest.raises(JetStreamError):
                ensure_stream(system)
        finally:
            system.close()
