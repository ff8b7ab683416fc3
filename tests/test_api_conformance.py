"""Schemathesis with every check against the API's own OpenAPI document, as the operator and
as a brand admin (issue 19, item 10): a request the document says is valid is accepted, one it
says is invalid is refused, a method it does not list answers 405 with an exact ``Allow``,
and no answer is a 5xx or undocumented.

Each role runs on a database of its own, seeded with a realistic brand, with a fixed seed
(``derandomize``) and a bounded number of examples per operation, so the run is the same each
time and takes well under a minute.
"""

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.checks import CHECKS
from schemathesis.python.asgi import ASGIClient, get_client

from deploy.stack.mosquitto import MosquittoBroker
from deploy.stack.postgres import PostgresServer
from services.api.main import create_app
from services.api.settings import ApiSettings
from tests.api import SeededBrand, auth, copied_database, issue_keys, seed_brand

ROLES = ("operator", "admin")
MAX_EXAMPLES = 8
# Every check schemathesis has that judges one request and its answer.
ALL_CHECKS = [check for check in CHECKS.get_all() if callable(check)]
# The Server-Sent Events stream never ends, so no example of it could finish; its one
# parameter (Last-Event-ID) is checked in tests/test_api_query_params.py.
EXCLUDED_PATHS = ["/v1/alerts/stream"]


def _settings(database_url: str, data_dir: Path, mqtt_port: int) -> ApiSettings:
    return ApiSettings(
        database_url=database_url,
        mqtt_port=mqtt_port,
        mqtt_password="x",
        data_dir=data_dir,
        rate_limit_burst=1_000_000,
        rate_limit_per_s=1_000_000.0,
    )


schema = schemathesis.openapi.from_dict(
    create_app(
        _settings("postgresql://schema-only@localhost/none", Path("/nonexistent"), 1884)
    ).openapi()
).exclude(path=EXCLUDED_PATHS)


class Run:
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
    name = str(request.param)
    data_dir = tmp_path_factory.mktemp(f"conformance-{name}")
    with copied_database(postgres, template_url, f"conformance_{os.getpid()}_{name}") as url:
        settings_ = _settings(url, data_dir, broker.config.service_port)
        RUN.keys = issue_keys(url)
        with TestClient(create_app(settings_)) as client:
            RUN.seeded = seed_brand(url, "acme", settings_.key_dir(), client, RUN.keys["admin"])
            RUN.app = client.app
            RUN.session = get_client(client.app)  # type: ignore[arg-type]
            yield name


@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
@schema.parametrize()
def test_the_api_accepts_what_its_schema_allows_and_refuses_the_rest(case: Any, role: str) -> None:
    case.call_and_validate(
        headers=auth(RUN.keys[role]), checks=ALL_CHECKS, app=RUN.app, session=RUN.session
    )
