"""Alerts through the API: list and filter, explanation, acknowledge and resolve (who, when)."""

from collections.abc import Callable, Sequence
from pathlib import Path

import psycopg
import pytest
from fastapi.testclient import TestClient
from psycopg.rows import dict_row

from services.common.provisioning import provision_device
from services.common.signing import load_or_create_key
from tests.api import auth
from tests.rules import MINUTE, T0, Received, Stream, run

RunRules = Callable[[Sequence[Received]], None]


@pytest.fixture
def rules(database_url: str, tmp_path: Path) -> RunRules:
    """Run the rules engine on messages, with one signing key for the test."""
    key = load_or_create_key(tmp_path / "k")
    return lambda messages: run(database_url, key, messages)


@pytest.fixture
def raised(database_url: str, keys: dict[str, str], rules: RunRules) -> dict[str, int]:
    """Alerts raised by the rules engine: two for acme's device, one for the other brand's."""
    with psycopg.connect(database_url) as conn:
        provision_device(conn, device_id="acme-1", brand_id="acme", model="m1")
        provision_device(conn, device_id="other-1", brand_id="other", model="m1")
    acme, other = Stream("acme-1"), Stream("other-1")
    acme.event("fault", T0, code="dc_offset")
    acme.event("user_report", T0 + MINUTE, kind="redness")
    other.event("fault", T0, code="dc_offset")
    rules(acme.messages + other.messages)
    with psycopg.connect(database_url, row_factory=dict_row) as conn:
        rows = conn.execute("SELECT device_id || ':' || rule AS name, id FROM alerts").fetchall()
    return {row["name"]: row["id"] for row in rows}


def test_alerts_are_listed_newest_first_for_the_keys_brand_only(
    client: TestClient, keys: dict[str, str], raised: dict[str, int]
) -> None:
    body = client.get("/v1/alerts", headers=auth(keys["viewer"])).json()
    assert [a["id"] for a in body["items"]] == [
        raised["acme-1:adverse_report"],
        raised["acme-1:device_fault"],
    ]
    assert body["next_cursor"] is None
    first = body["items"][0]
    assert first["explanation"]["text"] == (
        "The user reported redness after using the device; no action was taken on the device."
    )
    assert set(first["explanation"]) >= {"threshold", "observed", "window", "action", "text"}


def test_filters_and_cursor_pagination(
    client: TestClient, keys: dict[str, str], raised: dict[str, int]
) -> None:
    headers = auth(keys["viewer"])
    page = client.get("/v1/alerts?limit=1", headers=headers).json()
    assert [a["rule"] for a in page["items"]] == ["adverse_report"]
    rest = client.get(f"/v1/alerts?limit=1&cursor={page['next_cursor']}", headers=headers).json()
    assert [a["rule"] for a in rest["items"]] == ["device_fault"]
    assert rest["next_cursor"] is None
    only = client.get("/v1/alerts?rule=device_fault&severity=warning", headers=headers).json()
    assert [a["id"] for a in only["items"]] == [raised["acme-1:device_fault"]]
    assert client.get("/v1/alerts?state=resolved", headers=headers).json()["items"] == []
    bad = client.get("/v1/alerts?cursor=nonsense", headers=headers)
    assert bad.status_code == 422
    assert bad.json()["type"].endswith("/invalid-cursor")


def test_support_acknowledges_then_resolves_and_each_transition_records_who_and_when(
    client: TestClient, keys: dict[str, str], raised: dict[str, int]
) -> None:
    alert_id = raised["acme-1:device_fault"]
    acked = client.post(
        f"/v1/alerts/{alert_id}/ack",
        json={"note": "calling the customer"},
        headers=auth(keys["support"]),
    )
    assert acked.status_code == 200
    assert acked.json()["state"] == "acknowledged"
    assert acked.json()["acknowledged_by"].startswith("api-key:")
    again = client.post(f"/v1/alerts/{alert_id}/ack", headers=auth(keys["support"]))
    assert again.json()["acknowledged_at"] == acked.json()["acknowledged_at"]
    resolved = client.post(
        f"/v1/alerts/{alert_id}/resolve",
        json={"note": "gel reapplied"},
        headers=auth(keys["admin"]),
    ).json()
    assert (resolved["state"], resolved["resolution"]) == ("resolved", "gel reapplied")
    assert [(t["from_state"], t["to_state"], t["note"]) for t in resolved["transitions"]] == [
        (None, "open", resolved["explanation"]["text"]),
        ("open", "acknowledged", "calling the customer"),
        ("acknowledged", "resolved", "gel reapplied"),
    ]
    assert resolved["transitions"][0]["actor"] == "galvani-rules"
    conflict = client.post(f"/v1/alerts/{alert_id}/ack", headers=auth(keys["support"]))
    assert conflict.status_code == 409
    assert conflict.headers["content-type"] == "application/problem+json"


def test_a_repeat_after_resolution_opens_a_new_alert(
    client: TestClient, keys: dict[str, str], raised: dict[str, int], rules: RunRules
) -> None:
    alert_id = raised["acme-1:device_fault"]
    client.post(f"/v1/alerts/{alert_id}/resolve", headers=auth(keys["admin"]))
    stream = Stream("acme-1", seq=100)
    stream.event("fault", T0 + 5 * MINUTE, code="dc_offset")
    rules(stream.messages)
    faults = client.get("/v1/alerts?rule=device_fault", headers=auth(keys["viewer"])).json()
    assert [(a["state"], a["count"]) for a in faults["items"]] == [("open", 1), ("resolved", 1)]


@pytest.mark.parametrize(
    ("who", "method", "path", "status"),
    [
        ("viewer", "post", "/ack", 403),
        ("viewer", "post", "/resolve", 403),
        ("other", "get", "", 404),
        ("other", "post", "/ack", 404),
        ("other", "post", "/resolve", 404),
        ("operator", "get", "", 403),
    ],
)
def test_roles_and_other_brands_are_refused(
    client: TestClient,
    keys: dict[str, str],
    raised: dict[str, int],
    who: str,
    method: str,
    path: str,
    status: int,
) -> None:
    alert_id = raised["acme-1:device_fault"]
    response = getattr(client, method)(f"/v1/alerts/{alert_id}{path}", headers=auth(keys[who]))
    assert response.status_code == status
    assert response.headers["content-type"] == "application/problem+json"
    detail = client.get(f"/v1/alerts/{alert_id}", headers=auth(keys["viewer"])).json()
    assert detail["state"] == "open"


def test_an_unknown_alert_is_404_like_another_brands(
    client: TestClient, keys: dict[str, str], raised: dict[str, int]
) -> None:
    mine = client.get("/v1/alerts/999999", headers=auth(keys["viewer"]))
    theirs = client.get(
        f"/v1/alerts/{raised['other-1:device_fault']}", headers=auth(keys["viewer"])
    )
    assert mine.status_code == theirs.status_code == 404
    assert mine.json()["title"] == theirs.json()["title"]
