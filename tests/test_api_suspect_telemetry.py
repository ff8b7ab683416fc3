"""Suspect-clock samples through the API: where they are and how to read them (issue 19, item 1)."""

import json
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from fastapi.testclient import TestClient

from services.common.db import storage_of
from services.common.provisioning import provision_device
from services.common.subscriber import Inbound
from services.ingest.decode import decode_inbound
from services.ingest.writer import write_batch
from tests.api import auth
from tests.ingest import topic

RECEIVED = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=10)
YEAR_2100_MS = int(datetime(2100, 1, 1, tzinfo=UTC).timestamp() * 1000)


def message(seq: int, *times_ms: int) -> bytes:
    samples = [{"ts": t, "i_ua": 100.0 + i, "out": True} for i, t in enumerate(times_ms)]
    return json.dumps({"v": 1, "seq": seq, "session": "s-1", "samples": samples}).encode()


def ingest(url: str, *payloads: bytes) -> None:
    """Write one batch of acme-1's telemetry as ingest does, received at ``RECEIVED``."""
    batch = [
        decode_inbound(Inbound(topic("acme-1", "telemetry"), p, 1, 1, RECEIVED, 1))
        for p in payloads
    ]
    with psycopg.connect(url) as conn, conn.transaction():
        write_batch(conn, batch, storage_of(conn))


@pytest.fixture
def wrong_clock(database_url: str) -> None:
    """acme-1 sends a message from year 2100, one from 1970 and a plausible one."""
    with psycopg.connect(database_url) as conn:
        provision_device(conn, device_id="acme-1", brand_id="acme", model="m")
        provision_device(conn, device_id="other-1", brand_id="other", model="m")
    now_ms = int(RECEIVED.timestamp() * 1000)
    ingest(
        database_url,
        message(1, YEAR_2100_MS, YEAR_2100_MS + 86_400_000),
        message(2, 1000, 1100),
        message(3, now_ms - 1000),
    )


def window(start: datetime, end: datetime) -> str:
    return f"from={int(start.timestamp() * 1000)}&to={int(end.timestamp() * 1000)}"


def test_suspect_samples_are_read_by_receipt_time(
    client: TestClient, keys: dict[str, str], wrong_clock: None
) -> None:
    received = window(RECEIVED - timedelta(minutes=1), RECEIVED + timedelta(minutes=1))
    response = client.get(
        f"/v1/devices/acme-1/telemetry/suspect?{received}&fields=i_ua,session",
        headers=auth(keys["viewer"]),
    )
    assert response.status_code == 200
    body = response.json()
    assert body["fields"] == ["i_ua", "session"]
    assert [(p["seq"], p["idx"], p["ts"], p["i_ua"]) for p in body["points"]] == [
        (1, 0, "2100-01-01T00:00:00Z", 100.0),
        (1, 1, "2100-01-02T00:00:00Z", 101.0),
        (2, 0, "1970-01-01T00:00:01Z", 100.0),
        (2, 1, "1970-01-01T00:00:01.100000Z", 101.0),
    ]
    assert {p["received_at"] for p in body["points"]} == {
        RECEIVED.isoformat().replace("+00:00", "Z")
    }
    # The plausible sample is in the telemetry read, by device time; the suspect ones are not.
    raw = client.get(
        f"/v1/devices/acme-1/telemetry?{window(RECEIVED - timedelta(hours=1), RECEIVED)}",
        headers=auth(keys["viewer"]),
    )
    assert len(raw.json()["points"]) == 1
    future = window(datetime(2100, 1, 1, tzinfo=UTC), datetime(2100, 1, 3, tzinfo=UTC))
    assert (
        client.get(f"/v1/devices/acme-1/telemetry?{future}", headers=auth(keys["viewer"])).json()[
            "points"
        ]
        == []
    )


def test_the_device_says_when_it_last_sent_a_suspect_clock(
    client: TestClient, keys: dict[str, str], wrong_clock: None
) -> None:
    detail = client.get("/v1/devices/acme-1", headers=auth(keys["viewer"])).json()
    assert detail["suspect_samples_at"] == RECEIVED.isoformat().replace("+00:00", "Z")
    listed = client.get("/v1/devices", headers=auth(keys["other"])).json()["items"]
    assert [(d["device_id"], d["suspect_samples_at"]) for d in listed] == [("other-1", None)]


def test_suspect_samples_of_another_brands_device_are_404(
    client: TestClient, keys: dict[str, str], wrong_clock: None
) -> None:
    received = window(RECEIVED - timedelta(minutes=1), RECEIVED + timedelta(minutes=1))
    response = client.get(
        f"/v1/devices/acme-1/telemetry/suspect?{received}", headers=auth(keys["other"])
    )
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"


def test_more_than_10000_suspect_samples_is_refused_with_a_way_to_narrow(
    client: TestClient, keys: dict[str, str], database_url: str, wrong_clock: None
) -> None:
    ingest(
        database_url,
        *(message(10 + i, *range(1000, 1000 + 1000 * 100, 100)) for i in range(10)),
    )
    received = window(RECEIVED - timedelta(minutes=1), RECEIVED + timedelta(minutes=1))
    response = client.get(
        f"/v1/devices/acme-1/telemetry/suspect?{received}", headers=auth(keys["viewer"])
    )
    assert response.status_code == 422
    assert response.json()["type"].endswith("too-many-points")
