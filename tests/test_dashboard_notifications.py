"""The dashboard's notification pages in headless Chromium against the real API and database:
the brand's channels and a channel's delivery log (a receiver's hostile error text shown as
text, paging, the status filter), the test button queueing a notification, and the alert page
notifications link to (``#/alerts/<id>``), found and not found. Screenshots land in
``test-artifacts/dashboard/``."""

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from services.api.main import create_app
from services.api.settings import ApiSettings
from tests.api import serving
from tests.notify_receiver import Receiver
from tests.test_dashboard import ARTIFACTS, api_url, browser, open_page, sign_in
from tests.test_notify_dispatcher import Dispatcher, Setup

__all__ = ["api_url", "browser"]  # pytest fixtures, used by name
# How long the receiver answers 500 after the test is sent: past the page's first refresh
# (5 s), so the page shows the failed attempts before the delivery.
RECEIVER_DOWN_S = 8.0

# A public address as a literal: the API's default outbound policy accepts it without DNS.
PUBLIC_URL = "https://93.184.215.14/hooks/galvani"
HOSTILE_ERROR = '<img src=x onerror="window.__pwned = 1"> receiver said <b>no</b>'
SEEDED = 60  # more than two pages of the dashboard's 25
FAILED = {7, 33, 58}  # which seeded rows (1-based) failed; every tenth is pending


def api_call(page: Any, method: str, path: str, body: Any = None) -> Any:
    """Call the API with the signed-in page's key, as the dashboard does."""
    answer = page.evaluate(
        """async ([method, path, body]) => {
            const headers = {'Authorization': 'Bearer ' + sessionStorage.getItem('galvani.apiKey')};
            if (body !== null) headers['Content-Type'] = 'application/json';
            const r = await fetch(path, {method, headers,
                body: body === null ? undefined : JSON.stringify(body)});
            return {status: r.status, body: await r.json()};
        }""",
        [method, path, body],
    )
    assert answer["status"] < 300, answer
    return answer["body"]


def seed_alert(conn: psycopg.Connection[Any], device_id: str, text: str) -> int:
    conn.execute(
        "INSERT INTO devices (id, brand_id, model) VALUES (%s, 'acme', 'glow-2')", (device_id,)
    )
    explanation = {
        "threshold": {},
        "observed": {},
        "window": {},
        "action": "alert",
        "text": text,
    }
    row = conn.execute(
        "INSERT INTO alerts (brand_id, device_id, rule, rule_version, severity, first_seen,"
        " last_seen, explanation, count) VALUES ('acme', %s, 'no_contact', 1, 'warning',"
        " now() - interval '5 minutes', now(), %s, 3) RETURNING id",
        (device_id, json.dumps(explanation)),
    ).fetchone()
    assert row is not None
    return int(row[0])


def seed_deliveries(conn: psycopg.Connection[Any], channel_id: int, alert_id: int) -> None:
    """SEEDED notifications to the channel a second apart, oldest first: delivered (in 150 ms),
    pending (every tenth) or failed (FAILED, with a hostile error text)."""
    for n in range(1, SEEDED + 1):
        status = "failed" if n in FAILED else "pending" if n % 10 == 0 else "delivered"
        conn.execute(
            "INSERT INTO notifications (channel_id, brand_id, alert_id, transition, alert_change,"
            " idempotency_key, payload, status, attempts, last_error, last_status_code,"
            " created_at, delivered_at)"
            " SELECT %(channel)s, 'acme', %(alert)s, 'count_raised', %(n)s, %(key)s, '{}',"
            "  %(status)s, %(attempts)s, %(error)s, %(code)s, t.created,"
            "  CASE WHEN %(status)s = 'delivered' THEN t.created + interval '150 ms' END"
            " FROM (SELECT now() - make_interval(secs => %(ago)s) AS created) t",
            {
                "channel": channel_id,
                "alert": alert_id,
                "n": n,
                "key": f"ntf_{channel_id}_{alert_id}_count_raised_{n}",
                "status": status,
                "attempts": 12 if status == "failed" else 1,
                "error": HOSTILE_ERROR if status == "failed" else None,
                "code": 502 if status == "failed" else 200 if status == "delivered" else None,
                "ago": SEEDED - n + 1,
            },
        )


def insert_channel(conn: psycopg.Connection[Any], brand: str, name: str) -> int:
    """A channel written directly (its secret is never read here: no dispatcher runs)."""
    row = conn.execute(
        "INSERT INTO notification_channels (brand_id, name, kind, url, secret_ciphertext)"
        " VALUES (%s, %s, 'webhook', %s, 'not read') RETURNING id",
        (brand, name, PUBLIC_URL),
    ).fetchone()
    assert row is not None
    return int(row[0])


def key_of(row: Any) -> str:
    return str(row.locator("code.key").inner_text())


def newest_key(channel_id: int, alert_id: int, n: int) -> str:
    return f"ntf_{channel_id}_{alert_id}_count_raised_{n}"


@pytest.fixture
def alert_id(database_url: str) -> int:
    """An alert made before any channel exists, so the outbox trigger queues nothing for it."""
    with psycopg.connect(database_url) as conn:
        return seed_alert(conn, "ntf-0001", "Dry electrodes for 10 s.")


def test_an_admin_reads_a_channels_delivery_log_pages_it_filters_it_and_sends_a_test(
    api_url: str, browser: Any, keys: dict[str, str], database_url: str, alert_id: int
) -> None:
    errors: list[str] = []
    page = open_page(browser, api_url, errors)
    sign_in(page, keys["admin"])
    on_call = api_call(
        page,
        "POST",
        "/v1/notification-channels",
        {
            "name": "on-call",
            "kind": "webhook",
            "url": PUBLIC_URL,
            "rules": ["no_contact", "battery_overtemp"],
            "min_severity": "warning",
            "models": ["glow-2"],
            "transitions": ["opened", "resolved"],
        },
    )
    audit = api_call(
        page,
        "POST",
        "/v1/notification-channels",
        {"name": "audit", "kind": "webhook", "url": PUBLIC_URL + "/audit"},
    )
    with psycopg.connect(database_url) as conn:
        seed_deliveries(conn, on_call["id"], alert_id)

    page.get_by_role("link", name="Notifications").click()
    page.get_by_role("heading", name="Notifications").wait_for()
    channels = page.locator("#channels tbody tr[data-channel-id]")
    channels.nth(1).wait_for()
    assert channels.count() == 2
    listed = page.locator(f"#channel-{on_call['id']}").inner_text()
    for part in ("on-call", "webhook", PUBLIC_URL, "no_contact, battery_overtemp"):
        assert part in listed
    for part in ("severity ≥ warning", "models: glow-2", "on: opened, resolved"):
        assert part in listed
    assert "every rule" in page.locator(f"#channel-{audit['id']}").inner_text()

    # With no channel named in the link, the first is shown.
    page.get_by_role("heading", name="Deliveries to on-call").wait_for()
    assert page.get_by_role("link", name="on-call").get_attribute("aria-current") == "true"
    rows = page.locator("#deliveries tbody tr[data-delivery-id]")
    rows.first.wait_for()
    assert rows.count() == 25
    assert key_of(rows.first) == newest_key(on_call["id"], alert_id, SEEDED)

    # A receiver's error text is shown as the text it is, never parsed as markup.
    failed = page.locator("#deliveries tbody tr[data-status='failed']")
    assert failed.count() == 1  # row 58; 33 and 7 are on later pages
    assert failed.locator(".last-error").inner_text() == HOSTILE_ERROR
    assert "HTTP 502" in failed.inner_text()
    assert failed.locator(".status").inner_text() == "failed"
    assert page.locator("#main img, #main b").count() == 0
    assert page.evaluate("window.__pwned") is None
    pending = page.locator("#deliveries tbody tr[data-status='pending']").first
    assert pending.locator(".status").inner_text() == "pending"
    assert "next attempt" in pending.inner_text()
    delivered = page.locator("#deliveries tbody tr[data-status='delivered']").first
    assert "150 ms" in delivered.inner_text()
    assert "HTTP 200" in delivered.inner_text()
    # Failed and pending rows are told apart by more than their word.
    colours = page.evaluate(
        """() => ['failed', 'pending', 'delivered'].map((s) => getComputedStyle(
            document.querySelector(`#deliveries tr[data-status='${s}'] td`)).backgroundColor)"""
    )
    assert len(set(colours)) == 3, colours
    page.screenshot(path=ARTIFACTS / "notifications.png", full_page=True)

    more = page.get_by_role("button", name="Load more")
    more.click()
    rows.nth(49).wait_for()
    more.click()
    rows.nth(SEEDED - 1).wait_for()
    assert more.is_hidden()
    keys_shown = [key_of(rows.nth(i)) for i in range(rows.count())]
    expected = [newest_key(on_call["id"], alert_id, n) for n in range(SEEDED, 0, -1)]
    assert keys_shown == expected  # every row once, newest first
    assert failed.count() == len(FAILED)

    page.get_by_role("button", name="Send a test notification to on-call").click()
    notice = page.locator("#test-result .notice")
    notice.wait_for()
    assert "Test notification queued (pending)" in notice.inner_text()
    shown_key = notice.locator("code").inner_text()
    with psycopg.connect(database_url) as conn:
        queued = conn.execute(
            "SELECT idempotency_key, status, alert_id, payload->>'event' FROM notifications"
            " WHERE channel_id = %s AND transition = 'test'",
            (on_call["id"],),
        ).fetchall()
    assert queued == [(shown_key, "pending", None, "test")]
    top = rows.first
    page.wait_for_function(
        "(key) => document.querySelector('#deliveries tbody tr code.key').textContent === key",
        arg=shown_key,
    )
    assert "test notification" in top.inner_text()

    page.get_by_role("link", name="audit").click()
    page.get_by_role("heading", name="Deliveries to audit").wait_for()
    page.get_by_text("Nothing sent to this channel yet.").wait_for()
    page.get_by_role("link", name="on-call").click()
    page.get_by_role("heading", name="Deliveries to on-call").wait_for()
    rows.first.wait_for()
    page.get_by_label("Status").select_option("failed")
    page.wait_for_function(
        "() => { const rows = document.querySelectorAll('#deliveries tbody tr[data-status]');"
        " return rows.length === 3 && [...rows].every((r) => r.dataset.status === 'failed'); }"
    )
    assert "status=failed" in page.evaluate("location.hash")

    # The alert a delivery names is one click away.
    page.get_by_role("link", name=f"alert {alert_id}").first.click()
    page.get_by_role("heading", name=f"Alert {alert_id}").wait_for()
    assert errors == []


def test_a_viewer_reads_channels_and_deliveries_but_cannot_send_a_test(
    api_url: str, browser: Any, keys: dict[str, str], database_url: str, alert_id: int
) -> None:
    with psycopg.connect(database_url) as conn:
        channel = insert_channel(conn, "acme", "pager")
        other = insert_channel(conn, "other", "not ours")
        seed_deliveries(conn, channel, alert_id)
    errors: list[str] = []
    page = open_page(browser, api_url, errors)
    sign_in(page, keys["viewer"])
    page.get_by_role("link", name="Notifications").click()
    page.get_by_role("heading", name="Deliveries to pager").wait_for()  # the first is selected
    assert page.locator("#channels tbody tr[data-channel-id]").count() == 1
    assert "not ours" not in page.locator("#main").inner_text()
    # Another brand's channel by id: said so, and the brand's own shown instead.
    page.evaluate("(id) => { location.hash = '#/notifications?channel=' + id; }", other)
    page.locator("#unknown-channel").wait_for()
    assert f"no channel {other}" in page.locator("#unknown-channel").inner_text()
    page.get_by_role("heading", name="Deliveries to pager").wait_for()
    page.locator("#deliveries tbody tr[data-delivery-id]").first.wait_for()
    assert page.get_by_role("button", name="Send test").count() == 0
    assert page.locator("#send-test").count() == 0
    assert errors == []


def test_a_notifications_alert_link_shows_the_alert_after_sign_in_and_an_unknown_id_says_so(
    api_url: str, browser: Any, keys: dict[str, str], database_url: str, alert_id: int
) -> None:
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "INSERT INTO devices (id, brand_id, model) VALUES ('ntf-other', 'other', 'glow-2')"
        )
        other = conn.execute(
            "INSERT INTO alerts (brand_id, device_id, rule, rule_version, severity, first_seen,"
            " last_seen, explanation) VALUES ('other', 'ntf-other', 'no_contact', 1, 'warning',"
            ' now(), now(), \'{"threshold": {}, "observed": {}, "window": {},'
            ' "action": "alert", "text": "not yours"}\') RETURNING id'
        ).fetchone()
    assert other is not None
    errors: list[str] = []
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    # The link an e-mail carries, opened in a fresh tab: sign in first, then the alert.
    page.goto(f"{api_url}/dashboard/#/alerts/{alert_id}")
    page.get_by_label("API key").fill(keys["support"])
    page.get_by_role("button", name="Sign in").click()
    page.get_by_role("heading", name=f"Alert {alert_id}").wait_for()
    shown = page.locator("#alert").inner_text()
    for part in (
        "no_contact (v1)",
        "severity\nWARNING",
        "Dry electrodes for 10 s.",
        "state\nopen",
        "count\n3",
    ):
        assert part in shown
    assert page.get_by_role("link", name="ntf-0001").get_attribute("href") == "#/devices/ntf-0001"
    assert page.locator("nav a[aria-current='page']").inner_text() == "Alerts"
    page.screenshot(path=ARTIFACTS / "alert.png", full_page=True)

    page.get_by_role("button", name=f"Acknowledge alert {alert_id}").click()
    page.wait_for_function(
        "() => document.querySelector('#alert-state').textContent.startsWith('acknowledged')"
    )
    assert "by api-key:" in page.locator("#alert-state").inner_text()
    assert page.get_by_role("button", name=f"Acknowledge alert {alert_id}").count() == 0
    assert "acknowledged" in page.locator("#alert-transitions").inner_text()
    with psycopg.connect(database_url) as conn:
        state = conn.execute("SELECT state FROM alerts WHERE id = %s", (alert_id,)).fetchone()
    assert state == ("acknowledged",)

    for unknown in (str(other[0]), "999999999", "99999999999999999999", "not-an-id"):
        page.evaluate("(hash) => { location.hash = hash; }", f"#/alerts/{unknown}")
        page.get_by_role("heading", name="Alert not found").wait_for()
        assert unknown in page.locator("#alert-not-found").inner_text()
        page.evaluate("() => { location.hash = '#/'; }")
        page.get_by_role("heading", name="Fleet overview").wait_for()
    # Only the unknown ids' answers fail to load (404; 422 past the largest id).
    assert [e for e in errors if "status of 404" not in e and "status of 422" not in e] == []


@pytest.fixture
def permissive_api(broker_api_settings: ApiSettings) -> Iterator[tuple[str, ApiSettings]]:
    """The API with private and plain-http targets allowed, so a channel can point at a
    receiver on this machine; and its settings (the dispatcher shares its secret key file)."""
    settings = broker_api_settings.model_copy(
        update={"notify_allow_private_targets": True, "notify_allow_http_targets": True}
    )
    with serving(create_app(settings)) as (host, port):
        yield f"http://{host}:{port}", settings


def test_send_test_shows_the_failed_attempts_then_the_delivery_by_the_real_dispatcher(
    permissive_api: tuple[str, ApiSettings],
    browser: Any,
    keys: dict[str, str],
    database_url: str,
    rules_database_url: str,
    notify_database_url: str,
    tmp_path: Path,
) -> None:
    url, settings = permissive_api
    receiver = Receiver("not yet known")
    receiver.start()
    dispatcher = None
    errors: list[str] = []
    try:
        page = open_page(browser, url, errors)
        sign_in(page, keys["admin"])
        made = api_call(
            page,
            "POST",
            "/v1/notification-channels",
            {"name": "local", "kind": "webhook", "url": receiver.url},
        )
        receiver.secret = made["secret"].encode()
        setup = Setup(
            database_url,
            rules_database_url,
            notify_database_url,
            settings.notify_secret_key_path(),
            tmp_path,
            "",
        )
        dispatcher = Dispatcher(setup, "notify")
        page.get_by_role("link", name="Notifications").click()
        page.get_by_role("heading", name="Deliveries to local").wait_for()
        page.get_by_text("Nothing sent to this channel yet.").wait_for()

        receiver.fail_until = time.monotonic() + RECEIVER_DOWN_S
        page.get_by_role("button", name="Send a test notification to local").click()
        result = page.locator("#test-result")
        result.get_by_text("Test notification queued (pending)").wait_for()
        result.get_by_text("Test notification not delivered yet").wait_for(timeout=15_000)
        assert "500" in result.inner_text()
        assert page.locator("#deliveries tbody tr[data-status='pending']").count() == 1
        result.get_by_text("Test notification delivered in").wait_for(timeout=30_000)
        row = page.locator("#deliveries tbody tr[data-status='delivered']")
        assert row.count() == 1
        assert "HTTP 200" in row.inner_text()
        page.screenshot(path=ARTIFACTS / "notifications-test-sent.png", full_page=True)
    finally:
        if dispatcher is not None:
            dispatcher.stop()
        receiver.stop()
    got = receiver.snapshot()
    assert receiver.bad_signatures == 0
    assert receiver.answered_500 >= 1
    assert {r.key for r in got} == {key_of(row)}
    assert errors == []


def test_channels_of_every_kind_show_their_target_and_quiet_hours_and_a_held_delivery(
    api_url: str, browser: Any, keys: dict[str, str], database_url: str
) -> None:
    with psycopg.connect(database_url) as conn:
        # A quiet window around now, so the outbox trigger holds the warning for the e-mail.
        start, end = conn.execute(
            "SELECT to_char(now() AT TIME ZONE 'UTC' - interval '1 hour', 'HH24:MI'),"
            " to_char(now() AT TIME ZONE 'UTC' + interval '1 hour', 'HH24:MI')"
        ).fetchone() or ("", "")
        conn.execute(
            "INSERT INTO notification_channels (brand_id, name, kind, url, secret_ciphertext,"
            " recipients, min_severity, quiet_hours_start, quiet_hours_end, quiet_hours_time_zone)"
            " VALUES ('acme', 'support chat', 'slack', 'https://hooks.slack.com/services/T0/…',"
            "  'not read', NULL, 'info', NULL, NULL, NULL),"
            " ('acme', 'pager', 'pagerduty', 'https://events.pagerduty.com/v2/enqueue',"
            "  'not read', NULL, 'critical', NULL, NULL, NULL),"
            " ('acme', 'ops mail', 'email', NULL, NULL, '{ops@example.com,lead@example.com}',"
            "  'info', %s::time, %s::time, 'UTC')",
            (start, end),
        )
        alert = seed_alert(conn, "ntf-0002", "Dry electrodes for 10 s.")
        held = conn.execute(
            "SELECT n.held_until IS NOT NULL FROM notifications n"
            " JOIN notification_channels c ON c.id = n.channel_id WHERE c.name = 'ops mail'"
        ).fetchall()
    assert held == [(True,)]
    errors: list[str] = []
    page = open_page(browser, api_url, errors)
    sign_in(page, keys["support"])
    page.get_by_role("link", name="Notifications").click()
    page.get_by_role("heading", name="Deliveries to support chat").wait_for()
    kinds = page.locator("#channels tbody tr[data-kind]")
    assert [kinds.nth(i).get_attribute("data-kind") for i in range(3)] == [
        "slack",
        "pagerduty",
        "email",
    ]
    slack = kinds.nth(0).inner_text()
    assert "https://hooks.slack.com/services/T0/…" in slack
    assert "masked" in slack
    assert "severity ≥ critical" in kinds.nth(1).inner_text()
    email = kinds.nth(2).inner_text()
    assert "ops@example.com, lead@example.com" in email
    assert f"quiet hours {start}\u2013{end} UTC (critical never held)" in email
    # The slack channel got the warning at once: pending, not held.
    first = page.locator("#deliveries tbody tr[data-status='pending']")
    first.wait_for()
    assert "held until" not in first.inner_text()

    page.get_by_role("link", name="ops mail").click()
    page.get_by_role("heading", name="Deliveries to ops mail").wait_for()
    row = page.locator("#deliveries tbody tr[data-delivery-id]")
    row.wait_for()
    assert row.count() == 1
    assert "held until" in row.inner_text()
    assert "(quiet hours)" in row.inner_text()
    assert row.get_by_role("link", name=f"alert {alert}").count() == 1
    page.screenshot(path=ARTIFACTS / "notifications-kinds.png", full_page=True)
    assert errors == []
