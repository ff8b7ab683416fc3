"""Rate limits: 429 with Retry-After, per key and for failed authentications, held in
PostgreSQL so that every API process (here: two apps on one database) counts against the same
limit."""

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from httpx2 import Response

from services.api.main import create_app
from services.api.settings import ApiSettings
from tests.api import auth

BAD_KEY = "gvk_not-a-key-of-anyone"


@contextmanager
def apps(
    database_url: str, tmp_path: Path, count: int, address: str = "192.0.2.1", **limits: Any
) -> Iterator[list[TestClient]]:
    """``count`` API apps on one database, as ``count`` API processes would be, called from
    ``address``."""
    with ExitStack() as stack:
        yield [
            stack.enter_context(
                TestClient(
                    create_app(
                        ApiSettings(
                            database_url=database_url,
                            mqtt_password="x",
                            data_dir=tmp_path / f"api-{n}",
                            **limits,
                        )
                    ),
                    client=(address, 50000),
                )
            )
            for n in range(count)
        ]


def assert_rate_limited(response: Response) -> None:
    assert response.status_code == 429, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"].endswith("/rate-limited")
    assert int(response.headers["retry-after"]) >= 1


def test_a_key_over_its_rate_gets_429_with_retry_after_and_other_keys_do_not(
    api_database_url: str, keys: dict[str, str], tmp_path: Path
) -> None:
    with apps(api_database_url, tmp_path, 1, rate_limit_burst=3, rate_limit_per_s=0.5) as [client]:
        codes = [
            client.get("/v1/fleet/summary", headers=auth(keys["viewer"])).status_code
            for _ in range(4)
        ]
        assert codes == [200, 200, 200, 429]
        limited = client.get("/v1/fleet/summary", headers=auth(keys["viewer"]))
        assert_rate_limited(limited)
        assert int(limited.headers["retry-after"]) in (1, 2)
        assert client.get("/v1/fleet/summary", headers=auth(keys["admin"])).status_code == 200


def test_a_keys_rate_limit_holds_across_api_processes(
    api_database_url: str, keys: dict[str, str], tmp_path: Path
) -> None:
    with apps(api_database_url, tmp_path, 2, rate_limit_burst=6, rate_limit_per_s=0.1) as two:
        # Alternating between the two apps, reads (the read-only unit) and a write-unit route.
        codes = [
            two[n % 2]
            .get("/v1/fleet/summary" if n % 3 else "/v1/me", headers=auth(keys["viewer"]))
            .status_code
            for n in range(10)
        ]
    # Six in all, not six per process.
    assert codes == [200] * 6 + [429] * 4, codes


def test_failed_authentications_are_limited_per_address_across_api_processes(
    api_database_url: str, keys: dict[str, str], tmp_path: Path
) -> None:
    with apps(
        api_database_url, tmp_path, 2, auth_failures_per_window=3, auth_failure_window_s=60.0
    ) as (first, second):
        bad = [
            client.get("/v1/fleet/summary", headers=auth(f"{BAD_KEY}-{n}")).status_code
            for n, client in enumerate((first, second, first))
        ]
        assert bad == [401, 401, 401]
        # The address has used its failures, counted across both processes: every key it
        # sends now is refused until the window ends, a valid one included, on either
        # process and either kind of route.
        assert_rate_limited(first.get("/v1/fleet/summary", headers=auth(BAD_KEY)))
        refused = second.get("/v1/fleet/summary", headers=auth(keys["viewer"]))
        assert_rate_limited(refused)
        assert 55 <= int(refused.headers["retry-after"]) <= 60
        assert_rate_limited(first.get("/v1/me", headers=auth(keys["admin"])))
    # Another address is not affected.
    with apps(
        api_database_url, tmp_path, 1, auth_failures_per_window=3, address="198.51.100.7"
    ) as [elsewhere]:
        assert elsewhere.get("/v1/fleet/summary", headers=auth(keys["viewer"])).status_code == 200


def test_failed_authentications_with_one_key_prefix_are_limited_without_locking_out_its_key(
    api_database_url: str, keys: dict[str, str], tmp_path: Path
) -> None:
    prefix = keys["viewer"][:10]  # what a key listing shows
    codes = []
    for n in range(4):  # four addresses, one guess each, all with the viewer key's prefix
        with apps(
            api_database_url, tmp_path, 1, auth_failures_per_window=3, address=f"192.0.2.{n}"
        ) as [client]:
            guess = prefix + "x" * 33
            codes.append(client.get("/v1/fleet/summary", headers=auth(guess)).status_code)
    assert codes == [401, 401, 401, 429]
    # The key itself, from an address of its own, still works: knowing a key's prefix does
    # not let anyone lock its owner out.
    with apps(api_database_url, tmp_path, 1, auth_failures_per_window=3, address="203.0.113.9") as [
        owner
    ]:
        assert owner.get("/v1/fleet/summary", headers=auth(keys["viewer"])).status_code == 200


def test_a_missing_key_is_401_and_not_counted_as_a_failure(
    api_database_url: str, keys: dict[str, str], tmp_path: Path
) -> None:
    with apps(api_database_url, tmp_path, 1, auth_failures_per_window=2) as [client]:
        for _ in range(5):
            assert client.get("/v1/fleet/summary").status_code == 401
        assert client.get("/v1/fleet/summary", headers=auth(keys["viewer"])).status_code == 200
