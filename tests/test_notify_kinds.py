"""Slack and PagerDuty channels (services/notify/slack.py, pagerduty.py) and the dashboard link.

The pure tests render a notification and check its limits and escaping; the others run the
dispatcher (a child process, as in test_notify_dispatcher.py) against the real database and a
real local HTTP server standing in for Slack's and PagerDuty's endpoints, and check each
request it gets against a JSON Schema written from the vendor's documentation
(tests/schemas/, each citing its pages).
"""

import http.client
import json
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema_rs
import psycopg
import pytest

from services.common.secret_box import SecretBox
from services.notify import messages, pagerduty, slack
from services.notify.messages import ELLIPSIS, Notice
from tests import test_notify_dispatcher
from tests.notify_receiver import Receiver
from tests.test_notify_dispatcher import (
    DEVICE,
    Dispatcher,
    Setup,
    add_channel,
    all_settled,
    open_alerts,
    outbox,
    resolve,
    wait_for,
)

# The dispatcher tests' fixtures, used here by name.
setup = test_notify_dispatcher.setup
dispatchers = test_notify_dispatcher.dispatchers

SCHEMAS = Path(__file__).parent / "schemas"
DASHBOARD = "https://galvani.example.com/dashboard/"


def validator(name: str) -> Any:
    schema = json.loads((SCHEMAS / f"{name}.json").read_text())
    return jsonschema_rs.validator_for(schema, validate_formats=True)


SLACK = validator("slack_incoming_webhook")
PAGERDUTY = validator("pagerduty_event_v2")


def schema_errors(schema: Any, instance: object) -> list[str]:
    return [f"{list(e.instance_path)}: {e.message}" for e in schema.iter_errors(instance)]


def notice(base: str | None = DASHBOARD, **changes: Any) -> Notice:
    payload: dict[str, Any] = {
        "v": 1,
        "idempotency_key": "ntf_3_41_opened_7",
        "event": "alert.opened",
        "occurred_at": "2026-12-06T05:00:00.000000Z",
        "brand": "acme",
        "alert": {
            "id": 41,
            "device_id": "acme-1",
            "model": "m1",
            "rule": "overheat",
            "rule_version": 2,
            "severity": "critical",
            "state": "open",
            "count": 1,
            "first_seen": "2026-12-06T04:59:58.000000Z",
            "last_seen": "2026-12-06T04:59:59.000000Z",
            "explanation": {"text": "Skin contact at 44 °C for 3 s; output stopped.", "v": 1},
        },
        "dashboard_url": None,
    }
    alert = payload["alert"]
    for key, value in changes.items():
        if key in ("event", "brand"):
            payload[key] = value
        else:
            alert[key] = value
    return messages.read(payload, base)


# Pure rendering.


def test_slack_message_has_fields_explanation_times_and_dashboard_button() -> None:
    message = slack.message(notice())
    assert schema_errors(SLACK, message) == []
    header, fields, explanation, context, actions = message["blocks"]
    assert header["text"]["text"] == "critical: overheat on acme-1 (opened)"
    texts = [f["text"] for f in fields["fields"]]
    assert texts == [
        "*Device*\nacme-1",
        "*Model*\nm1",
        "*Rule*\noverheat",
        "*Severity*\ncritical",
        "*State*\nopen",
        "*Count*\n1",
    ]
    assert explanation["text"]["text"] == "Skin contact at 44 °C for 3 s; output stopped."
    assert "2026-12-06T04:59:58.000000Z" in context["elements"][0]["text"]
    assert actions["elements"][0]["url"] == f"{DASHBOARD}#/alerts/41"
    assert message["text"] == "critical: overheat on acme-1 (opened)"


def test_slack_escapes_mentions_and_links_a_device_or_explanation_could_carry() -> None:
    message = slack.message(
        notice(device_id="<!channel>", explanation={"text": "see <https://evil.example|here> & go"})
    )
    dumped = json.dumps(message["blocks"][1:], ensure_ascii=False)
    assert "<!channel>" not in dumped
    assert "&lt;!channel&gt;" in dumped
    assert "see &lt;https://evil.example|here&gt; &amp; go" in dumped
    assert "<" not in message["text"]
    # The header is plain_text: Slack shows it as written, parsing nothing.
    assert message["blocks"][0]["text"] == {
        "type": "plain_text",
        "text": "critical: overheat on <!channel> (opened)",
    }


def test_slack_truncates_each_text_to_its_limit_without_cutting_an_escape() -> None:
    long_rule = "r" * 400
    explanation = "<" * 2000 + "tail"  # 8,000 characters once escaped
    message = slack.message(
        notice(rule=long_rule, device_id="d" * 5000, explanation={"text": explanation})
    )
    assert schema_errors(SLACK, message) == []
    header, fields, section, _, _ = message["blocks"]
    assert len(header["text"]["text"]) == slack.HEADER_CHARS
    assert header["text"]["text"].endswith(ELLIPSIS)
    assert all(len(f["text"]) <= slack.FIELD_CHARS for f in fields["fields"])
    text = section["text"]["text"]
    assert len(text) <= slack.SECTION_CHARS
    assert text.endswith("&lt;" + ELLIPSIS)
    assert text.replace("&lt;", "") == ELLIPSIS


@pytest.mark.parametrize("limit", range(1, 12))
def test_escape_within_keeps_whole_entities_at_every_limit(limit: int) -> None:
    cut = slack.escape_within("a<b&c>d", limit)
    assert len(cut) <= limit
    assert cut.removesuffix(ELLIPSIS) in "a&lt;b&amp;c&gt;d"
    body = cut.removesuffix(ELLIPSIS)
    assert "&" not in body or body.count("&") == body.count(";")


def test_a_message_over_slacks_limits_is_refused_by_the_schema() -> None:
    message = slack.message(notice())
    message["blocks"][0]["text"]["text"] = "x" * 151
    assert schema_errors(SLACK, message)
    message = slack.message(notice())
    message["blocks"][1]["fields"] *= 2  # 12 fields
    assert schema_errors(SLACK, message)


def test_pagerduty_events_map_transitions_to_actions_with_one_dedup_key_per_alert() -> None:
    key = "k" * 32
    opened = pagerduty.event(notice(), key, DASHBOARD)
    raised = pagerduty.event(notice(event="alert.count_raised", count=2), key, DASHBOARD)
    acknowledged = pagerduty.event(notice(event="alert.acknowledged"), key, DASHBOARD)
    resolved = pagerduty.event(notice(event="alert.resolved"), key, DASHBOARD)
    for event in (opened, raised, acknowledged, resolved):
        assert schema_errors(PAGERDUTY, event) == []
        assert event["dedup_key"] == "galvani:acme:alert:41"
    assert [e["event_action"] for e in (opened, raised, acknowledged, resolved)] == [
        "trigger",
        "trigger",
        "acknowledge",
        "resolve",
    ]
    assert set(acknowledged) == set(resolved) == {"routing_key", "event_action", "dedup_key"}
    payload = opened["payload"]
    assert payload["summary"] == "critical: overheat on acme-1 (opened)"
    assert raised["payload"]["summary"] == "critical: overheat on acme-1 (count raised to 2)"
    assert (payload["source"], payload["severity"], payload["class"]) == (
        "acme-1",
        "critical",
        "overheat",
    )
    assert (payload["component"], payload["group"]) == ("m1", "acme")
    assert payload["custom_details"]["explanation"].startswith("Skin contact")
    assert opened["links"] == [{"href": f"{DASHBOARD}#/alerts/41", "text": "Alert 41 in Galvani"}]
    assert opened["client_url"] == DASHBOARD


def test_pagerduty_summary_is_cut_to_1024_and_a_test_has_a_dedup_key_of_its_own() -> None:
    event = pagerduty.event(notice(None, rule="r" * 2000), "k" * 32, None)
    assert schema_errors(PAGERDUTY, event) == []
    assert len(event["payload"]["summary"]) == pagerduty.SUMMARY_CHARS
    assert "links" not in event
    test = messages.read(
        {"event": "test", "idempotency_key": "ntf_3_0_test_0", "brand": "acme", "alert": None},
        DASHBOARD,
    )
    event = pagerduty.event(test, "k" * 32, DASHBOARD)
    assert schema_errors(PAGERDUTY, event) == []
    assert event["event_action"] == "trigger"
    assert event["dedup_key"] == "galvani:acme:test:ntf_3_0_test_0"


def test_pagerduty_schema_refuses_a_trigger_without_payload_and_an_unknown_severity() -> None:
    event = pagerduty.event(notice(), "k" * 32, None)
    assert schema_errors(PAGERDUTY, {k: v for k, v in event.items() if k != "payload"})
    event["payload"]["severity"] = "fatal"
    assert schema_errors(PAGERDUTY, event)


def test_webhook_dashboard_url_is_filled_the_same_way_every_time() -> None:
    body = json.dumps({"v": 1, "alert": {"id": 41}, "dashboard_url": None}).encode()
    filled = messages.with_dashboard_url(body, DASHBOARD)
    assert json.loads(filled)["dashboard_url"] == f"{DASHBOARD}#/alerts/41"
    assert messages.with_dashboard_url(body, DASHBOARD) == filled
    assert messages.with_dashboard_url(body, None) is body
    test = json.dumps({"v": 1, "event": "test", "alert": None, "dashboard_url": None}).encode()
    assert messages.with_dashboard_url(test, DASHBOARD) is test
    # A number JSON allows but a float cannot hold: sent as stored rather than as "Infinity".
    huge = b'{"v": 1, "alert": {"id": 41, "observed": 1e400}, "dashboard_url": null}'
    assert messages.with_dashboard_url(huge, DASHBOARD) is huge


# Through the dispatcher.


@pytest.fixture
def endpoint() -> Iterator[Receiver]:
    """An unsigned JSON endpoint answering 202, as PagerDuty does (Slack's 200 is as good)."""
    server = Receiver(None, ok_status=202)
    server.start()
    yield server
    server.stop()


def add_kind_channel(setup: Setup, kind: str, url: str, secret: str) -> int:
    box = SecretBox.from_file(setup.key_file)
    with psycopg.connect(setup.database_url) as conn:
        row = conn.execute(
            "INSERT INTO notification_channels (brand_id, name, kind, url, secret_ciphertext)"
            " VALUES ('acme', %s, %s, %s, %s) RETURNING id",
            [f"{kind} on-call", kind, url, box.encrypt(secret)],
        ).fetchone()
    assert row is not None
    return int(str(row[0]))


def acknowledge(setup: Setup, alert_ids: list[int]) -> None:
    with psycopg.connect(setup.rules_url) as conn:
        conn.execute(
            "UPDATE alerts SET state = 'acknowledged', acknowledged_at = now(),"
            " acknowledged_by = 'ana', updated_at = now() WHERE id = ANY(%s)",
            [alert_ids],
        )


def test_slack_channel_posts_blocks_to_the_secret_url_with_the_dashboard_link(
    setup: Setup, endpoint: Receiver, dispatchers: Callable[..., Dispatcher]
) -> None:
    # The url column is only the masked display form; the real URL is the secret.
    add_kind_channel(setup, "slack", "https://hooks.slack.com/services/…", endpoint.url_for("/s"))
    dispatchers(dashboard_url=DASHBOARD)
    [alert] = open_alerts(setup, ["overheat"])
    wait_for(all_settled(setup), 20, "the Slack message delivered")
    [got] = endpoint.snapshot()
    [row] = outbox(setup)
    assert got.path == "/s"
    assert got.key == row["idempotency_key"]
    assert schema_errors(SLACK, got.payload) == []
    assert got.payload["text"] == f"critical: overheat on {DEVICE} (opened)"
    [button] = got.payload["blocks"][-1]["elements"]
    assert button["url"] == f"{DASHBOARD}#/alerts/{alert}"
    assert row["last_status_code"] == 202


def test_pagerduty_channel_gets_trigger_acknowledge_resolve_of_one_alert_in_order(
    setup: Setup, endpoint: Receiver, dispatchers: Callable[..., Dispatcher]
) -> None:
    routing_key = secrets.token_hex(16)
    add_kind_channel(setup, "pagerduty", endpoint.url_for("/v2/enqueue"), routing_key)
    dispatchers(dashboard_url=DASHBOARD)
    [alert] = open_alerts(setup, ["overheat"])
    acknowledge(setup, [alert])
    resolve(setup, [alert])
    wait_for(lambda: len(outbox(setup)) == 3 and all_settled(setup)(), 30, "three delivered")
    received = endpoint.snapshot()
    assert [r.payload["event_action"] for r in received] == ["trigger", "acknowledge", "resolve"]
    assert {r.payload["dedup_key"] for r in received} == {f"galvani:acme:alert:{alert}"}
    assert {r.payload["routing_key"] for r in received} == {routing_key}
    assert {r.path for r in received} == {"/v2/enqueue"}
    for item in received:
        assert schema_errors(PAGERDUTY, item.payload) == []
    assert received[0].payload["payload"]["severity"] == "critical"
    assert received[0].payload["links"][0]["href"] == f"{DASHBOARD}#/alerts/{alert}"
    rows = outbox(setup)
    assert [r["idempotency_key"] for r in rows] == [r.key for r in received]
    assert {r["last_status_code"] for r in rows} == {202}


def test_pagerduty_400_fails_the_notification_at_once(
    setup: Setup, endpoint: Receiver, dispatchers: Callable[..., Dispatcher]
) -> None:
    add_kind_channel(setup, "pagerduty", endpoint.url_for("/v2/enqueue"), secrets.token_hex(16))
    endpoint.fail_always = True
    endpoint.fail_status = 400
    dispatchers()
    open_alerts(setup, ["overheat"])
    wait_for(all_settled(setup, "failed"), 20, "the notification failed")
    [row] = outbox(setup)
    # Failed on its first attempt, long before the give-up time (24 h).
    assert row["attempts"] == 1
    assert row["last_status_code"] == 400
    assert str(row["last_error"]).startswith("HTTP 400")


def test_pagerduty_429_is_retried_until_accepted(
    setup: Setup, endpoint: Receiver, dispatchers: Callable[..., Dispatcher]
) -> None:
    add_kind_channel(setup, "pagerduty", endpoint.url_for("/v2/enqueue"), secrets.token_hex(16))
    endpoint.fail_always = True
    endpoint.fail_status = 429
    dispatchers()
    open_alerts(setup, ["overheat"])
    wait_for(lambda: any(int(str(r["attempts"])) >= 2 for r in outbox(setup)), 20, "a retry")
    [row] = outbox(setup)
    assert row["status"] == "pending"
    assert row["last_status_code"] == 429
    endpoint.fail_always = False
    wait_for(all_settled(setup), 20, "the event accepted")
    assert len(endpoint.snapshot()) == 1


def test_webhook_payload_carries_the_dashboard_url_when_set(
    setup: Setup, dispatchers: Callable[..., Dispatcher]
) -> None:
    receiver = Receiver(setup.secret)
    receiver.start()
    try:
        add_channel(setup, receiver.url)
        dispatchers(dashboard_url=DASHBOARD)
        [alert] = open_alerts(setup, ["overheat"])
        wait_for(all_settled(setup), 20, "the webhook delivered")
        [got] = receiver.snapshot()
    finally:
        receiver.stop()
    assert receiver.bad_signatures == 0
    assert got.payload["dashboard_url"] == f"{DASHBOARD}#/alerts/{alert}"


def test_stopped_receiver_answers_nothing_more_on_a_kept_alive_connection() -> None:
    """The outage tests stop the receiver while the dispatcher may hold kept-alive
    connections to it (http_post): those must go quiet too."""
    receiver = Receiver(None)
    receiver.start()
    connection = http.client.HTTPConnection("127.0.0.1", receiver.port, timeout=2)
    try:
        connection.request("POST", "/x", body=b"{}", headers={"Content-Type": "application/json"})
        first = connection.getresponse()
        first.read()
        assert first.status == 200
        receiver.stop()

        def post_again() -> None:
            connection.request("POST", "/x", body=b"{}")
            connection.getresponse()

        with pytest.raises((OSError, http.client.HTTPException)):
            post_again()
    finally:
        connection.close()
        receiver.stop()
    assert [r.path for r in receiver.snapshot()] == ["/x"]
    assert receiver.max_in_progress == {"/x": 1}


@pytest.mark.parametrize("kind", ["webhook", "slack", "pagerduty"])
def test_loopback_targets_of_every_http_kind_are_refused_at_send_time(
    kind: str, setup: Setup, endpoint: Receiver, dispatchers: Callable[..., Dispatcher]
) -> None:
    # The API checked the target at creation; a name can resolve elsewhere later, so the
    # dispatcher checks again: without the operator's switch, loopback gets nothing (every
    # other test here runs with it on and is delivered).
    if kind == "webhook":
        add_channel(setup, endpoint.url)
    elif kind == "slack":
        add_kind_channel(setup, kind, "https://hooks.slack.com/services/…", endpoint.url_for("/s"))
    else:
        add_kind_channel(setup, kind, endpoint.url_for("/v2/enqueue"), secrets.token_hex(16))
    dispatchers(allow_private_targets="0")
    open_alerts(setup, ["overheat"])
    wait_for(lambda: any(r["last_error"] for r in outbox(setup)), 10, "the attempt recorded")
    [row] = outbox(setup)
    assert row["status"] == "pending"
    assert "refused target" in str(row["last_error"])
    assert endpoint.snapshot() == []
