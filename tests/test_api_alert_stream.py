"""``GET /v1/alerts/stream`` over a real HTTP server: new and changed alerts of the caller's
brand arrive as Server-Sent Events, another brand's never do, and Last-Event-ID replays a page
at a time within a bounded window. The key is checked again on every wake: a revoked key's
stream sends nothing more and closes. Streams are capped per key and per process."""

import http.client
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fastapi import FastAPI

from services.api.alerts import repository, stream
from services.api.alerts.repository import AlertReadRepository, ChangedAlert
from services.api.main import create_app
from services.api.settings import ApiSettings
from services.common.api_keys import Role, issue_key
from services.common.provisioning import provision_device
from tests.api import auth, serving

READ_TIMEOUT_S = 10.0


@contextmanager
def serve(
    database_url: str, tmp_path: Path, **settings: Any
) -> Iterator[tuple[FastAPI, tuple[str, int]]]:
    """The API on a real server, with ``settings`` over the defaults: (app, address)."""
    app = create_app(
        ApiSettings(database_url=database_url, mqtt_password="x", data_dir=tmp_path, **settings)
    )
    with serving(app) as address:
        assert app.state.alert_feed.wait_listening(10)
        yield app, address


@pytest.fixture
def server(api_database_url: str, tmp_path: Path) -> Iterator[tuple[str, int]]:
    with serve(api_database_url, tmp_path) as (_, address):
        yield address


class Stream:
    """An open event stream, read one event at a time."""

    def __init__(self, address: tuple[str, int], key: str, last_event_id: str | None = None):
        self.conn = http.client.HTTPConnection(*address, timeout=READ_TIMEOUT_S)
        headers = auth(key) | ({"Last-Event-ID": last_event_id} if last_event_id else {})
        self.conn.request("GET", "/v1/alerts/stream", headers=headers)
        self.response = self.conn.getresponse()
        if self.response.status == 200:
            # The server subscribes before it writes this first block: what is raised after
            # it has been read is on the stream.
            assert self.response.readline().startswith(b"retry: ")

    def next_event(self) -> dict[str, str]:
        """The next event's fields (comments and retry-only blocks skipped)."""
        fields: dict[str, str] = {}
        while True:
            line = self.response.readline().decode()
            assert line, "the stream ended"
            line = line.rstrip("\n")
            if line == "":
                if "event" in fields:
                    return fields
                fields = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(": ")
                fields[name] = value

    def close(self) -> None:
        self.conn.close()


def raise_alert(url: str, brand: str, device_id: str, rule: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "INSERT INTO alerts (brand_id, device_id, rule, rule_version, severity, first_seen,"
            " last_seen, explanation) VALUES (%s, %s, %s, 1, 'critical', now(), now(),"
            " %s) RETURNING id",
            [brand, device_id, rule, json.dumps(
                {"threshold": {}, "observed": {}, "window": {}, "action": "alert", "text": "t"}
            )],
        ).fetchone()  # fmt: skip
    assert row is not None
    return int(str(row[0]))


@pytest.fixture
def fleet(database_url: str, keys: dict[str, str]) -> None:
    with psycopg.connect(database_url) as conn:
        provision_device(conn, device_id="acme-1", brand_id="acme", model="m1")
        provision_device(conn, device_id="other-1", brand_id="other", model="m1")


def test_new_and_changed_alerts_of_the_brand_arrive_and_another_brands_never_do(
    server: tuple[str, int], database_url: str, keys: dict[str, str], fleet: None
) -> None:
    stream = Stream(server, keys["viewer"])
    try:
        assert stream.response.status == 200
        assert stream.response.getheader("content-type", "").startswith("text/event-stream")
        raise_alert(database_url, "other", "other-1", "overcurrent")
        first = raise_alert(database_url, "acme", "acme-1", "overcurrent")
        event = stream.next_event()
        assert event["event"] == "alert"
        alert: dict[str, Any] = json.loads(event["data"])
        assert (alert["id"], alert["device_id"], alert["state"]) == (first, "acme-1", "open")
        first_id = event["id"]

        with psycopg.connect(database_url) as conn:
            conn.execute("UPDATE alerts SET state = 'acknowledged' WHERE id = %s", [first])
        changed = stream.next_event()
        assert json.loads(changed["data"])["state"] == "acknowledged"
        assert int(changed["id"]) > int(first_id)
    finally:
        stream.close()

    # Reconnecting with the first event's id replays what changed since, in its current state.
    replay = Stream(server, keys["viewer"], last_event_id=first_id)
    try:
        again = replay.next_event()
        assert json.loads(again["data"])["id"] == first
        assert json.loads(again["data"])["state"] == "acknowledged"
    finally:
        replay.close()


def test_the_stream_needs_a_key(server: tuple[str, int], keys: dict[str, str]) -> None:
    conn = http.client.HTTPConnection(*server, timeout=READ_TIMEOUT_S)
    conn.request("GET", "/v1/alerts/stream")
    response = conn.getresponse()
    assert response.status == 401
    assert response.getheader("content-type") == "application/problem+json"
    conn.close()


def test_a_replay_longer_than_one_page_delivers_every_change_in_order(
    server: tuple[str, int],
    database_url: str,
    keys: dict[str, str],
    fleet: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(repository, "MAX_CHANGES", 2)
    raised = [raise_alert(database_url, "acme", "acme-1", f"rule_{n}") for n in range(5)]
    with psycopg.connect(database_url) as conn:
        before = conn.execute("SELECT min(change_seq) - 1 FROM alerts").fetchone()
    assert before is not None
    replay = Stream(server, keys["viewer"], last_event_id=str(before[0]))
    try:
        events = [replay.next_event() for _ in raised]
    finally:
        replay.close()
    assert [json.loads(e["data"])["id"] for e in events] == raised
    assert [int(e["id"]) for e in events] == sorted(int(e["id"]) for e in events)


def test_a_revoked_keys_stream_sends_no_alert_after_the_revocation_and_closes(
    server: tuple[str, int], database_url: str, keys: dict[str, str], fleet: None
) -> None:
    with psycopg.connect(database_url) as conn:
        watcher = issue_key(conn, role=Role.VIEWER, name="wall screen", brand_id="acme")
    opened = Stream(server, watcher.key)
    try:
        assert opened.response.status == 200
        raise_alert(database_url, "acme", "acme-1", "overcurrent")
        assert opened.next_event()["event"] == "alert"  # live before the revocation
        revoke = http.client.HTTPConnection(*server, timeout=READ_TIMEOUT_S)
        revoke.request("DELETE", f"/v1/api-keys/{watcher.id}", headers=auth(keys["admin"]))
        assert revoke.getresponse().status == 204
        revoke.close()
        raise_alert(database_url, "acme", "acme-1", "short_circuit")  # a fault after it
        started = time.monotonic()
        rest = opened.response.read()  # to the end of the stream: it must close
        assert time.monotonic() - started < stream.HEARTBEAT_S
    finally:
        opened.close()
    assert b"event: alert" not in rest, rest
    assert b"revoked" in rest
    # And the key can no longer open one.
    again = Stream(server, watcher.key)
    assert again.response.status == 401
    again.close()


def test_a_stream_closes_at_its_next_wake_when_its_key_is_revoked_without_a_notification(
    server: tuple[str, int], database_url: str, keys: dict[str, str], fleet: None
) -> None:
    with psycopg.connect(database_url) as conn:
        watcher = issue_key(conn, role=Role.VIEWER, name="wall screen", brand_id="acme")
    opened = Stream(server, watcher.key)
    try:
        with psycopg.connect(database_url) as conn:
            # The revocation's own notification is skipped: the alert's wake must catch it.
            conn.execute("ALTER TABLE api_keys DISABLE TRIGGER api_keys_revoked")
            conn.execute("UPDATE api_keys SET revoked_at = now() WHERE id = %s", [watcher.id])
            conn.execute("ALTER TABLE api_keys ENABLE TRIGGER api_keys_revoked")
        raise_alert(database_url, "acme", "acme-1", "overcurrent")
        rest = opened.response.read()
    finally:
        opened.close()
    assert b"event: alert" not in rest, rest


def status_of(address: tuple[str, int], key: str) -> tuple[int, dict[str, str], Stream]:
    opened = Stream(address, key)
    headers = {name.lower(): value for name, value in opened.response.getheaders()}
    return opened.response.status, headers, opened


def test_streams_are_capped_per_key_and_per_process(
    api_database_url: str, tmp_path: Path, keys: dict[str, str]
) -> None:
    with serve(
        api_database_url, tmp_path, alert_streams_per_key=2, alert_streams_per_process=3
    ) as (
        app,
        address,
    ):
        held = []
        try:
            for key in ("viewer", "viewer"):
                status, _, opened = status_of(address, keys[key])
                held.append(opened)
                assert status == 200
            status, headers, refused = status_of(address, keys["viewer"])
            assert status == 429
            assert headers["content-type"] == "application/problem+json"
            problem = json.loads(refused.response.read())
            assert problem["type"].endswith("/rate-limited")
            assert "per key" in problem["detail"]
            assert int(headers["retry-after"]) >= 1
            refused.close()
            status, _, opened = status_of(address, keys["support"])  # another key: room
            held.append(opened)
            assert status == 200
            status, _, refused = status_of(address, keys["admin"])  # the process is full
            assert status == 429
            refused.close()
            assert app.state.alert_streams.open_streams() == 3
            held.pop(0).close()  # a client goes: its slot comes back
            deadline = time.monotonic() + 5
            while app.state.alert_streams.open_streams() > 2:
                assert time.monotonic() < deadline, "the closed stream kept its slot"
                time.sleep(0.05)
            status, _, opened = status_of(address, keys["viewer"])
            held.append(opened)
            assert status == 200
        finally:
            for opened in held:
                opened.close()


def test_a_replay_reads_a_page_and_sends_it_before_reading_the_next(
    server: tuple[str, int],
    database_url: str,
    keys: dict[str, str],
    fleet: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(repository, "MAX_CHANGES", 2)
    raised = [raise_alert(database_url, "acme", "acme-1", f"rule_{n}") for n in range(5)]
    steps: list[str] = []
    changed, event = AlertReadRepository.changed, stream._event

    async def read(self: AlertReadRepository, *args: Any, **kwargs: Any) -> list[ChangedAlert]:
        rows = await changed(self, *args, **kwargs)
        steps.append(f"read {len(rows)}")
        return rows

    def sent(alert: ChangedAlert) -> str:
        steps.append("send")
        return event(alert)

    monkeypatch.setattr(AlertReadRepository, "changed", read)
    monkeypatch.setattr(stream, "_event", sent)
    replay = Stream(server, keys["viewer"], last_event_id="0")
    try:
        events = [replay.next_event() for _ in raised]
    finally:
        replay.close()
    assert [json.loads(e["data"])["id"] for e in events] == raised
    # Never more than a page read ahead of what was sent: memory is one page, whatever the
    # brand's history.
    assert steps[:8] == ["read 2", "send", "send", "read 2", "send", "send", "read 1", "send"]


def test_a_replay_is_bounded_to_the_newest_changes_and_says_so(
    api_database_url: str, database_url: str, tmp_path: Path, keys: dict[str, str], fleet: None
) -> None:
    raised = [raise_alert(database_url, "acme", "acme-1", f"rule_{n}") for n in range(5)]
    with serve(api_database_url, tmp_path, alert_replay_max_changes=3) as (_, address):
        replay = Stream(address, keys["viewer"], last_event_id="0")
        try:
            truncated = replay.next_event()
            events = [replay.next_event() for _ in range(3)]
        finally:
            replay.close()
    assert truncated["event"] == "replay-truncated"
    assert json.loads(truncated["data"])["replayed"] == 3
    assert [json.loads(e["data"])["id"] for e in events] == raised[2:]
