"""The synchronous NATS client (services/common/broker/nats_client.py).

The parser is tested on bytes (many messages in one read, messages split across reads,
status lines, -ERR); the rest against a real nats-server (tests/nats_single.py): publish and
subscribe with headers, queue groups, requests (answered, and 503 when nobody serves),
server rotation, a reconnection that subscribes again, a refused login, TLS with verification,
and a server that stops answering PINGs.
"""

import os
import signal
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.stack.pki import DevelopmentPKI
from services.common import pki as pki_module
from services.common.broker import nats_client
from services.common.broker.nats_client import (
    ConnectionLost,
    NatsClient,
    NatsMessage,
    decode_headers,
    encode_headers,
    inbox_root,
    new_inbox_prefix,
)
from services.common.tls import client_context
from tests.nats_single import SingleNats, single_nats

USERS = {"svc": "svc-test-password", "other": "other-test-password"}
TIMEOUT_S = 5.0


OPEN: list[NatsClient] = []


def client(
    servers: list[str], *, user: str = "svc", tls: ssl.SSLContext | None = None
) -> NatsClient:
    """A client, closed at the end of the test."""
    made = NatsClient(servers, user=user, password=USERS.get(user, "wrong"), tls=tls, name="t")
    OPEN.append(made)
    return made


@pytest.fixture(autouse=True)
def close_clients() -> Iterator[None]:
    yield
    while OPEN:
        OPEN.pop().close()


def receive(c: NatsClient, count: int, timeout_s: float = TIMEOUT_S) -> list[NatsMessage]:
    got: list[NatsMessage] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < count and time.monotonic() < deadline:
        got += c.poll(0.2)
    return got


def fed(data: bytes) -> NatsClient:
    """A client with ``data`` in its input buffer, as if read, parsed."""
    c = client(["nats://127.0.0.1:1"])
    c._in += data
    c._parse()
    return c


# -- bytes ------------------------------------------------------------------------------------


def test_one_read_is_parsed_into_every_message_it_holds() -> None:
    head = b"NATS/1.0\r\nNats-Msg-Id: 7\r\n\r\n"
    data = (
        b"MSG a.b 1 5\r\nhello\r\n"
        b"MSG a.c 1 _INBOX.x.1 0\r\n\r\n"
        + b"HMSG a.d 2 $JS.ACK.s.c.1.2.3.4.0 %d %d\r\n" % (len(head), len(head) + 3)
        + head
        + b"xyz\r\n"
        b"PING\r\n"
    )
    c = fed(data)
    assert list(c._ready) == [
        NatsMessage("a.b", "", {}, None, b"hello"),
        NatsMessage("a.c", "_INBOX.x.1", {}, None, b""),
        NatsMessage("a.d", "$JS.ACK.s.c.1.2.3.4.0", {"Nats-Msg-Id": "7"}, None, b"xyz"),
    ]
    assert bytes(c._out) == b"PONG\r\n"
    assert not c._in


def test_a_message_split_across_reads_waits_for_its_rest() -> None:
    c = fed(b"MSG a.b 1 10\r\n01234")
    assert not c._ready
    assert bytes(c._in) == b"MSG a.b 1 10\r\n01234"
    c._in += b"56789\r\nMSG a.c 1 1\r\n"
    c._parse()
    assert [m.payload for m in c._ready] == [b"0123456789"]
    c._in += b"z\r\n"
    c._parse()
    assert [m.payload for m in c._ready] == [b"0123456789", b"z"]


@pytest.mark.parametrize(
    ("line", "status", "description"),
    [
        ("NATS/1.0 404 No Messages", 404, "No Messages"),
        ("NATS/1.0 408 Request Timeout", 408, "Request Timeout"),
        ("NATS/1.0 409 Exceeded MaxWaiting", 409, "Exceeded MaxWaiting"),
        ("NATS/1.0 100 Idle Heartbeat", 100, "Idle Heartbeat"),
        ("NATS/1.0 503", 503, None),
    ],
)
def test_status_lines_give_the_code_and_description(
    line: str, status: int, description: str | None
) -> None:
    block = f"{line}\r\nNats-Pending-Messages: 3\r\n\r\n".encode()
    code, headers = decode_headers(block)
    assert code == status
    assert headers.get("Description") == description
    assert headers["Nats-Pending-Messages"] == "3"
    c = fed(b"HMSG _INBOX.a.1 3 %d %d\r\n" % (len(block), len(block)) + block + b"\r\n")
    assert c._ready[0].status == status


def test_headers_round_trip_and_refuse_what_would_break_the_block() -> None:
    block = encode_headers({"Nats-Expected-Stream": "S", "X": "1 2"})
    assert block == b"NATS/1.0\r\nNats-Expected-Stream: S\r\nX: 1 2\r\n\r\n"
    assert decode_headers(block) == (None, {"Nats-Expected-Stream": "S", "X": "1 2"})
    with pytest.raises(ValueError, match="cannot be sent"):
        encode_headers({"X": "a\r\nInjected: 1"})


def test_a_permissions_error_keeps_the_connection_and_others_end_it() -> None:
    c = fed(b"-ERR 'Permissions Violation for Publish to \"x\"'\r\nMSG a 1 1\r\nz\r\n")
    assert c.last_error.startswith("Permissions Violation")
    assert [m.payload for m in c._ready] == [b"z"]
    with pytest.raises(nats_client._Lost, match="Maximum Payload Violation"):
        fed(b"-ERR 'Maximum Payload Violation'\r\n")


def test_garbage_is_a_protocol_error() -> None:
    with pytest.raises(nats_client._Lost, match="unknown protocol line"):
        fed(b"HELLO\r\n")
    with pytest.raises(nats_client._Lost, match="protocol error"):
        fed(b"MSG a 1 notanumber\r\n")


# -- a real server ----------------------------------------------------------------------------


@pytest.fixture
def server(tmp_path: Path) -> Iterator[SingleNats]:
    with single_nats(tmp_path / "nats", USERS) as running:
        yield running


def test_publish_and_subscribe_with_headers_and_reply(server: SingleNats) -> None:
    sub = client([server.url()])
    sub.connect(TIMEOUT_S)
    sub.subscribe("galvani.v1.d.*.telemetry")
    sub.flush()
    pub = client([server.url()], user="other")
    pub.connect(TIMEOUT_S)
    pub.publish("galvani.v1.d.dev-1.telemetry", b"one")
    pub.publish("galvani.v1.d.dev-2.telemetry", b"two", reply="r.1", headers={"K": "v"})
    pub.publish("galvani.v1.d.dev-2.events", b"not subscribed")
    pub.flush()
    got = receive(sub, 2)
    assert got == [
        NatsMessage("galvani.v1.d.dev-1.telemetry", "", {}, None, b"one"),
        NatsMessage("galvani.v1.d.dev-2.telemetry", "r.1", {"K": "v"}, None, b"two"),
    ]
    assert sub.poll(0.2) == []


def test_ten_thousand_messages_arrive_in_order_in_a_few_reads(server: SingleNats) -> None:
    sub = client([server.url()])
    sub.connect(TIMEOUT_S)
    sub.subscribe("bulk")
    sub.flush()
    pub = client([server.url()])
    pub.connect(TIMEOUT_S)
    for i in range(10_000):
        pub.publish("bulk", b"%d" % i)
    pub.flush()
    polls = 0
    got: list[NatsMessage] = []
    deadline = time.monotonic() + TIMEOUT_S
    while len(got) < 10_000 and time.monotonic() < deadline:
        got += sub.poll(0.2)
        polls += 1
    assert [int(m.payload) for m in got] == list(range(10_000))
    assert polls < 200  # many messages per read, not one poll each


def test_a_queue_group_shares_the_messages(server: SingleNats) -> None:
    members = [client([server.url()]) for _ in range(2)]
    for member in members:
        member.connect(TIMEOUT_S)
        member.subscribe("work", queue="workers")
        member.flush()
    pub = client([server.url()])
    pub.connect(TIMEOUT_S)
    for i in range(200):
        pub.publish("work", b"%d" % i)
    pub.flush()
    counts = [0, 0]
    seen: list[int] = []
    deadline = time.monotonic() + TIMEOUT_S
    while len(seen) < 200 and time.monotonic() < deadline:
        for index, member in enumerate(members):
            batch = member.poll(0.05)
            counts[index] += len(batch)
            seen += [int(m.payload) for m in batch]
    assert sorted(seen) == list(range(200))
    assert all(count > 0 for count in counts)


def test_request_is_answered_or_told_nobody_serves_it(server: SingleNats) -> None:
    responder = client([server.url()], user="other")
    responder.connect(TIMEOUT_S)
    responder.subscribe("svc.echo")
    responder.flush()
    asker = client([server.url()])
    asker.connect(TIMEOUT_S)
    asker.subscribe("noise")
    asker.flush()
    nobody = asker.request("svc.nobody", b"?", TIMEOUT_S)
    assert nobody.status == 503
    responder.publish("noise", b"while waiting")
    responder.flush()
    # The responder answers from its own loop; the asker's request waits for it.
    question = client([server.url()])
    question.connect(TIMEOUT_S)
    question.publish("svc.echo", b"ping", reply=f"{asker._inbox}.99")
    question.flush()
    asked = receive(responder, 1)
    assert asked[0].payload == b"ping"
    assert asked[0].reply.startswith("_INBOX.")
    responder.publish(asked[0].reply, b"pong")
    responder.flush()
    answer = receive(asker, 2)
    assert sorted(m.payload for m in answer) == [b"pong", b"while waiting"]
    with pytest.raises(TimeoutError):
        asker.request("svc.echo", b"nobody answers this one", 0.3)


def test_a_dead_server_is_skipped_and_a_reconnection_subscribes_again(
    tmp_path: Path, server: SingleNats
) -> None:
    with single_nats(tmp_path / "second", USERS) as second:
        c = client(["nats://127.0.0.1:1", server.url(), second.url()])
        c.connect(TIMEOUT_S)
        assert c.server == server.url()
        assert c.generation == 1
        c.subscribe("again")
        c.flush()
        server.stop()
        with pytest.raises(ConnectionLost):
            receive(c, 1)
        assert not c.connected
        c.connect(TIMEOUT_S)
        assert c.server == second.url()
        assert c.generation == 2
        pub = client([second.url()])
        pub.connect(TIMEOUT_S)
        pub.publish("again", b"on the second server")
        pub.flush()
        assert [m.payload for m in receive(c, 1)] == [b"on the second server"]


def test_a_wrong_password_is_refused_by_every_server(server: SingleNats) -> None:
    c = client([server.url(), server.url()], user="nobody")
    with pytest.raises(ConnectionLost, match="Authorization Violation"):
        c.connect(TIMEOUT_S)
    assert not c.connected
    with pytest.raises(ConnectionLost):
        c.publish("x", b"")


def seconds_to_leave_a_stopped_server(server: SingleNats, timeout_s: float) -> float:
    """Connect, stop the server (SIGSTOP), and time until the client declares it lost for its
    unanswered PINGs (within ``timeout_s``)."""
    c = client([server.url()])
    c.connect(TIMEOUT_S)
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(ConnectionLost, match="PINGs unanswered"):
            receive(c, 1, timeout_s=timeout_s)
        return time.monotonic() - started
    finally:
        os.kill(server.process.pid, signal.SIGCONT)


def test_a_server_that_stops_answering_is_declared_lost(
    server: SingleNats, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(nats_client, "PING_INTERVAL_S", 0.2)
    assert seconds_to_leave_a_stopped_server(server, timeout_s=3.0) < 2.0


def test_a_stopped_server_is_left_within_seconds_at_the_default_ping_interval(
    server: SingleNats,
) -> None:
    # What a cluster node paused 30 s needs: the auth-callout responders connected to it must
    # leave it well within the pause, or no login succeeds anywhere meanwhile.
    assert seconds_to_leave_a_stopped_server(server, timeout_s=15.0) < 8.0


def test_tls_verifies_the_server_and_upgrades_after_info(
    tmp_path: Path, pki: DevelopmentPKI
) -> None:
    tls = (pki.server_cert, pki.server_key, pki.ca_file)
    with single_nats(tmp_path / "tls", USERS, tls=tls) as secure:
        assert secure.url().startswith("tls://")
        good = client([secure.url()], tls=client_context(pki.ca_file))
        good.connect(TIMEOUT_S)
        assert good.request("$JS.API.INFO", b"", TIMEOUT_S).status is None
        # nats:// to a server that requires TLS still upgrades.
        plain_url = secure.url().replace("tls://", "nats://")
        upgraded = client([plain_url], tls=client_context(pki.ca_file))
        upgraded.connect(TIMEOUT_S)
        assert upgraded.connected
        with pytest.raises(ConnectionLost, match="requires TLS"):
            client([plain_url]).connect(TIMEOUT_S)
        stranger = pki_module.Authority.create("not-the-servers-ca")
        stranger.save(tmp_path / "other-ca.pem", tmp_path / "other-ca.key")
        with pytest.raises(ConnectionLost, match="did not verify"):
            client([secure.url()], tls=client_context(tmp_path / "other-ca.pem")).connect(TIMEOUT_S)


def test_tls_url_to_a_plaintext_server_is_refused(server: SingleNats) -> None:
    url = server.url().replace("nats://", "tls://")
    with pytest.raises(ConnectionLost, match="does not offer TLS"):
        client([url], tls=ssl.create_default_context()).connect(TIMEOUT_S)


def test_replies_come_to_the_users_own_inbox() -> None:
    """A login's permissions grant it ``_INBOX.<user>.>`` (services/broker_access/callout.py)."""
    prefix = new_inbox_prefix("galvani-ingest")
    assert prefix.startswith("_INBOX.galvani-ingest.")
    assert len(prefix.split(".")) == 3
    assert prefix != new_inbox_prefix("galvani-ingest")
    for unusable in ("a.b", "a b", "*", ">", ""):
        with pytest.raises(ValueError):
            inbox_root(unusable)
