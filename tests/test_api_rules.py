"""The API's signing-key and rule-threshold endpoints, with real keys in a real database."""

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from services.common.signing import NEXT_KEY_FILE, key_id, load_or_create_key, public_key_b64
from tests.api import auth


def test_the_signing_key_endpoint_serves_the_public_half_of_the_data_dirs_key(
    client: TestClient, keys: dict[str, str], tmp_path: Path
) -> None:
    response = client.get("/v1/config-signing-key", headers=auth(keys["viewer"]))
    assert response.status_code == 200
    current = load_or_create_key(tmp_path / "secrets")
    expected = public_key_b64(current)
    assert response.json() == {
        "public_key": expected,
        "algorithm": "ed25519",
        "kid": key_id(current),
        "keys": [{"kid": key_id(current), "public_key": expected, "use": "current"}],
    }


def test_the_signing_key_endpoint_serves_the_next_key_once_a_rotation_starts(
    client: TestClient, keys: dict[str, str], tmp_path: Path
) -> None:
    upcoming = load_or_create_key(tmp_path / "secrets", NEXT_KEY_FILE)
    response = client.get("/v1/config-signing-key", headers=auth(keys["viewer"]))
    assert response.status_code == 200
    body = response.json()
    assert body["public_key"] == public_key_b64(load_or_create_key(tmp_path / "secrets"))
    assert [(k["use"], k["kid"]) for k in body["keys"]] == [
        ("current", body["kid"]),
        ("next", key_id(upcoming)),
    ]
    assert body["keys"][1]["public_key"] == public_key_b64(upcoming)


@pytest.mark.parametrize("header", [None, "Bearer gvk_not-a-key", "revoked"])
def test_missing_unknown_and_revoked_keys_get_401_problem_json(
    client: TestClient, keys: dict[str, str], header: str | None
) -> None:
    headers = {}
    if header == "revoked":
        headers = auth(keys["revoked"])
    elif header is not None:
        headers = {"Authorization": header}
    response = client.get("/v1/config-signing-key", headers=headers)
    assert response.status_code == 401
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["type"].endswith("/unauthorized")


def test_rules_list_the_catalogue_with_the_brands_thresholds(
    client: TestClient, keys: dict[str, str]
) -> None:
    response = client.get("/v1/rules", headers=auth(keys["viewer"]))
    assert response.status_code == 200
    rules = {rule["id"]: rule for rule in response.json()["items"]}
    assert len(rules) == 22
    [total] = [t for t in rules["no_gel"]["thresholds"] if t["name"] == "total_s"]
    assert total == {
        "name": "total_s",
        "unit": "s",
        "default": 10.0,
        "value": 10.0,
        "overridden": False,
        "tighter": "lower",
        "limit": 10.0,
        "tightest": 0.0,
    }


def test_an_admin_tightens_a_threshold_for_its_brand_only(
    client: TestClient, keys: dict[str, str]
) -> None:
    response = client.patch(
        "/v1/rules/no_gel", json={"thresholds": {"total_s": 5}}, headers=auth(keys["admin"])
    )
    assert response.status_code == 200
    [total] = [t for t in response.json()["thresholds"] if t["name"] == "total_s"]
    assert (total["value"], total["overridden"]) == (5.0, True)
    other = client.get("/v1/rules", headers=auth(keys["other"])).json()["items"]
    [no_gel] = [rule for rule in other if rule["id"] == "no_gel"]
    assert [t["value"] for t in no_gel["thresholds"] if t["name"] == "total_s"] == [10.0]
    reset = client.patch(
        "/v1/rules/no_gel", json={"thresholds": {"total_s": None}}, headers=auth(keys["admin"])
    )
    assert [t["value"] for t in reset.json()["thresholds"] if t["name"] == "total_s"] == [10.0]


def test_loosening_past_the_envelope_is_a_422_naming_the_field_and_limit(
    client: TestClient, keys: dict[str, str]
) -> None:
    response = client.patch(
        "/v1/rules/electrode_overtemp",
        json={"thresholds": {"critical_c": 45}},
        headers=auth(keys["admin"]),
    )
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["type"].endswith("/threshold-outside-envelope")
    assert body["errors"][0]["field"] == "thresholds.critical_c"
    assert body["errors"][0]["limit"] == 41


@pytest.mark.parametrize(
    ("who", "path", "body", "status"),
    [
        ("viewer", "/v1/rules/no_gel", {"thresholds": {"total_s": 5}}, 403),
        ("admin", "/v1/rules/no_such_rule", {"thresholds": {}}, 404),
        ("admin", "/v1/rules/no_gel", {"thresholds": {"total_s": "five"}}, 422),
        ("admin", "/v1/rules/no_gel", {"limits": {}}, 422),
        ("operator", "/v1/rules/no_gel", {"thresholds": {"total_s": 5}}, 403),
    ],
)
def test_rule_changes_are_refused_with_problem_json(
    client: TestClient,
    keys: dict[str, str],
    who: str,
    path: str,
    body: dict[str, object],
    status: int,
) -> None:
    response = client.patch(path, json=body, headers=auth(keys[who]))
    assert response.status_code == status
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["status"] == status


@pytest.mark.parametrize(
    "raw",
    [
        '{"thresholds": {"recent_days": 1000000}}',
        '{"thresholds": {"recent_days": true}}',
        '{"thresholds": {"recent_days": 1e400}}',
        '{"thresholds": {"hours": -1}}',
    ],
    ids=["past-tightest", "boolean", "infinite", "negative"],
)
def test_thresholds_that_mean_nothing_are_refused(
    client: TestClient, keys: dict[str, str], raw: str
) -> None:
    response = client.patch(
        "/v1/rules/offline",
        content=raw,
        headers={**auth(keys["admin"]), "Content-Type": "application/json"},
    )
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    listed = client.get("/v1/rules", headers=auth(keys["admin"])).json()["items"]
    [offline] = [rule for rule in listed if rule["id"] == "offline"]
    assert not any(t["overridden"] for t in offline["thresholds"])
