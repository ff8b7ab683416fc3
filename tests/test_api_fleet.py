"""Brands and keys, the fleet summary and dead letters through the API."""

from pathlib import Path

import psycopg
import pytest
from fastapi.testclient import TestClient

from services.common.provisioning import provision_device
from services.common.signing import load_or_create_key
from tests.api import auth
from tests.rules import T0, Stream, run


def test_the_operator_creates_a_brand_and_its_admin_key_which_works_once_and_is_revoked(
    client: TestClient, keys: dict[str, str]
) -> None:
    operator = auth(keys["operator"])
    created = client.post("/v1/brands", json={"id": "glowco", "name": "GlowCo"}, headers=operator)
    assert created.status_code == 201
    assert (
        client.post(
            "/v1/brands", json={"id": "glowco", "name": "Again"}, headers=operator
        ).status_code
        == 409
    )
    issued = client.post(
        "/v1/api-keys", json={"brand": "glowco", "role": "admin", "name": "ops"}, headers=operator
    ).json()
    assert issued["key"].startswith("gvk_")
    glow = auth(issued["key"])
    assert client.get("/v1/fleet/summary", headers=glow).status_code == 200
    support = client.post(
        "/v1/api-keys", json={"brand": "glowco", "role": "support", "name": "desk"}, headers=glow
    ).json()
    assert client.delete(f"/v1/api-keys/{support['id']}", headers=glow).status_code == 204
    revoked = client.get("/v1/fleet/summary", headers=auth(support["key"]))
    assert revoked.status_code == 401


@pytest.mark.parametrize(
    ("who", "path", "body", "status"),
    [
        ("admin", "/v1/brands", {"id": "x1", "name": "X"}, 403),
        ("admin", "/v1/api-keys", {"brand": "other", "role": "viewer", "name": "n"}, 404),
        ("admin", "/v1/api-keys", {"brand": None, "role": "operator", "name": "n"}, 404),
        ("support", "/v1/api-keys", {"brand": "acme", "role": "viewer", "name": "n"}, 403),
        ("operator", "/v1/api-keys", {"brand": "acme", "role": "operator", "name": "n"}, 422),
        ("operator", "/v1/api-keys", {"brand": "nowhere", "role": "viewer", "name": "n"}, 404),
    ],
)
def test_brand_and_key_changes_are_refused_by_role_and_brand(
    client: TestClient, keys: dict[str, str], who: str, path: str, body: dict, status: int
) -> None:
    response = client.post(path, json=body, headers=auth(keys[who]))
    assert response.status_code == status
    assert response.headers["content-type"] == "application/problem+json"


def test_an_admin_cannot_revoke_another_brands_key(
    client: TestClient, keys: dict[str, str], database_url: str
) -> None:
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT id FROM api_keys WHERE name = 'o'").fetchone()
    assert row is not None
    assert client.delete(f"/v1/api-keys/{row[0]}", headers=auth(keys["admin"])).status_code == 404
    assert client.get("/v1/fleet/summary", headers=auth(keys["other"])).status_code == 200


def test_the_fleet_summary_counts_the_brands_devices_sessions_and_open_alerts(
    client: TestClient, keys: dict[str, str], database_url: str, tmp_path: Path
) -> None:
    with psycopg.connect(database_url) as conn:
        provision_device(conn, device_id="acme-1", brand_id="acme", model="m")
        provision_device(conn, device_id="acme-2", brand_id="acme", model="m")
        provision_device(conn, device_id="other-1", brand_id="other", model="m")
        conn.execute("UPDATE devices SET online = true WHERE id IN ('acme-1', 'other-1')")
        conn.execute(
            "INSERT INTO sessions (device_id, session, brand_id, started_at)"
            " VALUES ('acme-1', 's-today', 'acme', now()),"
            " ('acme-1', 's-old', 'acme', now() - interval '2 days'),"
            " ('other-1', 's-other', 'other', now())"
        )
    stream = Stream("acme-1")
    stream.event("fault", T0, code="short_circuit")
    stream.event("user_report", T0 + 1000, kind="redness")
    run(database_url, load_or_create_key(tmp_path / "k"), stream.messages)
    summary = client.get("/v1/fleet/summary", headers=auth(keys["viewer"])).json()
    assert summary == {
        "devices": 2,
        "online": 1,
        "sessions_today": 1,
        "open_alerts": {
            "total": 2,
            "by_severity": {"info": 0, "warning": 1, "critical": 1},
            "by_rule": {"device_fault": 1, "adverse_report": 1},
        },
    }


def test_dead_letters_are_shown_to_admins_of_the_devices_brand_and_to_the_operator(
    client: TestClient, keys: dict[str, str], database_url: str
) -> None:
    with psycopg.connect(database_url) as conn:
        provision_device(conn, device_id="acme-1", brand_id="acme", model="m")
        provision_device(conn, device_id="other-1", brand_id="other", model="m")
        for device in ("acme-1", "other-1", None):
            conn.execute(
                "INSERT INTO dead_letters (topic, device_id, channel, payload, payload_size,"
                " reason, detail, received_at) VALUES (%s, %s, 'telemetry', %s, 8,"
                " 'bad_json', 'not JSON', now())",
                [f"galvani/v1/d/{device or 'x'}/telemetry", device, b"not json"],
            )
    mine = client.get("/v1/dead-letters", headers=auth(keys["admin"])).json()["items"]
    assert [d["device_id"] for d in mine] == ["acme-1"]
    assert mine[0]["payload_preview_b64"] == "bm90IGpzb24="
    everything = client.get("/v1/dead-letters", headers=auth(keys["operator"])).json()["items"]
    assert [d["device_id"] for d in everything] == [None, "other-1", "acme-1"]
    assert client.get("/v1/dead-letters", headers=auth(keys["viewer"])).status_code == 403


def test_a_nul_byte_in_a_parameter_is_a_problem_not_a_500(
    client: TestClient, keys: dict[str, str]
) -> None:
    unknown = client.get(
        "/v1/dead-letters", params={"brand": "\x00"}, headers=auth(keys["operator"])
    )
    assert unknown.status_code == 404
    assert unknown.json()["detail"] == "there is no brand '\\x00'"
    refused = client.get("/v1/alerts", params={"rule": "a\x00b"}, headers=auth(keys["viewer"]))
    assert refused.status_code == 422
    assert refused.headers["content-type"] == "application/problem+json"
    assert "NUL" in refused.json()["detail"]


def test_dead_letters_filter_by_device_within_the_brand(
    client: TestClient, keys: dict[str, str], database_url: str
) -> None:
    with psycopg.connect(database_url) as conn:
        for device, brand in (("acme-1", "acme"), ("acme-2", "acme"), ("other-1", "other")):
            provision_device(conn, device_id=device, brand_id=brand, model="m")
            conn.execute(
                "INSERT INTO dead_letters (topic, device_id, channel, payload, payload_size,"
                " reason, detail, received_at) VALUES (%s, %s, 'telemetry', 'x', 1,"
                " 'unstorable', 'x', now())",
                [f"galvani/v1/d/{device}/telemetry", device],
            )

    def devices(who: str, query: str) -> list[str]:
        response = client.get(f"/v1/dead-letters?{query}", headers=auth(keys[who]))
        assert response.status_code == 200, response.text
        return [letter["device_id"] for letter in response.json()["items"]]

    assert devices("admin", "device=acme-2") == ["acme-2"]
    assert devices("admin", "device=acme-2&reason=bad_json") == []
    # Another brand's device shows nothing, exactly like a device that does not exist.
    assert devices("admin", "device=other-1") == devices("admin", "device=nowhere-9") == []
    assert devices("operator", "device=other-1") == ["other-1"]
    assert devices("operator", "brand=acme&device=other-1") == []
