"""``GET /v1/devices/{id}/conflicts`` and the seq-reset fields of a device, through the API.

The conflicts are made by the ingest writer on the real database, as a device whose seq
restarted would make them.
"""

import base64
import json
from datetime import UTC, datetime

import psycopg
from fastapi.testclient import TestClient

from services.common.db import storage_of
from services.common.provisioning import provision_device
from services.common.subscriber import Inbound
from services.ingest.decode import decode_inbound
from services.ingest.writer import write_batch
from tests.api import auth
from tests.ingest import T0_MS, event, telemetry, topic

DEVICE = "acme-glow-1"
OTHER_DEVICE = "other-glow-1"
HOUR_MS = 3_600_000


def make_device(url: str, device_id: str, brand: str) -> None:
    with psycopg.connect(url) as conn:
        provision_device(conn, device_id=device_id, brand_id=brand, model="glow-2")


def ingest(url: str, device_id: str, *messages: tuple[str, bytes]) -> None:
    received = datetime.now(UTC)
    batch = [
        decode_inbound(Inbound(topic(device_id, channel), payload, 1, 1, received, 1))
        for channel, payload in messages
    ]
    with psycopg.connect(url) as conn, conn.transaction():
        write_batch(conn, batch, storage_of(conn))


def reset_device(url: str, device_id: str, count: int) -> list[bytes]:
    """``count`` messages stored, then the device's counter restarts and reuses each seq;
    returns the reused payloads in the order sent."""
    ingest(
        url,
        device_id,
        *[("telemetry", telemetry(seq, T0_MS + seq * 1000)) for seq in range(1, count + 1)],
    )
    reused = [
        telemetry(seq, T0_MS + HOUR_MS + seq * 1000, session="s-2") for seq in range(1, count + 1)
    ]
    ingest(url, device_id, *[("telemetry", payload) for payload in reused])
    return reused


def test_conflicts_listed_for_the_devices_brand_only(
    client: TestClient, keys: dict[str, str], database_url: str
) -> None:
    make_device(database_url, DEVICE, "acme")
    make_device(database_url, OTHER_DEVICE, "other")
    [reused] = reset_device(database_url, DEVICE, 1)
    reset_device(database_url, OTHER_DEVICE, 1)

    answer = client.get(f"/v1/devices/{DEVICE}/conflicts", headers=auth(keys["viewer"]))

    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["next_cursor"] is None
    [item] = body["items"]
    assert (item["reason"], item["channel"], item["seq"]) == ("seq_reused", "telemetry", 1)
    assert item["payload"] == json.loads(reused)
    assert item["payload_b64"] is None
    assert item["payload_size"] == len(reused)
    assert item["detail"]["stored"]["crc32"] != item["detail"]["crc32"]
    assert datetime.fromisoformat(item["ts"]).timestamp() * 1000 == T0_MS + HOUR_MS + 1000
    for key, device in (("other", DEVICE), ("viewer", OTHER_DEVICE), ("viewer", "no-such-1")):
        refused = client.get(f"/v1/devices/{device}/conflicts", headers=auth(keys[key]))
        assert refused.status_code == 404, (key, device)
        assert refused.headers["content-type"] == "application/problem+json"
        assert refused.json()["type"] == "https://galvani.dev/problems/not-found"
    operator = client.get(f"/v1/devices/{DEVICE}/conflicts", headers=auth(keys["operator"]))
    assert operator.status_code == 403


def test_conflicts_are_listed_newest_first_in_pages(
    client: TestClient, keys: dict[str, str], database_url: str
) -> None:
    make_device(database_url, DEVICE, "acme")
    reset_device(database_url, DEVICE, 5)
    ingest(
        database_url,
        DEVICE,
        ("events", event(9, T0_MS, "reboot", reason="power_on")),
    )
    ingest(database_url, DEVICE, ("events", event(9, T0_MS + HOUR_MS, "reboot", reason="panic")))
    headers = auth(keys["viewer"])

    seen: list[dict[str, object]] = []
    cursor = None
    while True:
        query = f"?limit=2&cursor={cursor}" if cursor else "?limit=2"
        page = client.get(f"/v1/devices/{DEVICE}/conflicts{query}", headers=headers).json()
        assert len(page["items"]) <= 2
        seen += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            break

    assert [(i["channel"], i["seq"]) for i in seen] == [("events", 9)] + [
        ("telemetry", seq) for seq in (5, 4, 3, 2, 1)
    ]
    ids = [i["id"] for i in seen]
    assert ids == sorted(ids, reverse=True)
    only = client.get(
        f"/v1/devices/{DEVICE}/conflicts?reason=sample_conflict", headers=headers
    ).json()
    assert only["items"] == []
    bad = client.get(f"/v1/devices/{DEVICE}/conflicts?cursor=nonsense", headers=headers)
    assert bad.status_code == 422


def test_a_payload_that_is_not_json_is_given_in_base64(
    client: TestClient, keys: dict[str, str], database_url: str
) -> None:
    make_device(database_url, DEVICE, "acme")
    raw = b"\xff\x00not json"
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "INSERT INTO message_conflicts (device_id, channel, seq, reason, payload,"
            " payload_crc32, received_at, detail) VALUES (%s, 'events', 3, 'seq_reused', %s, 7,"
            " now(), '{}')",
            [DEVICE, raw],
        )
    [item] = client.get(f"/v1/devices/{DEVICE}/conflicts", headers=auth(keys["viewer"])).json()[
        "items"
    ]
    assert item["payload"] is None
    assert base64.b64decode(item["payload_b64"]) == raw
    assert item["ts"] is None


def test_a_device_whose_seq_restarted_says_so(
    client: TestClient, keys: dict[str, str], database_url: str
) -> None:
    make_device(database_url, DEVICE, "acme")
    headers = auth(keys["viewer"])
    before = client.get(f"/v1/devices/{DEVICE}", headers=headers).json()
    assert (before["seq_reused"], before["seq_resets"], before["seq_reset_at"]) == (0, 0, None)

    reset_device(database_url, DEVICE, 3)

    after = client.get(f"/v1/devices/{DEVICE}", headers=headers).json()
    assert (after["seq_reused"], after["seq_resets"]) == (3, 1)
    assert after["seq_reset_at"] is not None
    assert after["seq_reused_at"] is not None
    assert after["last_seq"] == 3
    [listed] = client.get("/v1/devices", headers=headers).json()["items"]
    assert listed["seq_resets"] == 1
