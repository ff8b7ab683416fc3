"""Users through the API: stage and contraindications, usage over rolling windows."""

import psycopg
from fastapi.testclient import TestClient

from services.common.provisioning import provision_device
from tests.api import auth


def test_an_admin_sets_stage_and_contraindications_and_the_rules_see_them(
    client: TestClient, keys: dict[str, str], database_url: str
) -> None:
    response = client.put(
        "/v1/users/ann",
        json={"stage": "maintenance", "contraindications": ["pregnancy", "implant"]},
        headers=auth(keys["admin"]),
    )
    assert response.status_code == 200
    assert response.json()["contraindications"] == ["implant", "pregnancy"]
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT stage, contraindications FROM users WHERE brand_id = 'acme' AND id = 'ann'"
        ).fetchone()
    assert row == ("maintenance", ["implant", "pregnancy"])


def test_usage_counts_sessions_and_output_minutes_in_24_hours_and_7_days(
    client: TestClient, keys: dict[str, str], database_url: str
) -> None:
    client.put("/v1/users/bo", json={"stage": "intro"}, headers=auth(keys["admin"]))
    with psycopg.connect(database_url) as conn:
        provision_device(conn, device_id="acme-1", brand_id="acme", model="m", user_id="bo")
        conn.execute(
            "INSERT INTO sessions (device_id, session, brand_id, user_id, started_at, output_s)"
            " VALUES ('acme-1', 'a', 'acme', 'bo', now() - interval '1 hour', 300),"
            " ('acme-1', 'b', 'acme', 'bo', now() - interval '3 days', 600),"
            " ('acme-1', 'c', 'acme', 'bo', now() - interval '8 days', 900)"
        )
    usage = client.get("/v1/users/bo/usage", headers=auth(keys["viewer"])).json()
    assert usage["last_24h"] == {"sessions": 1, "output_min": 5.0}
    assert usage["last_7d"] == {"sessions": 2, "output_min": 15.0}
    assert (usage["stage"], usage["limit_sessions_7d"]) == ("intro", 7)


def test_users_are_per_brand_and_only_admins_change_them(
    client: TestClient, keys: dict[str, str]
) -> None:
    client.put("/v1/users/cy", json={"stage": "intro"}, headers=auth(keys["admin"]))
    assert client.get("/v1/users/cy/usage", headers=auth(keys["other"])).status_code == 404
    refused = client.put("/v1/users/cy", json={"stage": "intro"}, headers=auth(keys["support"]))
    assert refused.status_code == 403
    bad = client.put(
        "/v1/users/cy",
        json={"stage": "intro", "contraindications": ["cold"]},
        headers=auth(keys["admin"]),
    )
    assert bad.status_code == 422
    assert bad.headers["content-type"] == "application/problem+json"
