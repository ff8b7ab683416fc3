"""Devices through the API: provisioning reaches the real broker at once, and so does revocation."""

import json
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from fastapi.testclient import TestClient

from deploy.stack.mosquitto import MosquittoBroker
from services.api.main import create_app
from services.api.settings import ApiSettings
from services.common.provisioning import provision_device
from services.common.signing import load_or_create_key
from tests.api import auth
from tests.ingest import Device, connect_device
from tests.rules import T0, Stream, run


@pytest.fixture
def api(broker_api_settings: ApiSettings) -> Iterator[TestClient]:
    with TestClient(create_app(broker_api_settings)) as client:
        yield client


def provision(api: TestClient, key: str, device_id: str, **extra: object) -> dict[str, object]:
    response = api.post(
        "/v1/devices", json={"device_id": device_id, "model": "glow-2", **extra}, headers=auth(key)
    )
    assert response.status_code == 201, response.text
    body: dict[str, object] = response.json()
    return body


def test_a_provisioned_device_connects_within_a_second_and_a_revoked_one_is_cut_off(
    api: TestClient, keys: dict[str, str], broker: MosquittoBroker
) -> None:
    body = provision(api, keys["admin"], "glow-00001", user="u-1")
    mqtt = body["mqtt"]
    assert isinstance(mqtt, dict)
    assert (mqtt["username"], mqtt["client_id"], mqtt["port"]) == (
        "glow-00001",
        "glow-00001",
        broker.config.device_port,
    )
    assert mqtt["topic_prefix"] == "galvani/v1/d/glow-00001"
    started = time.monotonic()
    device = connect_device(mqtt["port"], Device("glow-00001", str(mqtt["password"])))
    assert time.monotonic() - started < 1.0
    try:
        detail = api.get("/v1/devices/glow-00001", headers=auth(keys["viewer"])).json()
        assert (detail["brand"], detail["user"], detail["online"]) == ("acme", "u-1", False)
        gone = api.delete("/v1/devices/glow-00001", headers=auth(keys["admin"]))
        assert gone.status_code == 204
        assert device.wait_disconnected(5), "the revoked device stayed connected"
    finally:
        device.close()
    listed = api.get("/v1/devices", headers=auth(keys["viewer"])).json()
    assert listed["items"] == []
    detail = api.get("/v1/devices/glow-00001", headers=auth(keys["viewer"])).json()
    assert detail["decommissioned_at"] is not None


def test_devices_are_listed_in_pages_and_filtered(api: TestClient, keys: dict[str, str]) -> None:
    for n in range(5):
        provision(api, keys["admin"], f"glow-{n:05d}")
    headers = auth(keys["viewer"])
    first = api.get("/v1/devices?limit=2", headers=headers).json()
    assert [d["device_id"] for d in first["items"]] == ["glow-00000", "glow-00001"]
    second = api.get(f"/v1/devices?limit=2&cursor={first['next_cursor']}", headers=headers).json()
    assert [d["device_id"] for d in second["items"]] == ["glow-00002", "glow-00003"]
    assert api.get("/v1/devices?online=true", headers=headers).json()["items"] == []
    assert len(api.get("/v1/devices?model=glow-2", headers=headers).json()["items"]) == 5
    assert api.get("/v1/devices?alerting=true", headers=headers).json()["items"] == []


@pytest.mark.parametrize(
    ("who", "body", "status", "kind"),
    [
        ("viewer", {"device_id": "glow-1", "model": "m"}, 403, "forbidden"),
        ("support", {"device_id": "glow-1", "model": "m"}, 403, "forbidden"),
        ("admin", {"device_id": "Not/Valid", "model": "m"}, 422, "invalid-request"),
        ("admin", {"device_id": "glow-1"}, 422, "invalid-request"),
        ("operator", {"device_id": "glow-1", "model": "m"}, 403, "brand-required"),
        ("admin", {"device_id": "glow-1", "model": "m", "brand": "other"}, 404, "not-found"),
    ],
)
def test_provisioning_is_refused_with_problem_json(
    api: TestClient, keys: dict[str, str], who: str, body: dict[str, str], status: int, kind: str
) -> None:
    response = api.post("/v1/devices", json=body, headers=auth(keys[who]))
    assert response.status_code == status
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"].endswith("/" + kind)


@pytest.mark.parametrize("device_id", ["galvani-ingest-1", "galvani-x"])
def test_a_device_id_reserved_for_the_backend_is_refused_with_problem_json(
    client: TestClient, keys: dict[str, str], device_id: str
) -> None:
    refused = client.post(
        "/v1/devices", json={"device_id": device_id, "model": "m"}, headers=auth(keys["admin"])
    )
    assert refused.status_code == 422
    assert refused.headers["content-type"] == "application/problem+json"
    problem = refused.json()
    assert problem["type"] == "https://galvani.dev/problems/reserved-device-id"
    assert device_id in problem["detail"]
    assert "choose an id with another prefix" in problem["detail"]
    headers = auth(keys["viewer"])
    assert client.get(f"/v1/devices/{device_id}", headers=headers).status_code == 404
    ordinary = client.post(
        "/v1/devices", json={"device_id": "glow-00077", "model": "m"}, headers=auth(keys["admin"])
    )
    assert ordinary.status_code == 201, ordinary.text


def test_a_device_id_is_provisioned_once_and_the_operator_names_the_brand(
    api: TestClient, keys: dict[str, str]
) -> None:
    provision(api, keys["operator"], "glow-00009", brand="other")
    again = api.post(
        "/v1/devices", json={"device_id": "glow-00009", "model": "m"}, headers=auth(keys["admin"])
    )
    assert again.status_code == 409
    # acme's keys cannot see the other brand's device, whatever the route.
    assert api.get("/v1/devices/glow-00009", headers=auth(keys["admin"])).status_code == 404
    assert api.delete("/v1/devices/glow-00009", headers=auth(keys["admin"])).status_code == 404
    assert api.get("/v1/devices/glow-00009", headers=auth(keys["other"])).status_code == 200


def test_a_devices_sessions_and_events_are_listed_newest_first_in_pages(
    client: TestClient, keys: dict[str, str], database_url: str
) -> None:
    with psycopg.connect(database_url) as conn:
        provision_device(conn, device_id="acme-1", brand_id="acme", model="m")
        provision_device(conn, device_id="other-1", brand_id="other", model="m")
        for n in range(3):
            conn.execute(
                "INSERT INTO sessions (device_id, session, brand_id, mode, level, started_at,"
                " ended_at, duration_s, end_reason, output_s, samples, out_samples,"
                " gel_ok_samples) VALUES ('acme-1', %s, 'acme', 'LIFT', 5,"
                " now() - %s * interval '1 day', now() - %s * interval '1 day'"
                " + interval '5 minutes', 300, 'completed', 300, 3000, 3000, 2400)",
                [f"s{n}", 3 - n, 3 - n],
            )
            conn.execute(
                "INSERT INTO events (device_id, seq, ts, type, session, body, received_at)"
                " VALUES ('acme-1', %s, now(), 'session_start', %s, '{}', now())",
                [n + 1, f"s{n}"],
            )
    headers = auth(keys["viewer"])
    first = client.get("/v1/devices/acme-1/sessions?limit=2", headers=headers).json()
    assert [s["session"] for s in first["items"]] == ["s2", "s1"]
    assert first["items"][0]["gel_ok_share"] == pytest.approx(0.8)
    rest = client.get(
        f"/v1/devices/acme-1/sessions?limit=2&cursor={first['next_cursor']}", headers=headers
    ).json()
    assert ([s["session"] for s in rest["items"]], rest["next_cursor"]) == (["s0"], None)
    events = client.get("/v1/devices/acme-1/events?limit=2", headers=headers).json()
    assert [e["seq"] for e in events["items"]] == [3, 2]
    more = client.get(
        f"/v1/devices/acme-1/events?cursor={events['next_cursor']}", headers=headers
    ).json()
    assert [e["seq"] for e in more["items"]] == [1]
    for path in ("sessions", "events"):
        assert client.get(f"/v1/devices/other-1/{path}", headers=headers).status_code == 404


@pytest.fixture
def restricted(database_url: str, tmp_path: Path) -> str:
    """acme-1, restricted to SAFE by the rules after a short circuit (their table is v1)."""
    with psycopg.connect(database_url) as conn:
        provision_device(conn, device_id="acme-1", brand_id="acme", model="m")
    stream = Stream("acme-1")
    stream.event("fault", T0, code="short_circuit")
    run(database_url, load_or_create_key(tmp_path / "k"), stream.messages)
    return "acme-1"


def test_the_config_view_shows_desired_reported_drift_and_history(
    client: TestClient, keys: dict[str, str], database_url: str, restricted: str
) -> None:
    headers = auth(keys["viewer"])
    pending = client.get(f"/v1/devices/{restricted}/config", headers=headers).json()
    assert (pending["desired_version"], pending["reported_version"], pending["drift"]) == (
        1,
        None,
        True,
    )
    assert pending["desired"]["locked_modes"] == ["LIFT", "TIGHTEN", "INFUSE"]
    assert [(h["version"], h["source"], h["answer_status"]) for h in pending["history"]] == [
        (1, "rule", None)
    ]
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "UPDATE devices SET config_reported_version = 1, config_reported_status = 'applied',"
            " config_reported_sha256 = (SELECT sha256 FROM config_pushes WHERE version = 1)"
            " WHERE id = 'acme-1'"
        )
    applied = client.get(f"/v1/devices/{restricted}/config", headers=headers).json()
    assert applied["drift"] is False
    assert client.get("/v1/devices/other-1/config", headers=auth(keys["other"])).status_code == 404


def test_a_decommissioned_device_cannot_be_cleared(
    client: TestClient, keys: dict[str, str], restricted: str
) -> None:
    assert (
        client.delete(f"/v1/devices/{restricted}", headers=auth(keys["admin"])).status_code == 204
    )
    refused = client.post(f"/v1/devices/{restricted}/clear", headers=auth(keys["support"]))
    assert refused.status_code == 409, refused.text
    assert refused.json()["type"].endswith("/decommissioned")


def test_a_device_with_a_user_for_a_brand_that_does_not_exist_is_refused_not_a_500(
    client: TestClient, keys: dict[str, str]
) -> None:
    refused = client.post(
        "/v1/devices",
        json={"device_id": "glow-00042", "model": "glow-2", "user": "u1", "brand": "nobrand"},
        headers=auth(keys["operator"]),
    )
    # The operator named a brand that does not exist: 404, as for any other unknown brand.
    assert refused.status_code == 404, refused.text
    assert refused.json()["detail"] == "there is no brand 'nobrand'"


def test_an_id_of_another_brand_answers_exactly_as_an_id_of_ones_own_brand(
    api: TestClient, keys: dict[str, str]
) -> None:
    provision(api, keys["admin"], "glow-00010")  # acme's own
    provision(api, keys["other"], "glow-00020")  # the other brand's
    answers = [
        api.post(
            "/v1/devices", json={"device_id": device_id, "model": "m"}, headers=auth(keys["admin"])
        )
        for device_id in ("glow-00010", "glow-00020")
    ]
    own, others = (
        (a.status_code, a.headers["content-type"], a.json(), a.headers.get("retry-after"))
        for a in answers
    )
    assert own[0] == 409
    assert own[2]["type"].endswith("/device-exists")
    # Nothing but the id differs: not the status, the type, the title or the sentence.
    assert json.loads(json.dumps(others).replace("glow-00020", "glow-00010")) == json.loads(
        json.dumps(own)
    )
    assert others[2]["detail"] == (
        "device id 'glow-00020' is not available: device ids are MQTT client ids, unique across"
        " the platform; choose another"
    )


def test_a_key_naming_taken_device_ids_past_the_limit_is_refused_so_ids_cannot_be_enumerated(
    broker_api_settings: ApiSettings, keys: dict[str, str]
) -> None:
    settings = broker_api_settings.model_copy(update={"provision_conflicts_per_window": 3})
    with TestClient(create_app(settings)) as api:
        for n in range(4):
            provision(api, keys["other"], f"glow-0003{n}")
        codes = [
            api.post(
                "/v1/devices", json={"device_id": f"glow-0003{n}", "model": "m"},
                headers=auth(keys["admin"]),
            ).status_code
            for n in range(4)
        ]  # fmt: skip
        assert codes == [409, 409, 409, 429]
        # Past the limit, a free id is refused too: 201 against 409 would tell taken ids apart.
        free = api.post(
            "/v1/devices", json={"device_id": "glow-00099", "model": "m"},
            headers=auth(keys["admin"]),
        )  # fmt: skip
        assert free.status_code == 429, free.text
        assert free.headers["content-type"] == "application/problem+json"
        assert free.json()["type"].endswith("/rate-limited")
        assert 590 <= int(free.headers["retry-after"]) <= 600
        # Another key is not affected.
        provision(api, keys["operator"], "glow-00099", brand="acme")
