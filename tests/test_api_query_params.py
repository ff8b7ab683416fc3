"""Query parameters an operation does not take are refused (422), never ignored; values out
of any range the API or its database can hold are 422 problems, never a 500 (issue 19, items
5 and 8)."""

from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient

from services.common.mode_tables import DEFAULT_MODES
from services.common.provisioning import provision_device
from tests.api import auth

INT64_MAX = 2**63 - 1


@pytest.mark.parametrize(
    ("who", "method", "path", "unknown"),
    [
        ("admin", "GET", "/v1/dead-letters?devce=acme-1", ["devce"]),
        ("viewer", "GET", "/v1/alerts?state=open&sort=id&order=asc", ["order", "sort"]),
        ("viewer", "GET", "/v1/devices?limit=5&onlne=true", ["onlne"]),
        ("viewer", "GET", "/v1/devices/acme-1?verbose=1", ["verbose"]),
        ("viewer", "GET", "/v1/fleet/summary?brand=acme", ["brand"]),
        ("admin", "GET", "/v1/mode-tables?limit=1&page=2", ["page"]),
        ("admin", "GET", "/v1/rules?x=", ["x"]),
        ("operator", "POST", "/v1/brands?dry_run=true", ["dry_run"]),
        ("admin", "DELETE", "/v1/devices/acme-1?force=1", ["force"]),
        ("viewer", "GET", "/healthz?probe=1", ["probe"]),
    ],
)
def test_an_unknown_query_parameter_is_refused_and_named(
    client: TestClient, keys: dict[str, str], who: str, method: str, path: str, unknown: list[str]
) -> None:
    response = client.request(
        method, path, headers=auth(keys[who]), json={"id": "dry", "name": "Dry"}
    )
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["type"].endswith("/unknown-parameter")
    assert [e["field"] for e in problem["errors"]] == [f"query.{name}" for name in unknown]
    assert problem["detail"].startswith(", ".join(unknown) + ": not a parameter")


def test_declared_query_parameters_are_still_taken(
    client: TestClient, keys: dict[str, str]
) -> None:
    ok = client.get("/v1/alerts?state=open&severity=critical&limit=5", headers=auth(keys["viewer"]))
    assert ok.status_code == 200
    steer = client.post(
        "/v1/rollouts/6f1c2b0e-8d4a-4a57-9c61-0d1f5a3e7b21/pause?brand=acme",
        headers=auth(keys["operator"]),
    )
    assert steer.status_code == 404  # `brand` is a parameter of steering (a dependency's)


@pytest.fixture
def device(database_url: str) -> str:
    with psycopg.connect(database_url) as conn:
        provision_device(conn, device_id="acme-1", brand_id="acme", model="m")
    return "acme-1"


@pytest.mark.parametrize(
    "path",
    [
        "/v1/devices/acme-1/telemetry?from=253402300800000&to=253402300800001",
        "/v1/devices/acme-1/telemetry?from=12345678901234567890&to=1",
        "/v1/devices/acme-1/telemetry?from=0&to=99999999999999999999999999",
        "/v1/devices/acme-1/telemetry?from=-1&to=5",
        "/v1/devices/acme-1/telemetry?from=2026-13-01T00:00:00Z&to=5",
        "/v1/devices/acme-1/telemetry?from=0&to=10&bucket=9999999d",
        f"/v1/alerts?cursor={INT64_MAX + 1}",
        "/v1/alerts?cursor=-1",
        "/v1/alerts?limit=100000000000000000000",
        f"/v1/alerts/{INT64_MAX + 1}",
        "/v1/alerts/0",
        f"/v1/devices/acme-1/events?cursor={INT64_MAX + 1}",
        f"/v1/devices/acme-1/conflicts?cursor={10**30}",
        "/v1/devices/acme-1/sessions?cursor=9999999999999999999~s",
        "/v1/devices?limit=0",
        "/v1/mode-tables?cursor=99999999999999999~6f1c2b0e-8d4a-4a57-9c61-0d1f5a3e7b21",
        f"/v1/dead-letters?cursor={INT64_MAX + 1}",
    ],
)
def test_a_value_out_of_range_is_a_problem_not_a_500(
    client: TestClient, keys: dict[str, str], device: str, path: str
) -> None:
    who = "admin"
    response = client.get(path, headers=auth(keys[who]))
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"


def test_telemetry_times_at_the_edges_answer_and_a_reversed_range_is_empty(
    client: TestClient, keys: dict[str, str], device: str
) -> None:
    headers = auth(keys["viewer"])
    base = f"/v1/devices/{device}/telemetry"
    last_ms = 253_402_300_799_999
    edges = client.get(f"{base}?from=0&to={last_ms}&bucket=1d&fields=i_ua", headers=headers)
    # Cut to the times a device can report: too many buckets, said as such (not a 500).
    assert edges.status_code == 422
    assert edges.json()["type"].endswith("/too-many-points")
    far = client.get(
        f"{base}?from=0001-01-01T00:00:00%2B23:59&to=9999-12-31T23:59:59-23:59&bucket=365d",
        headers=headers,
    )
    assert far.status_code == 200, far.text
    reversed_ = client.get(f"{base}?from=2000&to=1000", headers=headers)
    assert reversed_.status_code == 200
    assert reversed_.json()["points"] == []
    assert reversed_.json()["from"] == datetime(
        1970, 1, 1, 0, 0, 2, tzinfo=UTC
    ).isoformat().replace("+00:00", "Z")


def test_the_document_offers_no_null_for_a_parameter_and_bounds_last_event_id(
    client: TestClient,
) -> None:
    document = client.get("/openapi.json").json()
    parameters = [
        (path, parameter)
        for path, operations in document["paths"].items()
        for operation in operations.values()
        for parameter in operation.get("parameters", [])
    ]
    nullable = [
        f"{path} {p['name']}"
        for path, p in parameters
        if any(b.get("type") == "null" for b in p["schema"].get("anyOf", []))
    ]
    assert nullable == []
    [last] = [p for path, p in parameters if p["name"] == "last-event-id"]
    schema = last["schema"]
    assert (schema["type"], schema["minimum"], schema["maximum"]) == ("integer", 0, INT64_MAX)


@pytest.mark.parametrize(
    ("path", "methods"),
    [
        ("/v1/devices/acme-1", "DELETE, GET"),
        ("/v1/mode-tables", "GET, POST"),
        ("/v1/rules", "GET"),
    ],
)
def test_a_405_lists_every_method_of_the_path(
    client: TestClient, keys: dict[str, str], path: str, methods: str
) -> None:
    response = client.request("OPTIONS", path, headers=auth(keys["admin"]))
    assert response.status_code == 405
    assert response.headers["allow"] == methods
    assert response.headers["content-type"] == "application/problem+json"


@pytest.mark.parametrize(
    ("header", "status"),
    [("9223372036854775808", 422), ("-1", 422), ("x1", 422)],
)
def test_a_last_event_id_the_document_refuses_is_refused(
    client: TestClient, keys: dict[str, str], header: str, status: int
) -> None:
    response = client.get(
        "/v1/alerts/stream", headers={**auth(keys["viewer"]), "Last-Event-ID": header}
    )
    assert response.status_code == status
    assert response.headers["content-type"] == "application/problem+json"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/mode-tables", {"i_max_ua": 2**31}),
        ("/v1/mode-tables", {"cooldown_s": 2**63}),
        ("/v1/mode-tables", {"t_elec_max_c": -(2**63)}),
        ("/v1/rollouts", {"expires_at": "9999-12-31T23:59:59-23:59"}),
        ("/v1/rollouts", {"expires_at": "0001-01-01T00:00:00+23:59"}),
        ("/v1/rules/offline", {"thresholds": {"hours": 1e308}}),
    ],
)
def test_a_body_value_out_of_range_is_a_problem_not_a_500(
    client: TestClient, keys: dict[str, str], device: str, path: str, body: dict[str, Any]
) -> None:
    if path == "/v1/mode-tables":
        body = {"name": "t", "modes": {"LIFT": {**DEFAULT_MODES["LIFT"], **body}}}
    elif path == "/v1/rollouts":
        # A real table and device: the expiry is the only thing wrong with the body.
        table = client.post(
            "/v1/mode-tables",
            json={"name": "t", "modes": {"LIFT": DEFAULT_MODES["LIFT"]}},
            headers=auth(keys["admin"]),
        )
        assert table.status_code == 201, table.text
        body = {"mode_table_id": table.json()["id"], "target": {"all": True}, **body}
    method = "PATCH" if path.startswith("/v1/rules") else "POST"
    response = client.request(method, path, json=body, headers=auth(keys["admin"]))
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
