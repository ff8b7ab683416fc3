"""``/metrics`` of the API: requests by route template, method and status, and latency."""

import re

from fastapi.testclient import TestClient

from tests.api import auth


def counter(text: str, route: str, method: str, status: str) -> float:
    pattern = (
        r'^galvani_api_requests_total\{method="' + re.escape(method) + r'",route="'
        + re.escape(route) + r'",status="' + status + r'"\} ([0-9.e+]+)$'
    )  # fmt: skip
    match = re.search(pattern, text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_requests_are_counted_by_route_template_never_by_raw_path(
    client: TestClient, keys: dict[str, str]
) -> None:
    route = "/v1/devices/{device_id}"
    before = client.get("/metrics").text
    for device_id in ("nope-1", "nope-2", "nope-3"):
        assert (
            client.get(f"/v1/devices/{device_id}", headers=auth(keys["viewer"])).status_code == 404
        )
    assert client.get("/v1/alerts", headers=auth(keys["viewer"])).status_code == 200
    after = client.get("/metrics").text
    assert counter(after, route, "GET", "404") - counter(before, route, "GET", "404") == 3
    assert (
        counter(after, "/v1/alerts", "GET", "200") - counter(before, "/v1/alerts", "GET", "200")
        == 1
    )
    assert "nope-1" not in after
    assert 'galvani_api_request_seconds_bucket{le="0.05",method="GET",route="/v1/alerts"}' in after
