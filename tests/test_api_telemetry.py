"""A device's telemetry through the API: raw, bucketed, and bounded."""

from datetime import UTC, datetime, timedelta
from typing import Any, Final

import psycopg
import pytest
from fastapi.testclient import TestClient
from httpx2 import Response

from services.common.db import Storage, storage_of
from services.common.provisioning import provision_device
from services.maintenance.jobs import run_pass
from tests.api import auth

START = datetime(2026, 11, 29, 8, 0, tzinfo=UTC)


@pytest.fixture
def twenty_minutes(database_url: str) -> None:
    """A 20-minute session at 10 Hz (12,000 samples); current cycles 300..309 µA."""
    with psycopg.connect(database_url) as conn:
        provision_device(conn, device_id="acme-1", brand_id="acme", model="m")
        provision_device(conn, device_id="other-1", brand_id="other", model="m")
        conn.execute(
            "INSERT INTO samples (device_id, ts, seq, out, i_ua, i_set_ua, z_ohm, t_elec_c,"
            " t_batt_c, batt_pct, received_at)"
            " SELECT 'acme-1', %s + n * interval '100 milliseconds', n / 10, true,"
            " 300 + n %% 10, 300, 8000, 33, 30, 80, now() FROM generate_series(0, 11999) n",
            [START],
        )


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def telemetry(
    client: TestClient, key: str, start: datetime | int, end: datetime | int, query: str = ""
) -> Response:
    """``GET`` acme-1's telemetry from ``start`` to ``end`` (RFC 3339, or epoch ms given an
    int), with more of the query string."""
    window = "&".join(
        f"{name}={moment if isinstance(moment, int) else iso(moment)}"
        for name, moment in (("from", start), ("to", end))
    )
    return client.get(
        f"/v1/devices/acme-1/telemetry?{window}{'&' + query if query else ''}", headers=auth(key)
    )


def test_raw_samples_with_chosen_fields(
    client: TestClient, keys: dict[str, str], twenty_minutes: None
) -> None:
    response = telemetry(
        client, keys["viewer"], START, START + timedelta(seconds=10), "fields=i_ua,out"
    )
    assert response.status_code == 200
    body = response.json()
    assert (body["bucket"], body["fields"], len(body["points"])) == (None, ["i_ua", "out"], 100)
    assert body["points"][3] == {"ts": "2026-11-29T08:00:00.300000Z", "i_ua": 303.0, "out": True}


def test_buckets_give_min_avg_max_per_field(
    client: TestClient, keys: dict[str, str], twenty_minutes: None
) -> None:
    start_ms = int(START.timestamp() * 1000)
    end_ms = start_ms + 20 * 60 * 1000
    body = telemetry(client, keys["viewer"], start_ms, end_ms, "bucket=1m&fields=i_ua").json()
    assert len(body["points"]) == 20
    assert body["points"][0]["n"] == 600
    assert body["points"][0]["i_ua"] == {"min": 300.0, "avg": 304.5, "max": 309.0}


@pytest.mark.parametrize(
    ("query", "kind", "says"),
    [
        ("bucket=", "invalid-request", "bucket"),
        ("fields=volts", "invalid-request", "fields: volts"),
        ("", "too-many-points", "bucket"),
        ("bucket=100ms", "invalid-request", "bucket"),
    ],
)
def test_requests_are_refused_with_a_way_to_narrow_them(
    client: TestClient,
    keys: dict[str, str],
    twenty_minutes: None,
    query: str,
    kind: str,
    says: str,
) -> None:
    response = telemetry(client, keys["viewer"], START, START + timedelta(minutes=20), query)
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"].endswith("/" + kind)
    assert says in response.json()["detail"]


def test_buckets_of_fields_that_are_not_numbers(
    client: TestClient, keys: dict[str, str], twenty_minutes: None, database_url: str
) -> None:
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "UPDATE samples SET mode = 'LIFT', out = (seq % 2 = 0) WHERE device_id = 'acme-1'"
        )
    for bucket in ("1m", "10m"):  # 1m would be a rollup's width: these come from raw samples
        body = telemetry(
            client,
            keys["viewer"],
            START,
            START + timedelta(minutes=20),
            f"bucket={bucket}&fields=out,mode,i_ua",
        ).json()
        first = body["points"][0]
        assert first["out"] == {"min": 0.0, "avg": 0.5, "max": 1.0}
        assert first["mode"] == {"min": "LIFT", "avg": None, "max": "LIFT"}
        assert first["i_ua"]["min"] == 300.0


def test_too_many_buckets_are_refused_before_querying(
    client: TestClient, keys: dict[str, str], twenty_minutes: None
) -> None:
    response = telemetry(client, keys["viewer"], START, START + timedelta(days=2), "bucket=1s")
    assert response.status_code == 422
    assert "use a bucket of at least 17 s" in response.json()["detail"]


def test_another_brands_device_is_404(
    client: TestClient, keys: dict[str, str], twenty_minutes: None
) -> None:
    response = telemetry(client, keys["other"], START, START + timedelta(seconds=10))
    assert response.status_code == 404


HALF: Final = START + timedelta(hours=2, minutes=10, seconds=7)


@pytest.fixture
def half_refreshed(database_url: str) -> None:
    """Four hours of samples every 2 s, rollups refreshed by the maintenance job up to HALF,
    and the samples after HALF arriving only after that refresh (as they would live).

    Some samples have no current (output off) and none has a voltage, so means are over
    non-null values only and a field can be null in every sample of a bucket.
    """
    insert = (
        "INSERT INTO samples (device_id, ts, seq, out, i_ua, i_set_ua, z_ohm, t_elec_c,"
        " t_batt_c, batt_pct, received_at)"
        " SELECT 'acme-1', %(start)s + n * interval '2 seconds', n, n %% 13 <> 0,"
        " CASE WHEN n %% 13 <> 0 THEN 300 + n %% 17 END, 300, 8000 + n %% 50,"
        " 33.25 + (n %% 7) / 10.0, 30, 80 - n / 1000, now()"
        " FROM generate_series(0, 7199) n"
        " WHERE %(start)s + n * interval '2 seconds' {} %(half)s"
    )
    with psycopg.connect(database_url, autocommit=True) as conn:
        if storage_of(conn) is Storage.TIMESCALEDB:
            pytest.skip("the licensed build keeps continuous aggregates, not rollup tables")
        provision_device(conn, device_id="acme-1", brand_id="acme", model="m")
        conn.execute(insert.format("<"), {"start": START, "half": HALF})
        run_pass(conn, HALF, timedelta(hours=3))
        conn.execute(insert.format(">="), {"start": START, "half": HALF})


def _bucketed(client: TestClient, key: str, bucket: str) -> dict[str, Any]:
    start = START + timedelta(seconds=37)  # neither edge on a bucket boundary
    end = START + timedelta(hours=4, seconds=-23)
    response = telemetry(client, key, start, end, f"bucket={bucket}")
    assert response.status_code == 200
    body: dict[str, Any] = response.json()
    return body


@pytest.mark.parametrize("bucket", ["1m", "1h"])
def test_rollup_backed_buckets_equal_buckets_from_raw_samples(
    client: TestClient, keys: dict[str, str], database_url: str, half_refreshed: None, bucket: str
) -> None:
    from_rollups = _bucketed(client, keys["viewer"], bucket)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE galvani_meta SET value = '1970-01-01T00:00:00Z'"
            " WHERE key = 'rollups_refreshed_to'"
        )
    from_raw = _bucketed(client, keys["viewer"], bucket)
    assert from_rollups == from_raw
    assert sum(p["n"] for p in from_raw["points"]) == 7200 - 19 - 11  # both partial edges
    assert from_raw["points"][0]["v_v"] == {"min": None, "avg": None, "max": None}


@pytest.mark.parametrize(
    ("bucket", "table", "cut"), [("1m", "samples_1m", "10:10"), ("1h", "samples_1h", "10:00")]
)
def test_buckets_before_the_last_refresh_come_from_the_rollup(
    client: TestClient,
    keys: dict[str, str],
    database_url: str,
    half_refreshed: None,
    bucket: str,
    table: str,
    cut: str,
) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f"UPDATE {table} SET n = n + 1000000")  # noqa: S608 - a constant name
    points = _bucketed(client, keys["viewer"], bucket)["points"]
    from_rollup = [p["ts"][11:16] for p in points if p["n"] > 1000000]
    from_raw = [p["ts"][11:16] for p in points if p["n"] < 1000000]
    # The partial first bucket and everything from the refresh's bucket on are raw.
    assert from_raw[0] == "08:00"
    assert from_rollup[0] == ("08:01" if bucket == "1m" else "09:00")
    assert from_rollup[-1] < cut <= from_raw[1]
