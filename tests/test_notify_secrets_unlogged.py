"""Issue 21: a channel's credentials are never logged. The dispatcher runs at DEBUG with a
channel of every kind failing (a webhook answering 500, Slack and PagerDuty answering 400, an
SMTP server that is not there), and its whole log is searched for the webhook's signing secret,
the Slack URL's token, the PagerDuty routing key and the SMTP password."""

import secrets
import time
from collections.abc import Callable, Iterator

import pytest

from deploy.stack.ports import free_port
from tests.notify_receiver import Receiver
from tests.test_notify_dispatcher import (  # noqa: F401 - dispatchers, receiver, setup: fixtures
    Dispatcher,
    Setup,
    add_channel,
    dispatchers,
    open_alerts,
    outbox,
    receiver,
    setup,
    wait_for,
)
from tests.test_notify_email import add_email_channel
from tests.test_notify_kinds import add_kind_channel

SMTP_PASSWORD = "smtp-" + secrets.token_hex(12)


@pytest.fixture
def refusing() -> Iterator[Receiver]:
    """An unsigned endpoint that refuses everything as invalid (Slack's and PagerDuty's 400)."""
    server = Receiver(None)
    server.fail_always = True
    server.fail_status = 400
    server.start()
    yield server
    server.stop()


def test_no_channel_credential_reaches_the_dispatchers_log(
    setup: Setup,  # noqa: F811
    receiver: Receiver,  # noqa: F811
    refusing: Receiver,
    dispatchers: Callable[..., Dispatcher],  # noqa: F811
) -> None:
    slack_token = secrets.token_urlsafe(18)
    routing_key = secrets.token_hex(16)
    receiver.fail_always = True
    add_channel(setup, receiver.url)
    add_kind_channel(
        setup,
        "slack",
        "https://hooks.slack.com/services/…",
        refusing.url_for(f"/T1/B1/{slack_token}"),
    )
    add_kind_channel(setup, "pagerduty", refusing.url_for("/v2/enqueue"), routing_key)
    add_email_channel(setup, ["oncall@acme.example"])
    dispatcher = dispatchers(
        log_level="DEBUG",
        smtp_host="127.0.0.1",
        smtp_port=str(free_port()),
        smtp_from="galvani@acme.example",
        smtp_username="galvani",
        smtp_password=SMTP_PASSWORD,
    )
    open_alerts(setup, ["overheat"])

    def every_channel_tried() -> bool:
        # One notification per channel (the trigger writes them in channel order).
        rows = outbox(setup)
        return len(rows) == 4 and all(r["last_error"] for r in rows)

    wait_for(every_channel_tried, 20, "an attempt recorded on every channel")
    time.sleep(1.0)  # a retry or two more of the webhook and the e-mail
    dispatcher.stop()
    log = dispatcher.log.read_text()
    # The refusals were logged (so the search below reads real error lines) ...
    assert "failed after 1 attempts" in log
    assert "HTTP 400" in log
    # ... and no credential is in them, nor anywhere else in the log.
    for credential in (setup.secret, slack_token, routing_key, SMTP_PASSWORD):
        assert credential not in log
