"""``GET /v1/alerts/stream`` over a real HTTP server: new and changed alerts of the caller's
brand arrive as Server-Sent Events, another brand's never do, and Last-Event-ID replays."""

import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from services.api.alerts import repository
from services.api.main import create_app
from services.api.settings import ApiSettings
from services.common.provisioning import provision_device
from tests.api import auth, serving

READ_TIMEOUT_S = 10.0


@pytest.fixture
def server(database_url: str, tmp_path: Path) -> Iterator[tuple[str, int]]:
    settings = ApiSettings(database_url=database_url, mqtt_password="x", data_dir=tmp_path)
    app = create_app(settings)
    with serving(app) as address:
        assert app.state.alert_feed.wait_listening(10)
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
