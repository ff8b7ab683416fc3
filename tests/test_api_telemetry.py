"""A device's telemetry through the API: raw, bucketed, and bounded."""

from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from fastapi.testclient import TestClient

from services.common.provisioning import provision_device
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


def test_raw_samples_with_chosen_fields(
    client: TestClient, keys: dict[str, str], twenty_minutes: None
) -> None:
    end = START + timedelta(seconds=10)
    response = client.get(
        f"/v1/devices/acme-1/telemetry?from={iso(START)}&to={iso(end)}&fields=i_ua,out",
        headers=auth(keys["viewer"]),
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
    body = client.get(
        f"/v1/devices/acme-1/telemetry?from={start_ms}&to={end_ms}&bucket=1m&fields=i_ua",
        headers=auth(keys["viewer"]),
    ).json()
    assert len(body["points"]) == 20
    assert body["points"][0]["n"] == 600
    assert body["points"][0]["i_ua"] == {"min": 300.0, "avg": 304.5, "max": 309.0}


@pytest.mark.parametrize(
    ("query", "kind", "says"),
    [
        ("bucket=", "invalid-request", "bucket"),
        ("fields=volts", "invalid-request", "fields: volts"),
        ("fields=mode&bucket=1m", "invalid-request", "fields: mode"),
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
    end = START + timedelta(minutes=20)
    response = client.get(
        f"/v1/devices/acme-1/telemetry?from={iso(START)}&to={iso(end)}&{query}",
        headers=auth(keys["viewer"]),
    )
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"].endswith("/" + kind)
    assert says in response.json()["detail"]


def test_too_many_buckets_are_refused_before_querying(
    client: TestClient, keys: dict[str, str], twenty_minutes: None
) -> None:
    end = START + timedelta(days=2)
    response = client.get(
        f"/v1/devices/acme-1/telemetry?from={iso(START)}&to={iso(end)}&bucket=1s",
        headers=auth(keys["viewer"]),
    )
    assert response.status_code == 422
    assert "use a bucket of at least 17 s" in response.json()["detail"]


def test_another_brands_device_is_404(
    client: TestClient, keys: dict[str, str], twenty_minutes: None
) -> None:
    end = START + timedelta(seconds=10)
    response = client.get(
        f"/v1/devices/acme-1/telemetry?from={iso(START)}&to={iso(end)}",
        headers=auth(keys["other"]),
    )
    assert response.status_code == 404
