"""Mode tables through the API: shape and envelope checked (422 naming field and limit)."""

import copy
from typing import Any

from fastapi.testclient import TestClient

from services.common.mode_tables import DEFAULT_MODES
from tests.api import auth


def table(**lift: object) -> dict[str, Any]:
    return {
        "name": "gentle",
        "modes": {"LIFT": {**copy.deepcopy(dict(DEFAULT_MODES["LIFT"])), **lift}},
        "locked_modes": ["INFUSE"],
    }


def test_an_admin_creates_a_table_and_every_role_of_the_brand_reads_it(
    client: TestClient, keys: dict[str, str]
) -> None:
    created = client.post(
        "/v1/mode-tables", json=table(i_target_ua=250), headers=auth(keys["admin"])
    )
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["brand"] == "acme"
    assert body["modes"]["LIFT"]["i_target_ua"] == 250
    assert body["modes"]["LIFT"]["z_ok_ohm"] == [1000, 20000]
    assert body["locked_modes"] == ["INFUSE"]
    assert body["created_by"].startswith("api-key:")
    for role in ("admin", "support", "viewer"):
        read = client.get(f"/v1/mode-tables/{body['id']}", headers=auth(keys[role]))
        assert read.status_code == 200
        assert read.json() == body


def test_a_table_outside_the_envelope_is_refused_naming_each_field_and_limit(
    client: TestClient, keys: dict[str, str]
) -> None:
    loose = table(i_max_ua=600, session_cap_s=1800)
    loose["modes"]["SAFE"] = {**DEFAULT_MODES["SAFE"], "min_batt_pct": 10}
    refused = client.post("/v1/mode-tables", json=loose, headers=auth(keys["admin"]))
    assert refused.status_code == 422
    assert refused.headers["content-type"] == "application/problem+json"
    problem = refused.json()
    assert problem["type"].endswith("/outside-envelope")
    assert {(e["field"], e["limit"], e["value"]) for e in problem["errors"]} == {
        ("modes.LIFT.i_max_ua", 500, 600),
        ("modes.LIFT.session_cap_s", 1200, 1800),
        ("modes.SAFE.min_batt_pct", 15, 10),
    }
    assert "modes.LIFT.i_max_ua: 600 is above the limit 500" in problem["detail"]
    listed = client.get("/v1/mode-tables", headers=auth(keys["admin"])).json()
    assert listed["items"] == []


def test_a_malformed_table_is_refused_naming_the_field(
    client: TestClient, keys: dict[str, str]
) -> None:
    cases = {
        "modes.LIFT.i_max_ua": table(i_max_ua=400.5),
        "modes.LIFT.waveform": table(waveform="square"),
        "modes.LIFT.surprise": table(surprise=1),
        "modes.LIFT": table(session_default_s=1300),
        "modes.FOO": {"name": "x", "modes": {"FOO": dict(DEFAULT_MODES["LIFT"])}},
        "modes": {"name": "x", "modes": {}},
    }
    for field, body in cases.items():
        refused = client.post("/v1/mode-tables", json=body, headers=auth(keys["admin"]))
        assert refused.status_code == 422, field
        problem = refused.json()
        assert problem["type"].endswith("/invalid-request")
        assert any(e["field"].startswith(f"body.{field}") for e in problem["errors"]), (
            field,
            problem,
        )


def test_only_admins_and_the_operator_naming_a_brand_create_tables(
    client: TestClient, keys: dict[str, str]
) -> None:
    for role in ("viewer", "support"):
        response = client.post("/v1/mode-tables", json=table(), headers=auth(keys[role]))
        assert response.status_code == 403
    no_brand = client.post("/v1/mode-tables", json=table(), headers=auth(keys["operator"]))
    assert no_brand.status_code == 403  # the operator may not act without naming the brand
    assert no_brand.json()["type"].endswith("/brand-required")
    named = client.post(
        "/v1/mode-tables", json={**table(), "brand": "acme"}, headers=auth(keys["operator"])
    )
    assert named.status_code == 201
    assert named.json()["brand"] == "acme"


def test_tables_are_listed_newest_first_in_pages_and_never_across_brands(
    client: TestClient, keys: dict[str, str]
) -> None:
    ids = []
    for n in range(5):
        created = client.post(
            "/v1/mode-tables", json={**table(), "name": f"t{n}"}, headers=auth(keys["admin"])
        )
        ids.append(created.json()["id"])
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/mode-tables", params=params, headers=auth(keys["viewer"])).json()
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids[::-1]
    assert client.get("/v1/mode-tables", headers=auth(keys["other"])).json()["items"] == []
    assert client.get(f"/v1/mode-tables/{ids[0]}", headers=auth(keys["other"])).status_code == 404
