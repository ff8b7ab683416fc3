"""Notification channels (issue 21): a webhook channel's secret shown once and stored only
encrypted, its URL checked against the outbound policy (no loopback, private, link-local or
plain-http targets unless the operator allows them), tenancy, the delivery log and the test
notification; Slack, PagerDuty and e-mail channels, whose credentials are never shown; quiet
hours, the cap on a brand's channels and PATCH. The API runs on a real database; "localhost"
is resolved by the system."""

import ipaddress
import os
import re
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import pytest
from cryptography.fernet import Fernet
from fastapi.testclient import TestClient
from httpx2 import Response

from services.api.main import create_app
from services.api.settings import ApiSettings
from services.common.outbound_urls import OutboundPolicy, RefusedUrl, check_url, refusal
from services.common.secret_box import SecretBox, SecretBoxError
from tests.api import auth
from tests.notify_receiver import Receiver
from tests.test_notification_outbox import insert_alert
from tests.test_notify_dispatcher import Dispatcher, Setup, wait_for

CHANNELS = "/v1/notification-channels"
# A public address as a literal, so the default policy's checks need no DNS on this machine.
PUBLIC_URL = "https://93.184.215.14/hooks/galvani"
SECRET_RE = re.compile(r"^whsec_[A-Za-z0-9_-]{43}$")
REFUSED_BY_DEFAULT = {
    "https://127.0.0.1/hook": "loopback",
    "https://10.0.0.1/hook": "private",
    "https://[::1]:8443/hook": "loopback",
    "https://169.254.169.254/latest/meta-data/": "link-local",
    "https://localhost/hook": "loopback",
    "https://[::ffff:127.0.0.1]/hook": "loopback",
    "https://2130706433/hook": "loopback",  # 127.0.0.1 as one decimal number
    "https://0.0.0.0/hook": "unspecified",
    "https://224.0.0.1/hook": "multicast",
    "http://93.184.215.14/hook": "https",
}


def assert_problem(response: Response, status: int, field: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem: dict[str, Any] = response.json()
    assert problem["status"] == status
    if field is not None:
        assert problem["errors"][0]["field"] == field, problem
        assert problem["detail"].startswith(field), problem
    return problem


def channel_body(url: str = PUBLIC_URL, **fields: Any) -> dict[str, Any]:
    return {"name": "on-call", "kind": "webhook", "url": url, **fields}


def create(client: TestClient, key: str, **fields: Any) -> dict[str, Any]:
    response = client.post(CHANNELS, json=channel_body(**fields), headers=auth(key))
    assert response.status_code == 201, response.text
    assert response.headers["cache-control"] == "no-store"
    made: dict[str, Any] = response.json()
    return made


def channel_rows(database_url: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(database_url) as conn:
        return conn.execute(
            "SELECT id, brand_id, url, secret_ciphertext, deleted_at"
            " FROM notification_channels ORDER BY id"
        ).fetchall()


@pytest.fixture
def permissive(api_database_url: str, tmp_path: Path) -> Iterator[TestClient]:
    """The API with private and plain-http targets allowed by the operator."""
    settings = ApiSettings(
        database_url=api_database_url,
        mqtt_password="x",
        data_dir=tmp_path,
        notify_allow_private_targets=True,
        notify_allow_http_targets=True,
    )
    with TestClient(create_app(settings)) as client:
        yield client


def test_create_shows_the_secret_once_and_the_database_holds_only_its_ciphertext(
    client: TestClient, keys: dict[str, str], database_url: str, tmp_path: Path
) -> None:
    made = create(
        client,
        keys["admin"],
        rules=["no_gel", "no_gel"],
        min_severity="warning",
        models=["glow-2"],
        transitions=["opened", "resolved"],
        max_concurrency=8,
    )
    secret = made["secret"]
    assert SECRET_RE.match(secret), secret
    assert made["url"] == PUBLIC_URL
    assert made["rules"] == ["no_gel"]  # once
    assert (made["min_severity"], made["models"], made["transitions"]) == (
        "warning",
        ["glow-2"],
        ["opened", "resolved"],
    )
    assert made["max_concurrency"] == 8

    [(channel_id, brand, url, ciphertext, deleted_at)] = channel_rows(database_url)
    assert (channel_id, brand, url, deleted_at) == (made["id"], "acme", PUBLIC_URL, None)
    assert secret.encode() not in bytes(ciphertext)
    key_file = tmp_path / "secrets" / "notify-secret-key"
    assert os.stat(key_file).st_mode & 0o777 == 0o600
    assert SecretBox.from_file(key_file).decrypt(bytes(ciphertext)) == secret

    # Never again: not in the list, not in the channel, for any role.
    for role in ("admin", "viewer", "support"):
        listed = client.get(CHANNELS, headers=auth(keys[role]))
        one = client.get(f"{CHANNELS}/{channel_id}", headers=auth(keys[role]))
        assert listed.status_code == one.status_code == 200
        assert [item["id"] for item in listed.json()["items"]] == [channel_id]
        for response in (listed, one):
            assert secret not in response.text
            assert "secret" not in response.text
    # A second channel gets a secret of its own.
    assert create(client, keys["admin"])["secret"] != secret


@pytest.mark.parametrize(("url", "why"), REFUSED_BY_DEFAULT.items())
def test_loopback_private_link_local_and_http_targets_are_refused_by_default(
    client: TestClient, keys: dict[str, str], database_url: str, url: str, why: str
) -> None:
    response = client.post(CHANNELS, json=channel_body(url), headers=auth(keys["admin"]))
    problem = assert_problem(response, 422, "body.url")
    assert problem["type"].endswith("/url-refused")
    assert why in problem["detail"], problem
    assert channel_rows(database_url) == []


@pytest.mark.parametrize("url", REFUSED_BY_DEFAULT)
def test_the_operator_may_allow_private_and_http_targets(
    permissive: TestClient, keys: dict[str, str], url: str
) -> None:
    assert create(permissive, keys["admin"], url=url)["url"] == url


def test_each_switch_allows_only_what_it_names(
    api_database_url: str, tmp_path: Path, keys: dict[str, str]
) -> None:
    http_only = ApiSettings(
        database_url=api_database_url,
        mqtt_password="x",
        data_dir=tmp_path,
        notify_allow_http_targets=True,
    )
    with TestClient(create_app(http_only)) as client:
        create(client, keys["admin"], url="http://93.184.215.14/hook")
        refused = client.post(
            CHANNELS, json=channel_body("http://127.0.0.1:9000/"), headers=auth(keys["admin"])
        )
        assert "loopback" in assert_problem(refused, 422, "body.url")["detail"]
    private_only = http_only.model_copy(
        update={"notify_allow_http_targets": False, "notify_allow_private_targets": True}
    )
    with TestClient(create_app(private_only)) as client:
        create(client, keys["admin"], url="https://127.0.0.1:9000/")
        refused = client.post(
            CHANNELS, json=channel_body("http://127.0.0.1:9000/"), headers=auth(keys["admin"])
        )
        assert "https" in assert_problem(refused, 422, "body.url")["detail"]


def test_the_switches_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    def policy() -> OutboundPolicy:
        return ApiSettings(database_url="postgresql://x", mqtt_password="x").outbound_policy()

    assert policy() == OutboundPolicy()
    monkeypatch.setenv("GALVANI_NOTIFY_ALLOW_PRIVATE_TARGETS", "1")
    monkeypatch.setenv("GALVANI_API_NOTIFY_ALLOW_HTTP_TARGETS", "1")
    assert policy() == OutboundPolicy(allow_private=True, allow_http=True)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"rules": ["no_such_rule"]}, "body.rules"),
        ({"rules": []}, "body.rules"),
        ({"min_severity": "fatal"}, "body.min_severity"),
        ({"transitions": ["test"]}, "body.transitions.0"),
        ({"transitions": []}, "body.transitions"),
        ({"kind": "sms"}, "body.kind"),
        ({"recipients": ["a@example.com"]}, "body.recipients"),
        ({"max_concurrency": 0}, "body.max_concurrency"),
        ({"max_concurrency": 65}, "body.max_concurrency"),
        ({"name": ""}, "body.name"),
        ({"secret": "whsec_mine"}, "body.secret"),
        ({"url": "ftp://93.184.215.14/"}, "body.url"),
        ({"url": "https://user:pw@93.184.215.14/"}, "body.url"),
        ({"url": "not a url"}, "body.url"),
    ],
)
def test_invalid_channels_are_problems_naming_the_field(
    client: TestClient, keys: dict[str, str], database_url: str, body: dict[str, Any], field: str
) -> None:
    response = client.post(CHANNELS, json={**channel_body(), **body}, headers=auth(keys["admin"]))
    problem = assert_problem(response, 422)
    assert problem["errors"][0]["field"].startswith(field), problem
    assert channel_rows(database_url) == []


def test_only_an_admin_creates_deletes_and_tests(client: TestClient, keys: dict[str, str]) -> None:
    channel_id = create(client, keys["admin"])["id"]
    for role in ("viewer", "support", "operator"):
        headers = auth(keys[role])
        assert_problem(client.post(CHANNELS, json=channel_body(), headers=headers), 403)
        assert_problem(client.delete(f"{CHANNELS}/{channel_id}", headers=headers), 403)
        assert_problem(client.post(f"{CHANNELS}/{channel_id}/test", headers=headers), 403)
    deliveries = client.get(f"{CHANNELS}/{channel_id}/deliveries", headers=auth(keys["viewer"]))
    assert deliveries.status_code == 200


def test_another_brand_gets_404_and_sees_nothing(
    client: TestClient, keys: dict[str, str], database_url: str
) -> None:
    channel_id = create(client, keys["admin"])["id"]
    other = auth(keys["other"])
    for method, path in (
        ("GET", f"{CHANNELS}/{channel_id}"),
        ("GET", f"{CHANNELS}/{channel_id}/deliveries"),
        ("POST", f"{CHANNELS}/{channel_id}/test"),
        ("DELETE", f"{CHANNELS}/{channel_id}"),
    ):
        assert_problem(client.request(method, path, headers=other), 404)
    assert client.get(CHANNELS, headers=other).json() == {"items": [], "next_cursor": None}
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM notifications").fetchone() == (0,)
    assert channel_rows(database_url)[0][4] is None  # not deleted


def test_a_deleted_channel_is_gone_from_the_api_and_kept_in_the_database(
    client: TestClient, keys: dict[str, str], database_url: str
) -> None:
    admin = auth(keys["admin"])
    kept, deleted = create(client, keys["admin"])["id"], create(client, keys["admin"])["id"]
    assert client.delete(f"{CHANNELS}/{deleted}", headers=admin).status_code == 204
    assert_problem(client.get(f"{CHANNELS}/{deleted}", headers=admin), 404)
    assert_problem(client.delete(f"{CHANNELS}/{deleted}", headers=admin), 404)
    assert_problem(client.post(f"{CHANNELS}/{deleted}/test", headers=admin), 404)
    assert [c["id"] for c in client.get(CHANNELS, headers=admin).json()["items"]] == [kept]
    rows = {row[0]: row[4] for row in channel_rows(database_url)}
    assert rows[kept] is None
    assert rows[deleted] is not None


def test_channels_are_paginated_oldest_first(client: TestClient, keys: dict[str, str]) -> None:
    made = [create(client, keys["admin"])["id"] for _ in range(3)]
    first = client.get(CHANNELS, params={"limit": 2}, headers=auth(keys["admin"])).json()
    assert [c["id"] for c in first["items"]] == made[:2]
    rest = client.get(
        CHANNELS, params={"limit": 2, "cursor": first["next_cursor"]}, headers=auth(keys["admin"])
    ).json()
    assert ([c["id"] for c in rest["items"]], rest["next_cursor"]) == (made[2:], None)


def test_the_test_endpoint_queues_a_notification_the_deliveries_list_shows(
    client: TestClient, keys: dict[str, str], database_url: str
) -> None:
    admin = auth(keys["admin"])
    channel_id = create(client, keys["admin"])["id"]
    queued = [client.post(f"{CHANNELS}/{channel_id}/test", headers=admin) for _ in range(3)]
    assert [response.status_code for response in queued] == [202, 202, 202]
    tests = [response.json() for response in queued]
    keys_made = [test["idempotency_key"] for test in tests]
    assert len(set(keys_made)) == 3
    for test in tests:
        assert re.fullmatch(rf"ntf_{channel_id}_0_test_[0-9]+", test["idempotency_key"]), test
        assert test["status"] == "pending"

    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT id, brand_id, alert_id, transition, idempotency_key, payload, status"
            " FROM notifications WHERE channel_id = %s ORDER BY id",
            [channel_id],
        ).fetchall()
    assert [row[0] for row in rows] == [test["id"] for test in tests]
    _, brand, alert_id, transition, key, payload, status = rows[0]
    assert (brand, alert_id, transition, key, status) == (
        "acme",
        None,
        "test",
        keys_made[0],
        "pending",
    )
    assert payload["event"] == "test"
    assert payload["alert"] is None
    assert payload["v"] == 1
    assert payload["brand"] == "acme"
    assert payload["idempotency_key"] == keys_made[0]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", payload["occurred_at"])

    listed = client.get(f"{CHANNELS}/{channel_id}/deliveries", headers=admin).json()
    assert [item["id"] for item in listed["items"]] == [test["id"] for test in reversed(tests)]
    newest = listed["items"][0]
    assert newest["transition"] == "test"
    assert newest["alert_id"] is None
    assert (newest["status"], newest["attempts"], newest["latency_ms"]) == ("pending", 0, None)

    # As the dispatcher records a delivery: the latency is delivered_at - created_at.
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "UPDATE notifications SET status = 'delivered', attempts = 1,"
            " last_status_code = 204, delivered_at = created_at + interval '1.5 s' WHERE id = %s",
            [tests[0]["id"]],
        )
    delivered = client.get(
        f"{CHANNELS}/{channel_id}/deliveries", params={"status": "delivered"}, headers=admin
    ).json()["items"]
    assert [(d["id"], d["last_status_code"], d["latency_ms"]) for d in delivered] == [
        (tests[0]["id"], 204, 1500.0)
    ]
    page = client.get(
        f"{CHANNELS}/{channel_id}/deliveries", params={"limit": 2}, headers=admin
    ).json()
    more = client.get(
        f"{CHANNELS}/{channel_id}/deliveries",
        params={"limit": 2, "cursor": page["next_cursor"]},
        headers=admin,
    ).json()
    assert [d["id"] for d in page["items"] + more["items"]] == [t["id"] for t in reversed(tests)]
    bad = client.get(
        f"{CHANNELS}/{channel_id}/deliveries", params={"status": "lost"}, headers=admin
    )
    assert_problem(bad, 422, "query.status")


def test_a_channel_made_through_the_api_gets_its_test_signed_by_the_dispatcher(
    permissive: TestClient,
    keys: dict[str, str],
    database_url: str,
    rules_database_url: str,
    notify_database_url: str,
    tmp_path: Path,
) -> None:
    """End to end: the secret the API shows once is the one the dispatcher signs with (the
    same key file), and the delivery shows in the channel's log."""
    receiver = Receiver("not yet known")
    receiver.start()
    dispatcher = None
    try:
        made = create(permissive, keys["admin"], url=receiver.url)
        receiver.secret = made["secret"].encode()
        admin = auth(keys["admin"])
        queued = permissive.post(f"{CHANNELS}/{made['id']}/test", headers=admin).json()
        key_file = tmp_path / "secrets" / "notify-secret-key"
        setup = Setup(database_url, rules_database_url, notify_database_url, key_file, tmp_path, "")
        dispatcher = Dispatcher(setup, "notify")
        wait_for(lambda: len(receiver.snapshot()) == 1, 30, "the test delivery")

        def delivered() -> list[dict[str, Any]]:
            deliveries = permissive.get(f"{CHANNELS}/{made['id']}/deliveries", headers=admin)
            items: list[dict[str, Any]] = deliveries.json()["items"]
            return [item for item in items if item["status"] == "delivered"]

        wait_for(lambda: len(delivered()) == 1, 10, "the outcome recorded")
    finally:
        if dispatcher is not None:
            dispatcher.stop()
        receiver.stop()
    [got] = receiver.snapshot()
    assert receiver.bad_signatures == 0
    assert got.key == queued["idempotency_key"] == got.payload["idempotency_key"]
    assert (got.payload["event"], got.payload["alert"]) == ("test", None)
    [row] = delivered()
    assert (row["id"], row["attempts"], row["last_status_code"]) == (queued["id"], 1, 200)
    assert row["latency_ms"] is not None
    assert row["latency_ms"] > 0


# The URL check and the secret box on their own (no server needed).


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("fd00::1", "private"),  # ULA
        ("fe80::1", "link-local"),
        ("169.254.169.254", "link-local"),
        ("ff02::1", "multicast"),
        ("::", "unspecified"),
        ("240.0.0.1", "reserved"),
        ("100.64.0.1", "not globally routable"),  # carrier-grade NAT
        ("::ffff:10.0.0.1", "private"),  # IPv4-mapped
        ("2002:7f00:1::", "loopback"),  # 6to4 of 127.0.0.1
        ("64:ff9b::a00:1", "private"),  # NAT64 of 10.0.0.1
    ],
)
def test_addresses_that_are_not_public_are_named_for_what_they_are(address: str, kind: str) -> None:
    reason = refusal(ipaddress.ip_address(address))
    assert reason is not None
    assert kind in reason


@pytest.mark.parametrize("address", ["93.184.215.14", "2606:4700::1111", "64:ff9b::5db8:d70e"])
def test_public_addresses_pass(address: str) -> None:
    assert refusal(ipaddress.ip_address(address)) is None


def test_every_address_a_name_resolves_to_is_checked() -> None:
    def resolve(host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        assert (host, port) == ("hooks.example.com", 8443)
        return [ipaddress.ip_address("93.184.215.14"), ipaddress.ip_address("10.0.0.7")]

    with pytest.raises(RefusedUrl, match=r"'hooks.example.com' resolves to 10.0.0.7, a private"):
        check_url("https://hooks.example.com:8443/x", OutboundPolicy(), resolve)
    checked = check_url(
        "HTTPS://Hooks.Example.com:8443/x?a=1", OutboundPolicy(allow_private=True), resolve
    )
    assert checked.url == "https://hooks.example.com:8443/x?a=1"
    assert (checked.host, checked.port, len(checked.addresses)) == ("hooks.example.com", 8443, 2)


def test_a_name_that_does_not_resolve_is_refused() -> None:
    with pytest.raises(RefusedUrl, match="does not resolve"):
        check_url("https://no-such-host.invalid/", OutboundPolicy())


def test_the_secret_box_refuses_a_readable_key_and_an_altered_ciphertext(tmp_path: Path) -> None:
    path = tmp_path / "secrets" / "notify-secret-key"
    box = SecretBox.from_file(path)
    assert SecretBox.from_file(path).decrypt(box.encrypt("whsec_x")) == "whsec_x"  # the same key
    ciphertext = bytearray(box.encrypt("whsec_x"))
    ciphertext[-5] ^= 1
    with pytest.raises(SecretBoxError, match="does not decrypt"):
        box.decrypt(bytes(ciphertext))
    path.chmod(0o644)
    with pytest.raises(SecretBoxError, match="chmod 600"):
        SecretBox.from_file(path)


def test_a_rotated_key_file_still_decrypts_what_the_old_key_encrypted(tmp_path: Path) -> None:
    path = tmp_path / "notify-secret-key"
    old = SecretBox.from_file(path)
    sealed = old.encrypt("whsec_old")
    path.write_bytes(Fernet.generate_key() + b"\n" + path.read_bytes())
    rotated = SecretBox.from_file(path)
    assert rotated.decrypt(sealed) == "whsec_old"
    with pytest.raises(SecretBoxError):
        old.decrypt(rotated.encrypt("whsec_new"))  # the new first key encrypts


# Channels of every kind, quiet hours, the cap on a brand's channels, and PATCH.

SLACK_URL = "https://93.184.215.14/services/T0GALVANI/B0GALVANI/sl4ckT0kenSecretPart"
SLACK_MASKED = "https://93.184.215.14/services/…"
ROUTING_KEY = "R0ut1ngKeyOfTheServiceIntegr4t10"
RECIPIENTS = ["oncall@example.com", "Second.Person@Example.COM"]
KIND_BODIES: dict[str, dict[str, Any]] = {
    "webhook": {"kind": "webhook", "url": PUBLIC_URL},
    "slack": {"kind": "slack", "url": SLACK_URL},
    "pagerduty": {"kind": "pagerduty", "routing_key": ROUTING_KEY},
    "email": {"kind": "email", "recipients": RECIPIENTS},
}
# What each kind must never show after its create (the webhook's secret is checked by value).
CREDENTIALS = {"slack": ["sl4ckT0ken", "B0GALVANI"], "pagerduty": [ROUTING_KEY]}
QUIET = {"start": "22:00", "end": "07:00", "time_zone": "Pacific/Auckland"}


def post_kind(client: TestClient, key: str, kind: str, **fields: Any) -> Response:
    body = {"name": f"{kind} channel", **KIND_BODIES[kind], **fields}
    return client.post(CHANNELS, json=body, headers=auth(key))


def create_kind(client: TestClient, key: str, kind: str, **fields: Any) -> dict[str, Any]:
    response = post_kind(client, key, kind, **fields)
    assert response.status_code == 201, response.text
    assert response.headers["cache-control"] == "no-store"
    made: dict[str, Any] = response.json()
    return made


def stored(database_url: str, channel_id: int) -> dict[str, Any]:
    with psycopg.connect(database_url, row_factory=psycopg.rows.dict_row) as conn:
        row = conn.execute(
            "SELECT * FROM notification_channels WHERE id = %s", [channel_id]
        ).fetchone()
    assert row is not None
    return row


def box(tmp_path: Path) -> SecretBox:
    return SecretBox.from_file(tmp_path / "secrets" / "notify-secret-key")


@pytest.mark.parametrize("kind", KIND_BODIES)
def test_each_kind_is_created_and_never_shows_its_credential(
    client: TestClient, keys: dict[str, str], database_url: str, tmp_path: Path, kind: str
) -> None:
    created = post_kind(client, keys["admin"], kind, min_severity="warning", quiet_hours=QUIET)
    assert created.status_code == 201, created.text
    made = created.json()
    assert (made["kind"], made["min_severity"], made["quiet_hours"]) == (kind, "warning", QUIET)
    row = stored(database_url, made["id"])
    assert (row["quiet_hours_time_zone"], str(row["quiet_hours_start"])) == (
        "Pacific/Auckland",
        "22:00:00",
    )
    expected_url = {
        "webhook": PUBLIC_URL,
        "slack": SLACK_MASKED,
        "pagerduty": "https://events.pagerduty.com/v2/enqueue",
        "email": None,
    }[kind]
    assert made["url"] == row["url"] == expected_url
    if kind == "email":
        assert (
            made["recipients"]
            == row["recipients"]
            == [
                "oncall@example.com",
                "Second.Person@example.com",  # the domain normalised, the local part kept
            ]
        )
        assert row["secret_ciphertext"] is None
    else:
        assert made["recipients"] is None
        sealed = bytes(row["secret_ciphertext"])
        plain = {"webhook": made["secret"], "slack": SLACK_URL, "pagerduty": ROUTING_KEY}[kind]
        assert box(tmp_path).decrypt(sealed) == plain
        assert plain.encode() not in sealed
    if kind == "webhook":
        assert SECRET_RE.match(made["secret"])
    else:
        assert made["secret"] is None
        for credential in CREDENTIALS.get(kind, []):
            assert credential not in created.text

    admin = auth(keys["admin"])
    for response in (
        client.get(CHANNELS, headers=admin),
        client.get(f"{CHANNELS}/{made['id']}", headers=auth(keys["viewer"])),
        client.patch(f"{CHANNELS}/{made['id']}", json={"name": "renamed"}, headers=admin),
        client.get(f"{CHANNELS}/{made['id']}/deliveries", headers=admin),
    ):
        assert response.status_code == 200, response.text
        assert "secret" not in response.text
        for credential in [*CREDENTIALS.get(kind, []), str(made["secret"])]:
            assert credential not in response.text


def test_a_slack_url_of_one_path_segment_is_masked_whole(
    permissive: TestClient, keys: dict[str, str]
) -> None:
    made = create_kind(permissive, keys["admin"], "slack", url="https://127.0.0.1:8443/t0ken")
    assert made["url"] == "https://127.0.0.1:8443/…"
    assert "t0ken" not in str(made)


@pytest.mark.parametrize("kind", ["slack", "pagerduty"])
@pytest.mark.parametrize(("url", "why"), list(REFUSED_BY_DEFAULT.items())[:3])
def test_slack_and_pagerduty_urls_are_checked_like_a_webhooks(
    client: TestClient,
    permissive: TestClient,
    keys: dict[str, str],
    database_url: str,
    kind: str,
    url: str,
    why: str,
) -> None:
    refused = post_kind(client, keys["admin"], kind, url=url)
    assert why in assert_problem(refused, 422, "body.url")["detail"]
    assert channel_rows(database_url) == []
    made = create_kind(permissive, keys["admin"], kind, url=url)
    assert made["url"] == (url if kind == "pagerduty" else made["url"])


@pytest.mark.parametrize(
    ("kind", "fields", "field"),
    [
        ("slack", {"url": None}, "body.url"),
        ("slack", {"url": "ftp://93.184.215.14/x"}, "body.url"),
        ("slack", {"routing_key": ROUTING_KEY}, "body.routing_key"),
        ("pagerduty", {"routing_key": ROUTING_KEY[:31]}, "body.routing_key"),
        ("pagerduty", {"routing_key": ROUTING_KEY[:31] + "-"}, "body.routing_key"),
        ("pagerduty", {"routing_key": ROUTING_KEY + "x"}, "body.routing_key"),
        ("pagerduty", {"routing_key": None}, "body.routing_key"),
        ("pagerduty", {"url": "http://93.184.215.14/v2/enqueue"}, "body.url"),
        ("email", {"recipients": []}, "body.recipients"),
        ("email", {"recipients": ["not an address"]}, "body.recipients.0"),
        ("email", {"recipients": ["oncall@example.com", "x@"]}, "body.recipients.1"),
        ("email", {"recipients": [f"p{n}@example.com" for n in range(21)]}, "body.recipients"),
        ("email", {"url": PUBLIC_URL}, "body.url"),
        ("email", {"secret": "x"}, "body.secret"),
        ("webhook", {"quiet_hours": {**QUIET, "time_zone": "Mars/Olympus"}}, "body.quiet_hours"),
        ("webhook", {"quiet_hours": {**QUIET, "time_zone": "CET+1"}}, "body.quiet_hours"),
        ("slack", {"quiet_hours": {**QUIET, "end": "22:00"}}, "body.quiet_hours"),
        ("pagerduty", {"quiet_hours": {**QUIET, "start": "24:00"}}, "body.quiet_hours.start"),
        ("email", {"quiet_hours": {"start": "22:00", "end": "07:00"}}, "body.quiet_hours"),
        ("webhook", {"kind": None}, "body.kind"),
    ],
)
def test_invalid_channels_of_each_kind_are_problems_naming_the_field(
    client: TestClient,
    keys: dict[str, str],
    database_url: str,
    kind: str,
    fields: dict[str, Any],
    field: str,
) -> None:
    body = {"name": "x", **KIND_BODIES[kind], **fields}
    body = {name: value for name, value in body.items() if value is not None}
    response = client.post(CHANNELS, json=body, headers=auth(keys["admin"]))
    problem = assert_problem(response, 422)
    assert problem["errors"][0]["field"].startswith(field), problem
    assert problem["detail"].startswith(field), problem
    assert ROUTING_KEY[:31] not in response.text  # a key is never echoed, even a wrong one
    assert channel_rows(database_url) == []


def test_quiet_hours_hold_an_alerts_notification_and_the_log_shows_until_when(
    client: TestClient, keys: dict[str, str], database_url: str
) -> None:
    """Quiet hours of an hour either side of now in Los Angeles: a warning's notification
    waits an hour; a test notification never waits."""
    zone = ZoneInfo("America/Los_Angeles")
    now = datetime.now(zone)
    quiet = {
        "start": (now - timedelta(hours=1)).strftime("%H:%M"),
        "end": (now + timedelta(hours=1)).strftime("%H:%M"),
        "time_zone": "America/Los_Angeles",
    }
    admin = auth(keys["admin"])
    made = create_kind(client, keys["admin"], "email", quiet_hours=quiet)
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "INSERT INTO devices (id, brand_id, model) VALUES ('acme-dev-1', 'acme', 'glow-2')"
        )
        insert_alert(conn, "acme", "acme-dev-1", "battery_hot", "warning")
    test = client.post(f"{CHANNELS}/{made['id']}/test", headers=admin)
    assert test.status_code == 202, test.text
    items = client.get(f"{CHANNELS}/{made['id']}/deliveries", headers=admin).json()["items"]
    assert [item["transition"] for item in items] == ["test", "opened"]
    assert items[0]["held_until"] is None
    held_until = datetime.fromisoformat(items[1]["held_until"])
    assert datetime.fromisoformat(items[1]["next_attempt_at"]) == held_until
    end = now.replace(second=0, microsecond=0) + timedelta(hours=1)
    assert held_until == end.astimezone(UTC)


def channels_client(api_database_url: str, tmp_path: Path, **settings: Any) -> TestClient:
    return TestClient(
        create_app(
            ApiSettings(
                database_url=api_database_url, mqtt_password="x", data_dir=tmp_path, **settings
            )
        )
    )


def test_a_brand_has_at_most_its_cap_of_live_channels(
    api_database_url: str, database_url: str, tmp_path: Path, keys: dict[str, str]
) -> None:
    with channels_client(api_database_url, tmp_path, notify_channels_per_brand=3) as client:
        made = [create_kind(client, keys["admin"], kind)["id"] for kind in ("webhook", "slack")]
        made.append(create_kind(client, keys["admin"], "email")["id"])
        refused = post_kind(client, keys["admin"], "pagerduty")
        problem = assert_problem(refused, 409)
        assert problem["type"].endswith("/channel-limit")
        assert "at most 3" in problem["detail"]
        assert len(channel_rows(database_url)) == 3
        create_kind(client, keys["other"], "pagerduty")  # another brand's count
        admin = auth(keys["admin"])
        assert client.delete(f"{CHANNELS}/{made[0]}", headers=admin).status_code == 204
        create_kind(client, keys["admin"], "pagerduty")  # a deleted one does not count
        assert_problem(post_kind(client, keys["admin"], "webhook"), 409)


def test_the_default_cap_is_50(client: TestClient, keys: dict[str, str], database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        for n in range(49):
            conn.execute(
                "INSERT INTO notification_channels (brand_id, name, kind, url, secret_ciphertext)"
                " VALUES ('acme', %s, 'webhook', 'https://h.example/', 'k')",
                [f"c{n}"],
            )
    create_kind(client, keys["admin"], "email")
    assert_problem(post_kind(client, keys["admin"], "email"), 409)


def test_a_create_at_the_cap_waits_for_a_concurrent_one_and_counts_it(
    api_database_url: str, database_url: str, tmp_path: Path, keys: dict[str, str]
) -> None:
    """The count is taken under the brand's lock: a create that arrives while another
    transaction (here the test's, holding the same lock) adds the last channel allowed waits
    for it to commit, and then is refused; counted without the lock, it would pass."""
    answers: list[Response] = []
    with channels_client(api_database_url, tmp_path, notify_channels_per_brand=1) as client:
        with psycopg.connect(database_url) as conn:
            conn.execute(
                "SELECT pg_advisory_xact_lock("
                " hashtextextended('galvani-notification-channels:' || 'acme', 0))"
            )
            conn.execute(
                "INSERT INTO notification_channels (brand_id, name, kind, recipients)"
                " VALUES ('acme', 'first', 'email', '{a@example.com}')"
            )
            racer = threading.Thread(
                target=lambda: answers.append(post_kind(client, keys["admin"], "email"))
            )
            racer.start()
            racer.join(timeout=1.0)
            assert racer.is_alive(), "the create did not wait for the brand's lock"
        racer.join(timeout=10)
    [answer] = answers
    assert_problem(answer, 409)
    assert [row[2] for row in channel_rows(database_url)] == [None]  # only the first


def test_patch_changes_only_the_fields_given(
    client: TestClient, keys: dict[str, str], database_url: str, tmp_path: Path
) -> None:
    admin = auth(keys["admin"])
    made = create_kind(
        client, keys["admin"], "webhook", rules=["no_gel"], models=["glow-2"], quiet_hours=QUIET
    )
    before = stored(database_url, made["id"])
    patch = {
        "name": "night shift",
        "min_severity": "critical",
        "transitions": ["opened"],
        "max_concurrency": 16,
        "rules": None,
    }
    response = client.patch(f"{CHANNELS}/{made['id']}", json=patch, headers=admin)
    assert response.status_code == 200, response.text
    changed = response.json()
    assert changed == client.get(f"{CHANNELS}/{made['id']}", headers=admin).json()
    expected = {**made, **patch}
    del expected["secret"]
    assert changed == expected
    assert changed["models"] == ["glow-2"]
    assert changed["quiet_hours"] == QUIET
    # Quiet hours changed, then cleared; the URL re-checked; the secret never changes.
    later = {**QUIET, "time_zone": "America/Los_Angeles"}
    changed = client.patch(f"{CHANNELS}/{made['id']}", json={"quiet_hours": later}, headers=admin)
    assert changed.json()["quiet_hours"] == later
    cleared = client.patch(f"{CHANNELS}/{made['id']}", json={"quiet_hours": None}, headers=admin)
    assert cleared.json()["quiet_hours"] is None
    assert stored(database_url, made["id"])["quiet_hours_time_zone"] is None
    refused = client.patch(
        f"{CHANNELS}/{made['id']}", json={"url": "https://10.0.0.1/x"}, headers=admin
    )
    assert "private" in assert_problem(refused, 422, "body.url")["detail"]
    moved = client.patch(
        f"{CHANNELS}/{made['id']}", json={"url": "https://93.184.215.15/new"}, headers=admin
    )
    assert moved.json()["url"] == "https://93.184.215.15/new"
    after = stored(database_url, made["id"])
    assert bytes(after["secret_ciphertext"]) == bytes(before["secret_ciphertext"])
    assert after["created_at"] == before["created_at"]
    assert client.patch(f"{CHANNELS}/{made['id']}", json={}, headers=admin).json() == {
        **moved.json()
    }


def test_patch_of_a_slack_url_replaces_its_secret_and_an_emails_recipients(
    client: TestClient, keys: dict[str, str], database_url: str, tmp_path: Path
) -> None:
    admin = auth(keys["admin"])
    slack = create_kind(client, keys["admin"], "slack")
    new_url = "https://93.184.215.14/hooks/T1/B1/n3wT0ken"
    moved = client.patch(f"{CHANNELS}/{slack['id']}", json={"url": new_url}, headers=admin)
    assert moved.status_code == 200, moved.text
    assert moved.json()["url"] == "https://93.184.215.14/hooks/…"
    assert "n3wT0ken" not in moved.text
    sealed = bytes(stored(database_url, slack["id"])["secret_ciphertext"])
    assert box(tmp_path).decrypt(sealed) == new_url

    email = create_kind(client, keys["admin"], "email")
    changed = client.patch(
        f"{CHANNELS}/{email['id']}", json={"recipients": ["pager@example.org"]}, headers=admin
    )
    assert changed.json()["recipients"] == ["pager@example.org"]
    assert stored(database_url, email["id"])["recipients"] == ["pager@example.org"]


@pytest.mark.parametrize(
    ("kind", "patch", "field"),
    [
        ("webhook", {"kind": "slack"}, "body.kind"),
        ("webhook", {"secret": "whsec_mine"}, "body.secret"),
        ("pagerduty", {"routing_key": ROUTING_KEY}, "body.routing_key"),
        ("webhook", {"name": None}, "body.name"),
        ("webhook", {"min_severity": None}, "body.min_severity"),
        ("webhook", {"transitions": []}, "body.transitions"),
        ("webhook", {"max_concurrency": 0}, "body.max_concurrency"),
        ("webhook", {"url": None}, "body.url"),
        ("webhook", {"recipients": ["a@example.com"]}, "body.recipients"),
        ("email", {"url": PUBLIC_URL}, "body.url"),
        ("email", {"recipients": []}, "body.recipients"),
        ("email", {"recipients": None}, "body.recipients"),
        ("slack", {"url": "https://127.0.0.1/x"}, "body.url"),
        ("slack", {"quiet_hours": {**QUIET, "time_zone": "Nowhere/Else"}}, "body.quiet_hours"),
        ("slack", {"rules": ["no_such_rule"]}, "body.rules"),
    ],
)
def test_an_invalid_patch_is_a_problem_naming_the_field_and_changes_nothing(
    client: TestClient,
    keys: dict[str, str],
    database_url: str,
    kind: str,
    patch: dict[str, Any],
    field: str,
) -> None:
    made = create_kind(client, keys["admin"], kind, name="kept")
    before = stored(database_url, made["id"])
    response = client.patch(
        f"{CHANNELS}/{made['id']}", json={"name": "changed", **patch}, headers=auth(keys["admin"])
    )
    problem = assert_problem(response, 422)
    assert problem["errors"][0]["field"].startswith(field), problem
    assert stored(database_url, made["id"]) == before


def test_patch_moves_a_pagerduty_channel_between_regions(
    permissive: TestClient, keys: dict[str, str]
) -> None:
    admin = auth(keys["admin"])
    made = create_kind(permissive, keys["admin"], "pagerduty", url="https://127.0.0.1:9/v2/x")
    path = f"{CHANNELS}/{made['id']}"
    default = "https://events.pagerduty.com/v2/enqueue"
    back = permissive.patch(path, json={"url": default}, headers=admin)
    assert back.status_code == 200, back.text
    assert back.json()["url"] == default
    local = permissive.patch(path, json={"url": "https://127.0.0.1:9/v2/y"}, headers=admin)
    assert local.json()["url"] == "https://127.0.0.1:9/v2/y"


def test_patch_is_for_admins_of_the_channels_brand(
    client: TestClient, keys: dict[str, str], database_url: str
) -> None:
    made = create_kind(client, keys["admin"], "pagerduty")
    path = f"{CHANNELS}/{made['id']}"
    for role in ("viewer", "support", "operator"):
        assert_problem(client.patch(path, json={"name": "x"}, headers=auth(keys[role])), 403)
    assert_problem(client.patch(path, json={"name": "x"}, headers=auth(keys["other"])), 404)
    assert_problem(client.patch(f"{CHANNELS}/999999", json={}, headers=auth(keys["admin"])), 404)
    assert client.delete(path, headers=auth(keys["admin"])).status_code == 204
    assert_problem(client.patch(path, json={"name": "x"}, headers=auth(keys["admin"])), 404)
    assert stored(database_url, made["id"])["name"] == "pagerduty channel"


def test_a_patch_leaves_what_is_queued_on_its_schedule(
    client: TestClient, keys: dict[str, str], database_url: str
) -> None:
    """A notification held by quiet hours stays held when the quiet hours are cleared."""
    zone = ZoneInfo("Pacific/Auckland")
    now = datetime.now(zone)
    quiet = {
        "start": (now - timedelta(hours=1)).strftime("%H:%M"),
        "end": (now + timedelta(hours=1)).strftime("%H:%M"),
        "time_zone": "Pacific/Auckland",
    }
    made = create_kind(client, keys["admin"], "slack", quiet_hours=quiet)
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "INSERT INTO devices (id, brand_id, model) VALUES ('acme-dev-1', 'acme', 'glow-2')"
        )
        insert_alert(conn, "acme", "acme-dev-1", "battery_hot", "info")
        held = conn.execute("SELECT next_attempt_at, held_until FROM notifications").fetchall()
    [(due, until)] = held
    assert due == until
    assert until is not None
    cleared = client.patch(
        f"{CHANNELS}/{made['id']}", json={"quiet_hours": None}, headers=auth(keys["admin"])
    )
    assert cleared.status_code == 200, cleared.text
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT next_attempt_at, held_until FROM notifications").fetchall() == (
            held
        )


@pytest.mark.parametrize("kind", KIND_BODIES)
def test_the_test_endpoint_queues_a_notification_for_every_kind(
    client: TestClient, keys: dict[str, str], database_url: str, kind: str
) -> None:
    made = create_kind(client, keys["admin"], kind)
    queued = client.post(f"{CHANNELS}/{made['id']}/test", headers=auth(keys["admin"]))
    assert queued.status_code == 202, queued.text
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT id, channel_id, transition, held_until FROM notifications"
        ).fetchall()
    assert rows == [(queued.json()["id"], made["id"], "test", None)]
    assert_problem(client.post(f"{CHANNELS}/{made['id']}/test", headers=auth(keys["other"])), 404)
