"""Tenancy and roles across every route of the app.

The routes come from the app itself, so a new route cannot escape: each must be in
:data:`ROUTES` (who may call it), and each of its path parameters must be in :data:`PATH_IDS`
(how to get brand acme's id of that kind). Another brand's key, given acme's ids, gets 404
and changes nothing; lists never show acme's rows to it; each role outside a route's allowed
set gets 403; a revoked, malformed or missing key gets 401 with ``WWW-Authenticate: Bearer``.
"""

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute, iter_route_contexts
from fastapi.testclient import TestClient
from httpx2 import Response

from services.api.main import create_app
from services.api.settings import ApiSettings
from services.common import pki
from services.common.mode_tables import DEFAULT_MODES
from services.rules.catalogue import RULES
from tests.api import SeededBrand, auth, seed_brand

OPERATOR, ADMIN, SUPPORT, VIEWER = "operator", "admin", "support", "viewer"
ROLES = (OPERATOR, ADMIN, SUPPORT, VIEWER)
BRAND_ROLES = frozenset({ADMIN, SUPPORT, VIEWER})
PUBLIC = None  # the ops network's routes: no key at all


@dataclass(frozen=True)
class Access:
    """Who may call a route (``None``: anyone, no key), and how it answers another brand."""

    roles: frozenset[str] | None
    # Where another brand's call with acme's ids is not a 404: why, and what it answers.
    cross_brand: tuple[int, str] | None = None
    # Routes that never end (Server-Sent Events): called only where they must refuse at once.
    stream: bool = False


def allow(*roles: str, **kwargs: Any) -> Access:
    return Access(frozenset(roles), **kwargs)


READ = Access(BRAND_ROLES)
ADMIN_OR_OPERATOR = allow(ADMIN, OPERATOR)  # the operator names the brand it acts on

# Every route of the app, with who may call it (api.md's table). A route missing here fails
# test_every_route_is_in_the_access_table; an entry may come before its route lands.
ROUTES: dict[tuple[str, str], Access] = {
    ("GET", "/healthz"): Access(PUBLIC),
    ("GET", "/readyz"): Access(PUBLIC),
    ("GET", "/metrics"): Access(PUBLIC),
    ("GET", "/"): Access(PUBLIC),  # the dashboard's pages (they call the API with a key)
    ("GET", "/dashboard/"): Access(PUBLIC),
    ("GET", "/v1/me"): allow(*ROLES),
    ("GET", "/v1/config-signing-key"): allow(*ROLES),
    ("GET", "/v1/rules"): READ,
    # A PATCH per rule, its body naming that rule's thresholds (services/api/rules).
    **{
        ("PATCH", f"/v1/rules/{rule.id}"): allow(
            ADMIN, cross_brand=(200, "rules are one catalogue; a brand sets its own thresholds")
        )
        for rule in RULES
    },
    ("GET", "/v1/alerts/stream"): Access(BRAND_ROLES, stream=True),
    ("GET", "/v1/alerts"): READ,
    ("GET", "/v1/alerts/{alert_id}"): READ,
    ("POST", "/v1/alerts/{alert_id}/ack"): allow(ADMIN, SUPPORT),
    ("POST", "/v1/alerts/{alert_id}/resolve"): allow(ADMIN, SUPPORT),
    ("POST", "/v1/devices"): ADMIN_OR_OPERATOR,
    ("GET", "/v1/devices"): READ,
    ("GET", "/v1/devices/{device_id}"): READ,
    ("DELETE", "/v1/devices/{device_id}"): allow(ADMIN),
    ("GET", "/v1/devices/{device_id}/sessions"): READ,
    ("GET", "/v1/devices/{device_id}/events"): READ,
    ("GET", "/v1/devices/{device_id}/config"): READ,
    ("GET", "/v1/devices/{device_id}/telemetry"): READ,
    ("GET", "/v1/devices/{device_id}/telemetry/suspect"): READ,
    ("GET", "/v1/devices/{device_id}/conflicts"): READ,
    ("POST", "/v1/devices/{device_id}/clear"): allow(ADMIN, SUPPORT),
    ("GET", "/v1/devices/{device_id}/certificates"): READ,
    ("POST", "/v1/devices/{device_id}/certificate"): allow(ADMIN),
    ("POST", "/v1/device-authorities"): allow(ADMIN),
    ("GET", "/v1/device-authorities"): READ,
    ("GET", "/v1/device-authorities/{authority_id}"): READ,
    ("DELETE", "/v1/device-authorities/{authority_id}"): allow(ADMIN),
    ("POST", "/v1/brands"): allow(OPERATOR),
    ("POST", "/v1/api-keys"): ADMIN_OR_OPERATOR,
    ("DELETE", "/v1/api-keys/{key_id}"): ADMIN_OR_OPERATOR,
    ("GET", "/v1/fleet/summary"): READ,
    ("GET", "/v1/dead-letters"): ADMIN_OR_OPERATOR,
    ("PUT", "/v1/users/{user_id}"): allow(
        ADMIN, cross_brand=(200, "user ids are per brand: this is the other brand's own user")
    ),
    ("GET", "/v1/users/{user_id}/usage"): READ,
    ("POST", "/v1/mode-tables"): ADMIN_OR_OPERATOR,
    ("GET", "/v1/mode-tables"): READ,
    ("GET", "/v1/mode-tables/envelope"): allow(*ROLES),
    ("GET", "/v1/mode-tables/{table_id}"): READ,
    ("POST", "/v1/rollouts"): ADMIN_OR_OPERATOR,
    ("GET", "/v1/rollouts"): READ,
    ("GET", "/v1/rollouts/{rollout_id}"): READ,
    ("POST", "/v1/rollouts/{rollout_id}/promote"): ADMIN_OR_OPERATOR,
    ("POST", "/v1/rollouts/{rollout_id}/pause"): ADMIN_OR_OPERATOR,
    ("POST", "/v1/rollouts/{rollout_id}/resume"): ADMIN_OR_OPERATOR,
    ("POST", "/v1/rollouts/{rollout_id}/abort"): ADMIN_OR_OPERATOR,
    ("POST", "/v1/notification-channels"): allow(ADMIN),
    ("GET", "/v1/notification-channels"): READ,
    ("GET", "/v1/notification-channels/{channel_id}"): READ,
    ("PATCH", "/v1/notification-channels/{channel_id}"): allow(ADMIN),
    ("DELETE", "/v1/notification-channels/{channel_id}"): allow(ADMIN),
    ("GET", "/v1/notification-channels/{channel_id}/deliveries"): READ,
    ("POST", "/v1/notification-channels/{channel_id}/test"): allow(ADMIN),
}

# How to get brand acme's id for each path parameter. A route with a parameter missing here
# fails test_every_path_parameter_names_a_known_kind_of_id.
PATH_IDS: dict[str, Callable[[SeededBrand], str]] = {
    "device_id": lambda s: s.device_id,
    "alert_id": lambda s: str(s.alert_ids[0]),
    "user_id": lambda s: s.user_id,
    "key_id": lambda s: s.api_key_id,
    "rule_id": lambda s: "no_gel",
    "table_id": lambda s: s.mode_table_id,
    "rollout_id": lambda s: s.rollout_id,
    "authority_id": lambda s: AUTHORITY_IDS[s.brand],
    "channel_id": lambda s: CHANNEL_IDS[s.brand],
}
# Each brand's registered device authority and notification channel (made by the brands
# fixture).
AUTHORITY_IDS: dict[str, str] = {}
CHANNEL_IDS: dict[str, str] = {}
# A public address as a literal: a channel's URL must be one (its host is resolved otherwise).
CHANNEL_BODY = {"name": "on-call", "kind": "webhook", "url": "https://93.184.215.14/hook"}

# Where a route takes another of acme's ids than PATH_IDS gives: DELETE decommissions the
# spare device, so the one with the alerts and the rollout still takes tables afterwards.
PATH_ID_OVERRIDES: dict[tuple[str, str], dict[str, Callable[[SeededBrand], str]]] = {
    ("DELETE", "/v1/devices/{device_id}"): {"device_id": lambda s: s.spare_device_id},
}

# Bodies that pass validation, so a call reaches its role and brand checks (a brand key's
# "brand" must be its own; the operator names acme).
BODIES: dict[tuple[str, str], Callable[[SeededBrand], dict[str, Any]]] = {
    ("PATCH", "/v1/rules/no_gel"): lambda s: {"thresholds": {"total_s": 5}},
    **{
        ("PATCH", f"/v1/rules/{rule.id}"): lambda s: {"thresholds": {}}
        for rule in RULES
        if rule.id != "no_gel"
    },
    ("POST", "/v1/devices"): lambda s: {"device_id": "acme-new-1", "model": "glow-2"},
    ("POST", "/v1/brands"): lambda s: {"id": "newco", "name": "NewCo"},
    ("POST", "/v1/devices/{device_id}/certificate"): lambda s: {
        "csr": pki.device_csr(pki.new_device_key(), s.device_id)
    },
    ("POST", "/v1/device-authorities"): lambda s: {
        "certificate": pki.pem(pki.Authority.create("Tenancy CA").certificate).decode()
    },
    ("POST", "/v1/api-keys"): lambda s: {"role": "viewer", "name": "desk"},
    ("POST", "/v1/notification-channels"): lambda s: dict(CHANNEL_BODY),
    ("PATCH", "/v1/notification-channels/{channel_id}"): lambda s: {"name": "renamed"},
    ("PUT", "/v1/users/{user_id}"): lambda s: {"stage": "intro"},
    ("POST", "/v1/mode-tables"): lambda s: {
        "name": "gentler LIFT",
        "modes": {"LIFT": {**DEFAULT_MODES["LIFT"], "i_target_ua": 250}},
    },
    ("POST", "/v1/rollouts"): lambda s: {
        "mode_table_id": s.mode_table_id,
        "target": {"device_ids": [s.device_id]},
    },
}
# Routes whose body names the brand (the operator must; a brand key may name its own).
BRAND_IN_BODY = frozenset(
    {
        ("POST", "/v1/devices"),
        ("POST", "/v1/api-keys"),
        ("POST", "/v1/mode-tables"),
        ("POST", "/v1/rollouts"),
    }
)
QUERIES: dict[tuple[str, str], dict[str, str]] = {
    ("GET", "/v1/devices/{device_id}/telemetry"): {
        "from": "2026-01-01T00:00:00Z",
        "to": "2026-01-01T01:00:00Z",
        "bucket": "1m",
    },
    ("GET", "/v1/devices/{device_id}/telemetry/suspect"): {
        "from": "2026-01-01T00:00:00Z",
        "to": "2026-01-01T01:00:00Z",
    },
}
PARAM = re.compile(r"{(\w+)(?::\w+)?}")


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str

    @property
    def params(self) -> list[str]:
        return PARAM.findall(self.path)

    @property
    def access(self) -> Access:
        return ROUTES[(self.method, self.path)]

    def url(self, seeded: SeededBrand) -> str:
        ids = {**PATH_IDS, **PATH_ID_OVERRIDES.get((self.method, self.path), {})}
        return PARAM.sub(lambda m: ids[m.group(1)](seeded), self.path)

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


def endpoints(app: FastAPI) -> list[Endpoint]:
    """Every method and path the app routes (included routers flattened)."""
    found = []
    for context in iter_route_contexts(app.routes):
        if not isinstance(context.original_route, APIRoute):
            continue  # Starlette's own: the OpenAPI document and the docs pages
        for method in sorted(context.methods or ()):
            if method != "HEAD":
                found.append(Endpoint(method, str(context.path_format)))
    return found


def call(
    client: TestClient,
    endpoint: Endpoint,
    seeded: SeededBrand,
    headers: dict[str, str],
    *,
    brand: str | None = None,
) -> Response:
    """``endpoint`` with acme's ids, a valid body and query; ``brand`` named where it can be."""
    key = (endpoint.method, endpoint.path)
    body = BODIES[key](seeded) if key in BODIES else None
    params = dict(QUERIES.get(key, {}))
    if brand is not None:
        if key in BRAND_IN_BODY:
            assert body is not None
            body["brand"] = brand
        else:  # a query parameter where the route takes one (rollouts' actions, dead letters)
            params["brand"] = brand
    return client.request(
        endpoint.method, endpoint.url(seeded), json=body, params=params, headers=headers
    )


def assert_problem(response: Response, status: int, where: object) -> None:
    assert response.status_code == status, f"{where}: {response.status_code} {response.text}"
    assert response.headers["content-type"] == "application/problem+json", where
    assert response.json()["status"] == status, where


@pytest.fixture
def client(api_database_url: str, tmp_path: Path, no_broker_port: int) -> Iterator[TestClient]:
    """The API on this test's database. The 401 matrix sends a bad key to every route from
    one address, far past the failed-authentication limit (``test_api_rate_limit.py``), so the
    limit is set out of its way here."""
    settings = ApiSettings(
        database_url=api_database_url,
        mqtt_port=no_broker_port,
        mqtt_password="x",
        data_dir=tmp_path,
        auth_failures_per_window=1_000_000,
    )
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.fixture
def brands(
    client: TestClient, keys: dict[str, str], database_url: str, tmp_path: Path
) -> dict[str, SeededBrand]:
    """acme and other, each with one of everything (and a device authority and a
    notification channel)."""
    seeded = {
        brand: seed_brand(database_url, brand, tmp_path / "rules-key", client, keys[key])
        for brand, key in (("acme", "admin"), ("other", "other"))
    }
    for brand, key in (("acme", "admin"), ("other", "other")):
        ca = pki.pem(pki.Authority.create(f"{brand} CA").certificate).decode()
        made = client.post(
            "/v1/device-authorities", json={"certificate": ca}, headers=auth(keys[key])
        )
        assert made.status_code == 201, made.text
        AUTHORITY_IDS[brand] = str(made.json()["id"])
        made = client.post("/v1/notification-channels", json=CHANNEL_BODY, headers=auth(keys[key]))
        assert made.status_code == 201, made.text
        CHANNEL_IDS[brand] = str(made.json()["id"])
    return seeded


def acme_state(database_url: str) -> dict[str, list[tuple[object, ...]]]:
    """Everything of acme's a request could change, row by row."""
    queries = {
        "brand": "SELECT * FROM brands WHERE id = 'acme'",
        "keys": "SELECT id, revoked_at FROM api_keys WHERE brand_id = 'acme' ORDER BY id",
        "users": "SELECT * FROM users WHERE brand_id = 'acme' ORDER BY id",
        "devices": "SELECT * FROM devices WHERE brand_id = 'acme' ORDER BY id",
        "alerts": "SELECT * FROM alerts WHERE brand_id = 'acme' ORDER BY id",
        "transitions": "SELECT t.* FROM alert_transitions t JOIN alerts a ON a.id = t.alert_id"
        " WHERE a.brand_id = 'acme' ORDER BY t.id",
        "thresholds": "SELECT * FROM brand_rule_thresholds WHERE brand_id = 'acme' ORDER BY 1, 2",
        "tables": "SELECT * FROM mode_tables WHERE brand_id = 'acme' ORDER BY id",
        "rollouts": "SELECT * FROM rollouts WHERE brand_id = 'acme' ORDER BY id",
        "rollout_devices": "SELECT r.* FROM rollout_devices r JOIN devices d"
        " ON d.id = r.device_id WHERE d.brand_id = 'acme' ORDER BY 1, 2",
        "pushes": "SELECT p.* FROM config_pushes p JOIN devices d ON d.id = p.device_id"
        " WHERE d.brand_id = 'acme' ORDER BY p.id",
        "authorities": "SELECT * FROM brand_device_authorities WHERE brand_id = 'acme' ORDER BY id",
        "certificates": "SELECT c.* FROM device_certificates c JOIN devices d"
        " ON d.id = c.device_id WHERE d.brand_id = 'acme' ORDER BY c.id",
        "channels": "SELECT id, name, url, deleted_at FROM notification_channels"
        " WHERE brand_id = 'acme' ORDER BY id",
        "notifications": "SELECT * FROM notifications WHERE brand_id = 'acme' ORDER BY id",
    }
    with psycopg.connect(database_url) as conn:
        return {name: conn.execute(sql).fetchall() for name, sql in queries.items()}


def test_every_route_is_in_the_access_table(client: TestClient) -> None:
    routed = {(e.method, e.path) for e in endpoints(client.app)}  # type: ignore[arg-type]
    assert routed - ROUTES.keys() == set(), "routes missing from ROUTES: say who may call them"


def test_every_path_parameter_names_a_known_kind_of_id(client: TestClient) -> None:
    unknown = {
        f"{e}: {name}"
        for e in endpoints(client.app)  # type: ignore[arg-type]
        for name in e.params
        if name not in PATH_IDS
    }
    assert unknown == set(), "add these path parameters to PATH_IDS so the matrix covers them"


def test_another_brands_key_gets_404_for_every_id_of_acme_and_changes_nothing(
    client: TestClient, keys: dict[str, str], brands: dict[str, SeededBrand], database_url: str
) -> None:
    acme = brands["acme"]
    before = acme_state(database_url)
    walked = []
    # Routes that answer another brand (PUT creates its own user of that id) go last, so
    # what they create cannot answer for acme's ids in a later route.
    routes = sorted(
        (e for e in endpoints(client.app) if e.params),  # type: ignore[arg-type]
        key=lambda e: e.access.cross_brand is not None,
    )
    for endpoint in routes:
        response = call(client, endpoint, acme, auth(keys["other"]))
        expected = endpoint.access.cross_brand
        if expected is None:
            assert_problem(response, 404, endpoint)
        else:
            assert response.status_code == expected[0], f"{endpoint}: {response.text}"
        assert acme_state(database_url) == before, f"{endpoint} changed acme's data"
        walked.append(str(endpoint))
    assert len(walked) >= len(PATH_IDS), walked


def listed_ids(brand: SeededBrand) -> dict[str, set[str]]:
    """The ids of the brand's seeded records, by the list that shows them."""
    return {
        "/v1/devices": {brand.device_id, brand.spare_device_id},
        "/v1/alerts": set(map(str, brand.alert_ids)),
        "/v1/dead-letters": {str(brand.dead_letter_id)},
        "/v1/mode-tables": {brand.mode_table_id},
        "/v1/rollouts": {brand.rollout_id},
        "/v1/device-authorities": {AUTHORITY_IDS[brand.brand]},
        "/v1/notification-channels": {CHANNEL_IDS[brand.brand]},
    }


def test_lists_never_show_another_brands_rows(
    client: TestClient, keys: dict[str, str], brands: dict[str, SeededBrand]
) -> None:
    acme, other = brands["acme"], brands["other"]
    client.patch(
        "/v1/rules/no_gel", json={"thresholds": {"total_s": 5}}, headers=auth(keys["admin"])
    )
    # acme's ids by list: ids of different kinds (an alert's, a dead letter's) can be equal
    acme_ids, others_own = listed_ids(acme), listed_ids(other)
    other_devices = {other.device_id, other.spare_device_id}
    lists = [
        e
        for e in endpoints(client.app)  # type: ignore[arg-type]
        if e.method == "GET" and not e.params and e.access.roles and not e.access.stream
    ]
    for endpoint in lists:
        response = client.get(endpoint.path, headers=auth(keys["other"]))
        assert response.status_code == 200, f"{endpoint}: {response.text}"
        assert "acme" not in response.text, f"{endpoint} shows acme's rows: {response.text}"
        items = response.json().get("items", [])
        for item in items:
            assert item.get("brand", "other") == "other", f"{endpoint}: {item}"
            assert item.get("device_id", other.device_id) in other_devices, f"{endpoint}: {item}"
        shown = {str(item.get("id", item.get("device_id"))) for item in items}
        assert not shown & acme_ids.get(endpoint.path, set()), f"{endpoint} shows acme's rows"
        # not vacuous: the other brand sees its own
        assert others_own.get(endpoint.path, set()) <= shown, f"{endpoint}: {shown}"
    rules = client.get("/v1/rules", headers=auth(keys["other"])).json()["items"]
    [no_gel] = [r for r in rules if r["id"] == "no_gel"]
    assert not any(t["overridden"] for t in no_gel["thresholds"]), "acme's override leaked"
    summary = client.get("/v1/fleet/summary", headers=auth(keys["other"])).json()
    assert summary["devices"] == 2  # its own two, not acme's


def test_each_role_outside_a_routes_allowed_set_gets_403_and_inside_it_does_not(
    client: TestClient, keys: dict[str, str], brands: dict[str, SeededBrand]
) -> None:
    acme = brands["acme"]
    checked = 0
    for endpoint in endpoints(client.app):  # type: ignore[arg-type]
        allowed = endpoint.access.roles
        if allowed is None:
            continue
        for role in ROLES:
            if role in allowed:
                if endpoint.access.stream:
                    continue  # it would answer 200 and never end
                brand = "acme" if role == OPERATOR else None
                response = call(client, endpoint, acme, auth(keys[role]), brand=brand)
                assert response.status_code not in (401, 403), (
                    f"{role} refused at {endpoint}: {response.text}"
                )
            else:
                response = call(client, endpoint, acme, auth(keys[role]))
                assert_problem(response, 403, f"{role} at {endpoint}")
            checked += 1
    assert checked > 100


AUTHORIZATIONS = (
    None,
    "",
    "Bearer",
    "Bearer ",
    "Basic YWRtaW46YWRtaW4=",
    "Bearer gvk_not-a-key",
    "gvk_no-scheme",
)


def test_a_revoked_malformed_or_missing_key_gets_401_on_every_route(
    client: TestClient, keys: dict[str, str], brands: dict[str, SeededBrand]
) -> None:
    for authorization in (*AUTHORIZATIONS, f"Bearer {keys['revoked']}"):
        headers = {} if authorization is None else {"Authorization": authorization}
        for endpoint in endpoints(client.app):  # type: ignore[arg-type]
            if endpoint.access.roles is None:
                continue
            response = call(client, endpoint, brands["acme"], headers)
            assert_problem(response, 401, f"{endpoint} with {authorization!r}")
            assert response.headers["www-authenticate"] == "Bearer", endpoint
