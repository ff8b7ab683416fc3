"""The JetStream pull consumer that feeds a worker on NATS (services/common/broker/jetstream.py),
against a real nats-server (tests/nats_single.py).

Messages published on device subjects reach the worker as MQTT topics; acknowledged ones are
never delivered again, unacknowledged ones are, after ack_wait, to the group's other worker
once the first is gone; the workers of a group share the messages; a worker holds at most
its window; a batch held past ack_wait (a database outage) is not redelivered meanwhile; an
ack from an earlier connection still counts; the worker's publishes reach NATS subscribers.
"""

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.common.broker.jetstream import JetStreamConfig, JetStreamSource
from services.common.broker.nats_client import NatsClient, NatsMessage
from services.common.broker.subjects import STREAM
from services.common.subscriber import Inbound
from tests.nats_single import SingleNats, single_nats

USERS = {"galvani-ingest": "ingest-test-password", "tester": "tester-test-password"}
TIMEOUT_S = 10.0
ACK_WAIT_S = 1.0


@pytest.fixture
def server(tmp_path: Path) -> Iterator[SingleNats]:
    with single_nats(tmp_path / "nats", USERS) as running:
        yield running


@pytest.fixture
def tester(server: SingleNats) -> Iterator[NatsClient]:
    """A plain NATS client of the test's own, for publishing and inspecting."""
    client = NatsClient(
        [server.url()], user="tester", password=USERS["tester"], tls=None, name="tester"
    )
    client.connect(TIMEOUT_S)
    yield client
    client.close()


SOURCES: list[JetStreamSource] = []


@pytest.fixture(autouse=True)
def close_sources() -> Iterator[None]:
    yield
    while SOURCES:
        SOURCES.pop().close()


def source(server: SingleNats, *, window: int = 100, name: str = "w1") -> JetStreamSource:
    """A connected source on the durable ``ingest``, closed after the test."""
    made = JetStreamSource(
        JetStreamConfig(
            servers=(server.url(),),
            user="galvani-ingest",
            password=USERS["galvani-ingest"],
            tls=None,
            name=name,
            durable="ingest",
            receive_maximum=window,
            ack_wait_s=ACK_WAIT_S,
        )
    )
    SOURCES.append(made)
    deadline = time.monotonic() + TIMEOUT_S
    while not made.connected:
        assert time.monotonic() < deadline, "the source did not connect"
        made.poll(0.1)
    return made


def publish(tester: NatsClient, count: int, *, device: str = "dev-1", start: int = 0) -> None:
    for i in range(start, start + count):
        tester.publish(f"galvani.v1.d.{device}.telemetry", b"%d" % i)
    tester.flush()


def collect(
    sources: list[JetStreamSource], count: int, timeout_s: float = TIMEOUT_S
) -> list[list[Inbound]]:
    """Poll ``sources`` until they hold ``count`` messages between them; what each took."""
    taken: list[list[Inbound]] = [[] for _ in sources]
    deadline = time.monotonic() + timeout_s
    while sum(map(len, taken)) < count and time.monotonic() < deadline:
        for index, each in enumerate(sources):
            each.poll(0.05)
            taken[index] += each.take(10_000)
    return taken


def quiet_for(sources: list[JetStreamSource], seconds: float) -> list[Inbound]:
    """Poll for ``seconds``; whatever arrives meanwhile."""
    got: list[Inbound] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for each in sources:
            each.poll(0.05)
            got += each.take(10_000)
    return got


def consumer_info(tester: NatsClient) -> dict[str, object]:
    answer = tester.request(f"$JS.API.CONSUMER.INFO.{STREAM}.ingest", b"", TIMEOUT_S)
    info: dict[str, object] = json.loads(answer.payload)
    return info


def test_acknowledged_messages_arrive_as_mqtt_topics_and_never_again(
    server: SingleNats, tester: NatsClient
) -> None:
    worker = source(server)
    publish(tester, 50)
    tester.publish("galvani.v1.d.dev-2.events", b"event")
    tester.publish("galvani.v1.d.dev-2.config", b"not a stream subject")
    tester.flush()
    (taken,) = collect([worker], 51)
    assert [m.topic for m in taken[:50]] == ["galvani/v1/d/dev-1/telemetry"] * 50
    assert [m.payload for m in taken[:50]] == [b"%d" % i for i in range(50)]
    assert (taken[50].topic, taken[50].payload) == ("galvani/v1/d/dev-2/events", b"event")
    assert all(m.qos == 1 and m.generation == taken[0].generation for m in taken)
    assert len({m.mid for m in taken}) == 51
    assert worker.unacked == 51
    assert worker.ack(taken) == 51
    assert worker.unacked == 0
    assert quiet_for([worker], 2 * ACK_WAIT_S) == []
    info = consumer_info(tester)
    assert info["num_ack_pending"] == 0
    assert info["num_redelivered"] == 0


def test_unacknowledged_messages_go_to_the_other_worker_after_the_first_is_gone(
    server: SingleNats, tester: NatsClient
) -> None:
    first = source(server, name="w1")
    publish(tester, 20)
    (taken,) = collect([first], 20)
    assert len(taken) == 20
    first.ack(taken[:12])
    first.close()  # dies holding 8 it never acknowledged
    second = source(server, name="w2")
    (again,) = collect([second], 8, timeout_s=ACK_WAIT_S + TIMEOUT_S)
    assert sorted(int(m.payload) for m in again) == list(range(12, 20))
    second.ack(again)
    assert quiet_for([second], 2 * ACK_WAIT_S) == []


def test_two_workers_of_a_group_share_the_messages_each_once(
    server: SingleNats, tester: NatsClient
) -> None:
    workers = [source(server, name="w1", window=50), source(server, name="w2", window=50)]
    publish(tester, 300)
    seen: list[int] = []
    counts = [0, 0]
    deadline = time.monotonic() + TIMEOUT_S
    while len(seen) < 300 and time.monotonic() < deadline:
        for index, worker in enumerate(workers):
            worker.poll(0.05)
            batch = worker.take(20)
            counts[index] += len(batch)
            seen += [int(m.payload) for m in batch]
            worker.ack(batch)
    assert sorted(seen) == list(range(300))
    assert all(count > 0 for count in counts), counts
    assert quiet_for(workers, 2 * ACK_WAIT_S) == []


def test_a_worker_holds_at_most_its_window(server: SingleNats, tester: NatsClient) -> None:
    worker = source(server, window=10)
    publish(tester, 35)
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        worker.poll(0.05)
    assert len(worker.pending) == 10
    assert worker.full()
    held = worker.take(100)
    worker.ack(held)
    (more,) = collect([worker], 10)
    assert [int(m.payload) for m in more] == list(range(10, 20))


def test_a_batch_held_past_ack_wait_is_not_redelivered(
    server: SingleNats, tester: NatsClient
) -> None:
    worker = source(server)
    publish(tester, 5)
    (taken,) = collect([worker], 5)
    # The database is away: the loop keeps polling while it waits, holding the batch.
    assert quiet_for([worker], 4 * ACK_WAIT_S) == []
    worker.ack(taken)
    assert quiet_for([worker], 2 * ACK_WAIT_S) == []
    assert consumer_info(tester)["num_redelivered"] == 0


def test_an_ack_from_an_earlier_connection_still_counts(
    server: SingleNats, tester: NatsClient
) -> None:
    worker = source(server)
    publish(tester, 5)
    (taken,) = collect([worker], 5)
    worker._lose("the test cut it")
    assert not worker.connected
    assert worker.ack(taken) == 5  # kept for the next connection
    deadline = time.monotonic() + TIMEOUT_S
    while not worker.connected and time.monotonic() < deadline:
        worker.poll(0.05)
    assert worker.stats.reconnects == 1
    assert taken[0].generation != worker._generation
    assert quiet_for([worker], 2 * ACK_WAIT_S) == []
    assert consumer_info(tester)["num_ack_pending"] == 0


def test_publishes_leave_with_the_acks_on_the_mapped_subject(
    server: SingleNats, tester: NatsClient
) -> None:
    tester.subscribe("galvani.v1.d.dev-1.ack")
    tester.flush()
    worker = source(server)
    publish(tester, 1)
    (taken,) = collect([worker], 1)
    worker.publish("galvani/v1/d/dev-1/ack", b'{"seq": 1}')
    worker.ack(taken)
    got: list[NatsMessage] = []
    deadline = time.monotonic() + TIMEOUT_S
    while not got and time.monotonic() < deadline:
        got = tester.poll(0.1)
    assert [(m.subject, m.payload) for m in got] == [("galvani.v1.d.dev-1.ack", b'{"seq": 1}')]


def test_a_publish_without_a_connection_is_dropped_and_counted(server: SingleNats) -> None:
    worker = source(server)
    worker.close()
    worker.publish("galvani/v1/d/dev-1/ack", b"{}")
    assert worker.stats.publishes_dropped == 1
