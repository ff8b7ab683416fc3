"""Per-key rate limiting: 429 with Retry-After, one key's burst does not limit another."""

from pathlib import Path

from fastapi.testclient import TestClient

from services.api.main import create_app
from services.api.settings import ApiSettings
from tests.api import auth


def test_a_key_over_its_rate_gets_429_with_retry_after_and_other_keys_do_not(
    database_url: str, keys: dict[str, str], tmp_path: Path
) -> None:
    settings = ApiSettings(
        database_url=database_url,
        mqtt_password="x",
        data_dir=tmp_path,
        rate_limit_burst=3,
        rate_limit_per_s=0.5,
    )
    with TestClient(create_app(settings)) as client:
        codes = [
            client.get("/v1/fleet/summary", headers=auth(keys["viewer"])).status_code
            for _ in range(4)
        ]
        assert codes == [200, 200, 200, 429]
        limited = client.get("/v1/fleet/summary", headers=auth(keys["viewer"]))
        assert limited.status_code == 429
        assert limited.headers["content-type"] == "application/problem+json"
        assert limited.json()["type"].endswith("/rate-limited")
        assert int(limited.headers["retry-after"]) in (1, 2)
        assert client.get("/v1/fleet/summary", headers=auth(keys["admin"])).status_code == 200
