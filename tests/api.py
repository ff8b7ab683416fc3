"""API test helpers: the auth header, keys of every role, a brand seeded with one of everything,
databases that outlive one test (for module-scoped fixtures), and the app on a real server."""

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from psycopg.conninfo import conninfo_to_dict

from deploy.stack.ports import free_port
from deploy.stack.postgres import PostgresServer
from services.common.api_keys import Role, issue_key
from services.common.mode_tables import DEFAULT_MODES
from services.common.provisioning import provision_device
from services.common.signing import load_or_create_key
from tests.rules import MINUTE, Stream, run

SERVER_START_TIMEOUT_S = 15.0


@contextmanager
def serving(app: FastAPI) -> Iterator[tuple[str, int]]:
    """``app`` on a real HTTP server on a free loopback port, in a thread: (host, port)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while not server.started:
        assert time.monotonic() < deadline, "the API server did not start"
        assert thread.is_alive(), "the API server exited while starting"
        time.sleep(0.05)
    try:
        yield "127.0.0.1", port
    finally:
        server.should_exit = True
        thread.join(10)


def auth(key: str) -> dict[str, str]:
    """The Authorization header for an API key."""
    return {"Authorization": f"Bearer {key}"}


TEMPLATE_COPY_ATTEMPTS = 20


@contextmanager
def copied_database(postgres: PostgresServer, template_url: str, name: str) -> Iterator[str]:
    """A database copied from the migrated template for as long as the block runs."""
    template = str(conninfo_to_dict(template_url)["dbname"])
    for attempt in range(TEMPLATE_COPY_ATTEMPTS):
        try:
            url = postgres.create_database(name, template=template)
            break
        except psycopg.errors.ObjectInUse:
            # TimescaleDB's scheduler restarts around CREATE DATABASE ... TEMPLATE.
            if attempt == TEMPLATE_COPY_ATTEMPTS - 1:
                raise
            time.sleep(0.05 * (attempt + 1))
    try:
        yield url
    finally:
        with psycopg.connect(postgres.config.url("postgres"), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def issue_keys(database_url: str) -> dict[str, str]:
    """Brands 'acme' and 'other' and plaintext keys by name, as conftest's ``keys``: operator;
    acme's admin, viewer, support and a revoked one; and other's admin."""
    with psycopg.connect(database_url) as conn:
        conn.execute("INSERT INTO brands (id, name) VALUES ('acme', 'Acme'), ('other', 'Other')")
        issued = {
            "operator": issue_key(conn, role=Role.OPERATOR, name="op", brand_id=None),
            "admin": issue_key(conn, role=Role.ADMIN, name="a", brand_id="acme"),
            "viewer": issue_key(conn, role=Role.VIEWER, name="v", brand_id="acme"),
            "support": issue_key(conn, role=Role.SUPPORT, name="s", brand_id="acme"),
            "other": issue_key(conn, role=Role.ADMIN, name="o", brand_id="other"),
            "revoked": issue_key(conn, role=Role.ADMIN, name="r", brand_id="acme"),
        }
        conn.execute("UPDATE api_keys SET revoked_at = now() WHERE name = 'r'")
    return {name: key.key for name, key in issued.items()}


@dataclass(frozen=True)
class SeededBrand:
    """The ids of what :func:`seed_brand` made for one brand."""

    brand: str
    device_id: str
    spare_device_id: str
    user_id: str
    session: str
    event_seq: int
    alert_ids: tuple[int, ...]
    dead_letter_id: int
    api_key_id: str
    rule_id: str
    mode_table_id: str
    rollout_id: str


def seed_brand(
    database_url: str, brand: str, key_dir: Path, client: TestClient, admin_key: str
) -> SeededBrand:
    """A realistic brand (it must exist; ``admin_key`` is its admin's): a user with a device,
    a spare device, sessions and events, samples of the last minutes, alerts raised (and a
    table pushed) by the rules engine, a dead letter, an extra API key, and a mode table in a
    canary rollout to both devices (made through the API, as a brand would)."""
    device_id, spare, user_id = f"{brand}-dev-1", f"{brand}-dev-2", f"{brand}-user-1"
    now = datetime.now(UTC)
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "INSERT INTO users (brand_id, id, stage) VALUES (%s, %s, 'maintenance')",
            [brand, user_id],
        )
        provision_device(conn, device_id=device_id, brand_id=brand, model="glow-2", user_id=user_id)
        provision_device(conn, device_id=spare, brand_id=brand, model="glow-2")
        conn.execute(
            "UPDATE devices SET online = true, last_seen = now(), fw = '1.4.2' WHERE id = %s",
            [device_id],
        )
        for n in range(2):
            conn.execute(
                "INSERT INTO sessions (device_id, session, brand_id, user_id, mode, level,"
                " started_at, ended_at, duration_s, end_reason, output_s, samples, out_samples,"
                " gel_ok_samples) VALUES (%s, %s, %s, %s, 'LIFT', 5, %s, %s, 300, 'completed',"
                " 290, 3000, 2900, 2500)",
                [
                    device_id,
                    f"s-{n}",
                    brand,
                    user_id,
                    now - timedelta(hours=n + 1),
                    now - timedelta(hours=n + 1) + timedelta(minutes=5),
                ],
            )
            conn.execute(
                "INSERT INTO events (device_id, seq, ts, type, session, body, received_at)"
                " VALUES (%s, %s, %s, 'session_start', %s, '{\"mode\": \"LIFT\"}', now())",
                [device_id, n + 1, now - timedelta(hours=n + 1), f"s-{n}"],
            )
        conn.execute(
            "INSERT INTO samples (device_id, ts, seq, session, out, mode, level, i_ua, i_set_ua,"
            " v_v, z_ohm, t_elec_c, t_batt_c, batt_pct, charging, received_at)"
            " SELECT %s, %s + n * interval '1 second', 10 + n / 10, 's-0', true, 'LIFT', 5,"
            " 300 + n %% 7, 300, 2.4, 8000, 33, 30, 80, false, now()"
            " FROM generate_series(0, 599) n",
            [device_id, now - timedelta(minutes=15)],
        )
        [dead_letter_id] = conn.execute(
            "INSERT INTO dead_letters (topic, device_id, channel, payload, payload_size, reason,"
            " detail, received_at) VALUES (%s, %s, 'telemetry', %s, 8, 'bad_json', 'not JSON',"
            " now()) RETURNING id",
            [f"galvani/v1/d/{device_id}/telemetry", device_id, b"not json"],
        ).fetchone() or (None,)
        api_key = issue_key(conn, role=Role.VIEWER, name=f"{brand}-dashboard", brand_id=brand)
    stream = Stream(device_id, seq=100)
    at = int((now - timedelta(minutes=30)).timestamp() * 1000)
    stream.event("fault", at, code="short_circuit")  # an alert, and the rules push SAFE
    stream.event("user_report", at + MINUTE, kind="redness")
    run(database_url, load_or_create_key(key_dir), stream.messages)
    with psycopg.connect(database_url) as conn:
        alert_ids = tuple(
            int(str(row[0]))
            for row in conn.execute(
                "SELECT id FROM alerts WHERE brand_id = %s ORDER BY id", [brand]
            ).fetchall()
        )
    assert alert_ids, "the rules engine raised no alert"
    table = client.post(
        "/v1/mode-tables",
        json={
            "name": "gentler LIFT",
            "modes": {"LIFT": {**DEFAULT_MODES["LIFT"], "i_target_ua": 250}},
        },
        headers=auth(admin_key),
    )
    assert table.status_code == 201, table.text
    rollout = client.post(
        "/v1/rollouts",
        json={
            "mode_table_id": table.json()["id"],
            "target": {"device_ids": [device_id, spare]},
            "canary_share": 0.5,
        },
        headers=auth(admin_key),
    )
    assert rollout.status_code == 201, rollout.text
    return SeededBrand(
        brand=brand,
        device_id=device_id,
        spare_device_id=spare,
        user_id=user_id,
        session="s-0",
        event_seq=1,
        alert_ids=alert_ids,
        dead_letter_id=int(str(dead_letter_id)),
        api_key_id=str(api_key.id),
        rule_id="device_fault",
        mode_table_id=table.json()["id"],
        rollout_id=rollout.json()["id"],
    )
