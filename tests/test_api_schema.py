"""Schemathesis against the API, once per role: no 5xx, every response as the schema says.

Each role runs every operation against a database of its own, seeded with a realistic brand.
Generated path parameters are often swapped for the seeded brand's ids, telemetry gets a
valid time range and a few bodies that need the run's ids get valid ones, so operations reach
their success paths and not only their 404s and 422s.
"""

import os
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.python.asgi import ASGIClient, get_client
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from deploy.stack.mosquitto import MosquittoBroker
from deploy.stack.postgres import PostgresServer
from services.api.main import create_app
from services.api.settings import ApiSettings
from services.common.mode_tables import DEFAULT_MODES
from tests.api import SeededBrand, auth, copied_database, issue_keys, seed_brand

ROLES = ("operator", "admin", "support", "viewer")
MAX_EXAMPLES = 12
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
# Left out: the Server-Sent Events stream never ends, so no example of it could finish.
EXCLUDED_PATHS = ["/v1/alerts/stream"]


def _settings(
    database_url: str, data_dir: Path, mqtt_port: int = 1884, mqtt_ca_file: Path | None = None
) -> ApiSettings:
    return ApiSettings(
        database_url=database_url,
        mqtt_port=mqtt_port,
        mqtt_password="x",
        mqtt_ca_file=mqtt_ca_file,
        data_dir=data_dir,
        # Hypothesis sends far more than a client would: the rate limiter is not under test.
        rate_limit_burst=1_000_000,
        rate_limit_per_s=1_000_000.0,
    )


# The document is the app's own; building it needs no database (the pool opens in the lifespan).
schema = schemathesis.openapi.from_dict(
    create_app(_settings("postgresql://schema-only@localhost/none", Path("/nonexistent"))).openapi()
).exclude(path=EXCLUDED_PATHS)
# Examples and fuzzing here, for every role; the coverage phase (boundary and negative values of
# every field) runs in tests/test_api_conformance.py, as schemathesis' command line runs it,
# for the roles that may write. Here it added 1-2 s per operation and role (23 s for the
# channel create's four kinds as admin) for requests that conformance run already makes.
schema.config.phases.update(phases=["examples", "fuzzing"])


class Run:
    """One role's run: its app, keys and seeded ids (read by the hooks while drawing)."""

    app: Any
    session: ASGIClient
    keys: dict[str, str]
    seeded: SeededBrand


RUN = Run()


@pytest.fixture(scope="module", params=ROLES)
def role(
    request: pytest.FixtureRequest,
    postgres: PostgresServer,
    template_url: str,
    broker: MosquittoBroker,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    """Each role runs every operation on a fresh database; examples of one role may change its
    data (a decommissioned device, a revoked key), never another role's."""
    name = str(request.param)
    data_dir = tmp_path_factory.mktemp(f"schema-{name}")
    with copied_database(postgres, template_url, f"schema_{os.getpid()}_{name}") as url:
        # A running broker, so /readyz answers 200 rather than its (documented) 503.
        settings_ = _settings(url, data_dir, broker.config.service_port, broker.config.pki.ca_file)
        RUN.keys = issue_keys(url)
        # The app's lifespan runs once per role, in this TestClient. Schemathesis's own ASGI
        # client, not entered, sends the examples without starting (and, after each
        # operation, stopping) a lifespan of its own, which would cost seconds per operation.
        with TestClient(create_app(settings_)) as client:
            RUN.seeded = seed_brand(url, "acme", settings_.key_dir(), client, RUN.keys["admin"])
            RUN.app = client.app
            RUN.session = get_client(client.app)  # type: ignore[arg-type]
            yield name


SEEDED_NAMES = frozenset(
    {"device_id", "alert_id", "user_id", "rule_id", "key_id", "table_id", "rollout_id"}
)


def _known(method: str, name: str) -> list[Any]:
    seeded = getattr(RUN, "seeded", None)
    if seeded is None:  # explicit examples are drawn at collection, before any run exists
        return []
    if name == "device_id":
        # DELETE draws the spare device, so the one with the data, alerts and rollout still
        # takes tables (a rollout, a clearance) in this role's later operations.
        return [seeded.spare_device_id] if method == "DELETE" else [seeded.device_id]
    return {
        "alert_id": list(seeded.alert_ids),
        "user_id": [seeded.user_id],
        # no_gel has a threshold the body examples below set; device_fault has none
        "rule_id": ["no_gel", seeded.rule_id],
        "key_id": [seeded.api_key_id],
        "table_id": [seeded.mode_table_id],
        "rollout_id": [seeded.rollout_id],
    }.get(name, [])


def _seeded_or(method: str, name: str, generated: Any) -> st.SearchStrategy[Any]:
    """One of the run's seeded ids for ``name``, looked up when drawn (the run is set by the
    ``role`` fixture after the strategies are built); ``generated`` when there is none."""

    def pick(index: int) -> Any:
        ids = _known(method, name)
        return ids[index % len(ids)] if ids else generated

    return st.integers(min_value=0, max_value=7).map(pick)


@schema.hook
def flatmap_path_parameters(ctx: Any, path_parameters: dict[str, Any] | None) -> Any:
    method = ctx.operation.method.upper()
    if not path_parameters or not SEEDED_NAMES & set(path_parameters):
        return st.just(path_parameters)
    return st.one_of(
        st.fixed_dictionaries(
            {
                name: _seeded_or(method, name, value) if name in SEEDED_NAMES else st.just(value)
                for name, value in path_parameters.items()
            }
        ),
        st.just(path_parameters),
    )


@schema.hook
def flatmap_query(ctx: Any, query: dict[str, Any] | None) -> Any:
    if not ctx.operation.path.endswith("/telemetry"):
        return st.just(query)
    now = datetime.now(UTC)
    window = {"from": (now - timedelta(minutes=20)).isoformat(), "to": now.isoformat()}
    return st.one_of(
        st.sampled_from(["", "10s", "1m"]).map(
            lambda bucket: {**window, **({"bucket": bucket} if bucket else {})}
        ),
        st.just({**(query or {}), **window}),
        st.just(query),
    )


# Bodies that succeed for a brand admin (and the operator, which names the brand), where
# random ones almost never would: they need the run's ids, or a table inside the envelope.
VALID_BODIES: dict[tuple[str, str], Callable[[SeededBrand], dict[str, Any]]] = {
    ("POST", "/v1/api-keys"): lambda s: {"brand": "acme", "role": "viewer", "name": "desk"},
    ("POST", "/v1/mode-tables"): lambda s: {
        "brand": "acme",
        "name": "gentler LIFT",
        "modes": {"LIFT": {**DEFAULT_MODES["LIFT"], "i_target_ua": 250}},
    },
    ("POST", "/v1/rollouts"): lambda s: {
        "brand": "acme",
        "mode_table_id": s.mode_table_id,
        "target": {"device_ids": [s.device_id]},
    },
    ("PATCH", "/v1/rules/no_gel"): lambda s: {"thresholds": {"total_s": 5}},
}


@schema.hook
def flatmap_body(ctx: Any, body: Any) -> Any:
    make = VALID_BODIES.get((ctx.operation.method.upper(), ctx.operation.path))
    if make is None:
        return st.just(body)

    def valid(_: object) -> Any:
        seeded = getattr(RUN, "seeded", None)
        return make(seeded) if seeded is not None else body

    return st.one_of(st.just(None).map(valid), st.just(body))


@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    # Requests go through a real database, and the hooks above narrow what is drawn: the
    # health checks for slow or filtered generation would fail runs that test what they should.
    suppress_health_check=list(HealthCheck),
)
@schema.parametrize()
def test_every_response_is_documented_and_none_is_a_server_error(case: Any, role: str) -> None:
    case.call_and_validate(
        headers=auth(RUN.keys[role]), checks=CHECKS, app=RUN.app, session=RUN.session
    )
