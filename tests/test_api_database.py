"""The API's two ways to the database: reads on the event loop, writes in a session.

The read pool must not be able to change anything, and a database that cannot be reached must
answer 503 problem+json on both paths, never a 500 or a hang.
"""

from pathlib import Path

import psycopg
import pytest
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute, iter_route_contexts
from fastapi.testclient import TestClient

from deploy.stack.ports import free_port
from services.api import deps
from services.api.main import create_app
from services.api.settings import ApiSettings
from tests.api import auth


def test_a_statement_on_the_read_pool_cannot_write(client: TestClient) -> None:
    pool = client.app.state.read_pool  # type: ignore[attr-defined]

    async def insert_a_brand() -> None:
        async with pool.connection() as conn:
            await conn.execute("INSERT INTO brands (id, name) VALUES ('sneaky', 'Sneaky')")

    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        client.portal.call(insert_a_brand)  # type: ignore[union-attr]

    async def count_brands() -> object:
        async with pool.connection() as conn:
            cursor = await conn.execute("SELECT count(*) FROM brands WHERE id = 'sneaky'")
            row = await cursor.fetchone()
            return row[0] if row else None

    assert client.portal.call(count_brands) == 0  # type: ignore[union-attr]


def test_the_read_pool_answers_in_utc(client: TestClient) -> None:
    pool = client.app.state.read_pool  # type: ignore[attr-defined]

    async def zone() -> object:
        async with pool.connection() as conn:
            cursor = await conn.execute("SHOW TimeZone")
            row = await cursor.fetchone()
            return row[0] if row else None

    assert client.portal.call(zone) == "UTC"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/devices/gv-1"),  # the read pool
        ("GET", "/v1/fleet/summary"),  # the read pool
        ("POST", "/v1/devices/gv-1/clear"),  # the session
        ("GET", "/v1/mode-tables"),  # the session (SQLModel)
    ],
)
def test_an_unreachable_database_answers_503_problem_json(
    method: str, path: str, tmp_path: Path
) -> None:
    nothing_listens = free_port()
    settings = ApiSettings(
        database_url=f"postgresql://galvani:not-a-default-1@127.0.0.1:{nothing_listens}/galvani",
        mqtt_password="x",
        data_dir=tmp_path,
        pool_timeout_s=0.5,
    )
    with TestClient(create_app(settings)) as client:
        answer = client.request(method, path, headers=auth("gvk_whatever"))
    assert answer.status_code == 503
    assert answer.headers["content-type"] == "application/problem+json"
    assert answer.headers["retry-after"] == "1"
    assert answer.json()["type"].endswith("/database-unavailable")


def _calls(dependant: Dependant) -> set[object]:
    found: set[object] = {dependant.call}
    for dependency in dependant.dependencies:
        found |= _calls(dependency)
    return found


def test_no_endpoint_takes_a_connection_from_both_pools(client: TestClient) -> None:
    contexts = [
        context
        for context in iter_route_contexts(client.app.routes)  # type: ignore[attr-defined]
        if isinstance(context.original_route, APIRoute)
    ]
    uses = {
        f"{sorted(context.methods or ())} {context.path_format}": _calls(
            context.original_route.dependant  # type: ignore[attr-defined]
        )
        for context in contexts
    }
    reading = {route for route, calls in uses.items() if deps.read_unit in calls}
    writing = {route for route, calls in uses.items() if deps.write_unit in calls}
    assert "['GET'] /v1/devices/{device_id}/telemetry" in reading
    assert "['POST'] /v1/mode-tables" in writing
    assert reading & writing == set()
