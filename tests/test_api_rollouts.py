"""Rollouts through the API: targets, canary, promote, pause, resume, abort, the canary guard,
rule locks kept, and a live rollout applied by real agents and answered through ingest."""

import base64
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from fastapi.testclient import TestClient
from psycopg.rows import dict_row

from deploy.stack.mosquitto import MosquittoBroker
from services.api.main import create_app
from services.api.settings import ApiSettings
from services.common.config_push import record_push
from services.common.mode_tables import DEFAULT_MODES, restricted_table
from services.common.protocol import canonical_json
from services.common.provisioning import provision_device, revoke_device
from services.common.rollouts import guard_canaries
from services.common.signing import load_or_create_key
from tests.api import auth
from tests.ingest import IngestWorkers, provision, scalar, wait_until
from tests.test_agent_live import AgentProcess


def devices(url: str, count: int, *, model: str = "glow-2", prefix: str = "d") -> list[str]:
    with psycopg.connect(url) as conn:
        return [
            provision_device(
                conn, device_id=f"{prefix}-{n:03d}", brand_id="acme", model=model
            ).device_id
            for n in range(count)
        ]


def mode_table(client: TestClient, key: str, **lift: object) -> str:
    body = {"name": "gentle", "modes": {"LIFT": {**DEFAULT_MODES["LIFT"], **lift}}}
    created = client.post("/v1/mode-tables", json=body, headers=auth(key))
    assert created.status_code == 201, created.text
    return str(created.json()["id"])


def rollout(client: TestClient, key: str, **body: object) -> dict[str, Any]:
    response = client.post("/v1/rollouts", json=body, headers=auth(key))
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def pushes(url: str, rollout_id: str) -> dict[str, dict[str, Any]]:
    """The rollout's recorded tables by device (its newest, where it has several)."""
    query = (
        "SELECT device_id, version, payload FROM config_pushes WHERE source_ref = %s"
        " ORDER BY device_id, version"
    )
    with psycopg.connect(url, row_factory=dict_row) as conn:
        return {row.pop("device_id"): row for row in conn.execute(query, [rollout_id])}


def restrict(url: str, key_dir: Path, device_id: str, *, lock_all: bool) -> None:
    """Record the table a rule pushes to restrict the device (SAFE only with ``lock_all``)."""
    now_ms = int(time.time() * 1000)
    table = restricted_table(
        None, version=0, issued_at_ms=now_ms, reason="rule overcurrent", lock_all=lock_all
    )
    signing_key = load_or_create_key(key_dir / "rules-key")
    with psycopg.connect(url) as conn:
        record_push(conn, signing_key, device_id=device_id, table=table, source="rule")


def answer(url: str, device_id: str, status: str = "applied") -> None:
    """The device's answer to its newest table, as ingest records it from ``state``."""
    with psycopg.connect(url) as conn:
        conn.execute(
            "UPDATE config_pushes SET answer_status = %s, answered_at = now()"
            " WHERE device_id = %s AND version = (SELECT config_desired_version FROM devices"
            " WHERE id = %s)",
            [status, device_id, device_id],
        )


def test_a_rollout_signs_the_table_for_every_target_with_each_devices_next_version(
    client: TestClient, keys: dict[str, str], database_url: str
) -> None:
    targets = devices(database_url, 3)
    others = devices(database_url, 1, model="glow-1", prefix="g1")
    with psycopg.connect(database_url) as conn:
        conn.execute("UPDATE devices SET config_reported_version = 4 WHERE id = %s", [targets[0]])
    table_id = mode_table(client, keys["admin"], i_target_ua=250)
    created = rollout(client, keys["admin"], mode_table_id=table_id, target={"model": "glow-2"})
    assert created["status"] == "running"
    assert created["progress"]["total"] == {
        "targets": 3, "waiting": 0, "pending": 0, "offline": 3, "applied": 0, "rejected": 0,
        "superseded": 0, "decommissioned": 0,
    }  # fmt: skip
    recorded = pushes(database_url, created["id"])
    assert sorted(recorded) == targets
    assert others[0] not in recorded
    assert recorded[targets[0]]["version"] == 5
    assert recorded[targets[1]]["version"] == 1
    public = client.get("/v1/config-signing-key", headers=auth(keys["viewer"])).json()
    verifier = Ed25519PublicKey.from_public_bytes(base64.b64decode(public["public_key"]))
    for push in recorded.values():
        payload = dict(push["payload"])
        assert payload["modes"]["LIFT"]["i_target_ua"] == 250
        assert payload["version"] == push["version"]
        signature = base64.b64decode(payload.pop("sig"))
        verifier.verify(signature, canonical_json(payload))  # raises if not signed by the API
    for device_id in targets:
        answer(database_url, device_id, "applied" if device_id != targets[2] else "rejected")
    done = client.get(f"/v1/rollouts/{created['id']}", headers=auth(keys["support"])).json()
    assert done["status"] == "completed"
    assert (done["progress"]["total"]["applied"], done["progress"]["total"]["rejected"]) == (2, 1)


def test_a_canary_gets_the_table_first_and_the_rest_on_promotion(
    client: TestClient, keys: dict[str, str], database_url: str
) -> None:
    targets = devices(database_url, 8)
    table_id = mode_table(client, keys["admin"])
    created = rollout(
        client, keys["admin"], mode_table_id=table_id, target={"all": True}, canary_share=0.25
    )
    assert created["status"] == "canary"
    assert created["progress"]["canary"]["targets"] == 2
    assert created["progress"]["rest"]["waiting"] == 6
    assert len(pushes(database_url, created["id"])) == 2
    assert created["canary_health"]["canary_devices"] == 2

    canary = set(pushes(database_url, created["id"]))
    leaving = next(device_id for device_id in targets if device_id not in canary)
    with psycopg.connect(database_url) as conn:
        revoke_device(conn, leaving)
    promoted = client.post(f"/v1/rollouts/{created['id']}/promote", headers=auth(keys["admin"]))
    assert promoted.status_code == 200, promoted.text
    assert promoted.json()["status"] == "running"
    assert promoted.json()["progress"]["total"]["waiting"] == 0
    assert promoted.json()["progress"]["total"]["decommissioned"] == 1
    assert sorted(pushes(database_url, created["id"])) == [d for d in targets if d != leaving]
    again = client.post(f"/v1/rollouts/{created['id']}/promote", headers=auth(keys["admin"]))
    assert again.status_code == 409
    assert again.headers["content-type"] == "application/problem+json"


def test_a_paused_canary_cannot_be_promoted_until_resumed_and_abort_withdraws_the_table(
    client: TestClient, keys: dict[str, str], database_url: str
) -> None:
    targets = devices(database_url, 4)
    table_id = mode_table(client, keys["admin"], i_target_ua=222)
    created = rollout(
        client, keys["admin"], mode_table_id=table_id, target={"device_ids": targets},
        canary_share=0.5,
    )  # fmt: skip
    url = f"/v1/rollouts/{created['id']}"
    paused = client.post(f"{url}/pause", json={"note": "checking"}, headers=auth(keys["admin"]))
    assert paused.json()["status"] == "paused"
    assert "checking" in paused.json()["status_reason"]
    assert client.post(f"{url}/promote", headers=auth(keys["admin"])).status_code == 409
    resumed = client.post(f"{url}/resume", headers=auth(keys["admin"]))
    assert resumed.json()["status"] == "canary"

    canary = sorted(pushes(database_url, created["id"]))
    answer(database_url, canary[0])  # applied: keeps the table; the other has not answered
    aborted = client.post(f"{url}/abort", headers=auth(keys["admin"]))
    assert aborted.status_code == 200, aborted.text
    assert aborted.json()["status"] == "aborted"
    with psycopg.connect(database_url) as conn:
        newest = dict(
            conn.execute(
                "SELECT DISTINCT ON (device_id) device_id, payload FROM config_pushes"
                " ORDER BY device_id, version DESC"
            ).fetchall()
        )
    assert newest[canary[0]]["modes"]["LIFT"]["i_target_ua"] == 222
    assert newest[canary[1]]["modes"] == DEFAULT_MODES  # back to the factory table
    assert "aborted" in newest[canary[1]]["reason"]
    assert aborted.json()["progress"]["canary"]["superseded"] == 1
    assert client.post(f"{url}/resume", headers=auth(keys["admin"])).status_code == 409


def test_a_rollout_keeps_the_modes_a_rule_locked(
    client: TestClient, keys: dict[str, str], database_url: str, tmp_path: Path
) -> None:
    [locked, free] = devices(database_url, 2)
    restrict(database_url, tmp_path, locked, lock_all=False)
    table_id = mode_table(client, keys["admin"])
    created = rollout(client, keys["admin"], mode_table_id=table_id, target={"all": True})
    recorded = pushes(database_url, created["id"])
    assert recorded[locked]["payload"]["locked_modes"] == ["INFUSE", "LIFT", "TIGHTEN"]
    assert recorded[locked]["payload"]["modes"]["SAFE"] == DEFAULT_MODES["SAFE"]
    assert recorded[free]["payload"]["locked_modes"] == []
    assert recorded[locked]["version"] == 2


def test_the_guard_pauses_a_canary_whose_critical_alert_rate_is_twice_the_rest(
    client: TestClient, keys: dict[str, str], database_url: str
) -> None:
    devices(database_url, 20)
    table_id = mode_table(client, keys["admin"])
    hurting = rollout(
        client, keys["admin"], mode_table_id=table_id, target={"all": True}, canary_share=0.2
    )
    calm = rollout(
        client, keys["admin"], mode_table_id=table_id, target={"all": True}, canary_share=0.2
    )
    with psycopg.connect(database_url) as conn:
        canary_of = {
            rollout_id: [
                str(r[0])
                for r in conn.execute(
                    "SELECT device_id FROM rollout_devices WHERE rollout_id = %s AND canary"
                    " ORDER BY device_id",
                    [rollout_id],
                ).fetchall()
            ]
            for rollout_id in (uuid.UUID(hurting["id"]), uuid.UUID(calm["id"]))
        }
        hurt = canary_of[uuid.UUID(hurting["id"])]
        calm_canary = set(canary_of[uuid.UUID(calm["id"])])
        # 3 critical alerts on the first rollout's canary devices that are not the second's.
        victims = [d for d in hurt if d not in calm_canary] or hurt
        for n, rule in enumerate(("overcurrent", "short_circuit", "electrode_overtemp")):
            conn.execute(
                "INSERT INTO alerts (brand_id, device_id, rule, rule_version, severity,"
                " first_seen, last_seen, explanation)"
                " VALUES ('acme', %s, %s, 1, 'critical', now(), now(), '{}')",
                [victims[n % len(victims)], rule],
            )
        paused = guard_canaries(conn)
    assert [rollout_id for rollout_id, _ in paused] == [uuid.UUID(hurting["id"])]
    after = client.get(f"/v1/rollouts/{hurting['id']}", headers=auth(keys["viewer"])).json()
    assert after["status"] == "paused"
    assert after["status_reason"].startswith("auto-paused: canary critical-alert rate")
    assert after["canary_health"]["canary_alerts"] == 3
    still = client.get(f"/v1/rollouts/{calm['id']}", headers=auth(keys["viewer"])).json()
    # Its canary got fewer than 3 of them, or its rate is not twice the rest's.
    assert still["status"] == "canary"
    assert (
        client.post(
            f"/v1/rollouts/{hurting['id']}/promote", headers=auth(keys["admin"])
        ).status_code
        == 409
    )


def test_rollouts_are_refused_with_problem_json(
    client: TestClient, keys: dict[str, str], database_url: str
) -> None:
    [device] = devices(database_url, 1)
    table_id = mode_table(client, keys["admin"])
    # A body the schema refuses is a 422; one it allows but the brand's fleet or tables cannot
    # take is a 404 (no such table) or a 409 (no such targets now).
    cases = [
        ({"mode_table_id": str(uuid.uuid4()), "target": {"all": True}}, 404, "mode_table_id"),
        ({"mode_table_id": table_id, "target": {"device_ids": ["nope-1"]}}, 409, "nope-1"),
        ({"mode_table_id": table_id, "target": {"model": "glow-9"}}, 409, "no active device"),
        (
            {"mode_table_id": table_id, "target": {"all": True}, "canary_share": 0.5},
            409,
            "at least 2",
        ),
        ({"mode_table_id": table_id, "target": {"all": True, "model": "x"}}, 422, "exactly one"),
        (
            {"mode_table_id": table_id, "target": {"all": True}, "canary_share": 1},
            422,
            "canary_share",
        ),
    ]
    for body, status, says in cases:
        refused = client.post("/v1/rollouts", json=body, headers=auth(keys["admin"]))
        assert refused.status_code == status, body
        assert says in refused.text, (says, refused.text)
    for role in ("support", "viewer"):
        body = {"mode_table_id": table_id, "target": {"device_ids": [device]}}
        assert client.post("/v1/rollouts", json=body, headers=auth(keys[role])).status_code == 403
    created = rollout(client, keys["admin"], mode_table_id=table_id, target={"all": True})
    assert (
        client.get(f"/v1/rollouts/{created['id']}", headers=auth(keys["other"])).status_code == 404
    )
    assert (
        client.post(f"/v1/rollouts/{created['id']}/abort", headers=auth(keys["other"])).status_code
        == 404
    )
    listed = client.get("/v1/rollouts", headers=auth(keys["other"])).json()
    assert listed["items"] == []


@pytest.fixture
def live_api(broker_api_settings: ApiSettings) -> Iterator[TestClient]:
    with TestClient(create_app(broker_api_settings)) as client:
        yield client


def test_real_agents_apply_a_rollout_and_its_progress_follows_their_answers(
    live_api: TestClient,
    keys: dict[str, str],
    database_url: str,
    broker: MosquittoBroker,
    sync_devices: Any,
    ingest_workers: IngestWorkers,
    tmp_path: Path,
    key_dir: Path,
) -> None:
    agents_devices = provision(database_url, 2, prefix="roll")
    sync_devices()
    ingest_workers.start("1")
    key = load_or_create_key(key_dir)
    agents = []
    for device in agents_devices:
        home = tmp_path / device.device_id
        home.mkdir()
        agents.append(AgentProcess(home, device, broker.config.device_port, key))
    try:
        for agent in agents:
            agent.start()
        wait_until(
            lambda: scalar(database_url, "SELECT count(*) FROM devices WHERE online") == 2,
            30,
            "both agents online",
        )
        table_id = mode_table(live_api, keys["admin"], i_target_ua=260)
        created = rollout(live_api, keys["admin"], mode_table_id=table_id, target={"all": True})

        def applied() -> bool:
            got = live_api.get(f"/v1/rollouts/{created['id']}", headers=auth(keys["viewer"]))
            return bool(got.json()["progress"]["total"]["applied"] == 2)

        wait_until(applied, 30, "both agents' answers")
        done = live_api.get(f"/v1/rollouts/{created['id']}", headers=auth(keys["viewer"])).json()
        assert done["status"] == "completed"
        with psycopg.connect(database_url) as conn:
            reported = conn.execute(
                "SELECT d.config_reported_version = p.version, p.published_at IS NOT NULL"
                " FROM devices d JOIN config_pushes p ON p.device_id = d.id"
                " WHERE p.source_ref = %s",
                [created["id"]],
            ).fetchall()
        assert reported == [(True, True), (True, True)]
    finally:
        for agent in agents:
            agent.stop()


def test_support_clears_a_rule_restriction_back_to_the_brands_last_applied_table(
    client: TestClient, keys: dict[str, str], database_url: str, tmp_path: Path
) -> None:
    [device] = devices(database_url, 1)
    table_id = mode_table(client, keys["admin"], i_target_ua=222)
    rollout(client, keys["admin"], mode_table_id=table_id, target={"all": True})
    answer(database_url, device)
    restrict(database_url, tmp_path, device, lock_all=True)
    url = f"/v1/devices/{device}/clear"
    assert client.post(url, headers=auth(keys["viewer"])).status_code == 403
    assert client.post(url, headers=auth(keys["other"])).status_code == 404
    cleared = client.post(url, json={"note": "electrode replaced"}, headers=auth(keys["support"]))
    assert cleared.status_code == 200, cleared.text
    desired = cleared.json()["desired"]
    assert desired["version"] == 3
    assert desired["locked_modes"] == []
    assert desired["modes"]["LIFT"]["i_target_ua"] == 222
    assert "electrode replaced" in desired["reason"]
    again = client.post(url, headers=auth(keys["support"]))
    assert again.status_code == 409
    # A rollout after the clearance carries no rule lock.
    later = rollout(client, keys["admin"], mode_table_id=table_id, target={"all": True})
    assert pushes(database_url, later["id"])[device]["payload"]["locked_modes"] == []


def test_an_expiry_must_name_its_time_zone_and_lie_ahead(
    client: TestClient, keys: dict[str, str], database_url: str
) -> None:
    devices(database_url, 1)
    table_id = mode_table(client, keys["admin"])
    body = {"mode_table_id": table_id, "target": {"all": True}}
    # Without a zone the body is invalid (422); a past time is refused by the clock (409).
    for expires_at, status, says in (
        ("2099-01-01T00:00:00", 422, "timezone"),
        ("2000-01-01T00:00:00Z", 409, "future"),
    ):
        refused = client.post(
            "/v1/rollouts", json={**body, "expires_at": expires_at}, headers=auth(keys["admin"])
        )
        assert refused.status_code == status, refused.text
        assert says in refused.text
    created = rollout(client, keys["admin"], **body, expires_at="2099-01-01T00:00:00Z")
    payload = next(iter(pushes(database_url, created["id"]).values()))["payload"]
    assert payload["expires_at"] == 4070908800000
