"""E-mail channels (services/notify/smtp.py) against a real SMTP server in the test process.

The server is aiosmtpd, speaking STARTTLS with a certificate of the suite's development PKI
(deploy/stack/pki.py, for localhost) and requiring AUTH after it; the dispatcher runs as its
own process (test_notify_dispatcher.py's helpers) and trusts that CA through
GALVANI_NOTIFY_SMTP_CA_FILE, as an operator with a private CA would set it.
"""

import email
import email.policy
import json
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import psycopg
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from deploy.stack.pki import DevelopmentPKI
from deploy.stack.ports import free_port
from services.common import pki as pki_module
from services.notify import messages, smtp
from tests import test_notify_dispatcher
from tests.test_notify_dispatcher import (
    DEVICE,
    Dispatcher,
    Setup,
    outbox,
    wait_for,
)

# The dispatcher tests' fixtures, used here by name.
setup = test_notify_dispatcher.setup
dispatchers = test_notify_dispatcher.dispatchers

USER = "galvani-notify"
PASSWORD = "correct horse battery staple"
SENDER = "alerts@galvani.example.com"
RECIPIENTS = ["oncall@acme.example", "lead@acme.example"]
DASHBOARD = "https://galvani.example.com/dashboard/"
EXPLANATION = 'Skin contact at 44 °C <script>alert("x")</script> & more; output stopped.'


@dataclass(frozen=True)
class Mail:
    """One message the server accepted, with how its session got there."""

    mail_from: str
    rcpt_tos: list[str]
    message: EmailMessage
    tls: bool
    authenticated: bool


@dataclass
class Inbox:
    """aiosmtpd's handler: keeps what it accepts; ``refuse_recipients`` answers every RCPT 550."""

    mails: list[Mail] = field(default_factory=list)
    refuse_recipients: bool = False

    async def handle_RCPT(  # noqa: N802 (aiosmtpd's hook name)
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self.refuse_recipients:
            return "550 5.1.1 no such mailbox here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(  # noqa: N802 (aiosmtpd's hook name)
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str:
        content = envelope.original_content or b""
        parsed = email.message_from_bytes(content, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        self.mails.append(
            Mail(
                str(envelope.mail_from),
                list(envelope.rcpt_tos),
                parsed,
                session.ssl is not None,
                bool(session.authenticated),
            )
        )
        return "250 accepted"


def authenticate(
    server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
) -> AuthResult:
    ok = isinstance(auth_data, LoginPassword) and (auth_data.login, auth_data.password) == (
        USER.encode(),
        PASSWORD.encode(),
    )
    # handled=False: aiosmtpd answers 535 itself (True would mean this hook had answered).
    return AuthResult(success=ok, handled=False)


def start_server(inbox: Inbox, tls: ssl.SSLContext | None) -> Controller:
    controller = Controller(
        inbox,
        hostname="127.0.0.1",
        port=free_port(),
        server_hostname="localhost",
        tls_context=tls,
        require_starttls=tls is not None,
        auth_required=tls is not None,
        authenticator=authenticate,
    )
    controller.start()
    return controller


@pytest.fixture
def server_tls(pki: DevelopmentPKI) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    return context


@pytest.fixture
def inbox() -> Inbox:
    return Inbox()


@pytest.fixture
def smtp_server(inbox: Inbox, server_tls: ssl.SSLContext) -> Iterator[Controller]:
    controller = start_server(inbox, server_tls)
    yield controller
    controller.stop()


def smtp_settings(pki: DevelopmentPKI, port: int, **changes: str) -> dict[str, str]:
    return {
        "smtp_host": "localhost",
        "smtp_port": str(port),
        "smtp_username": USER,
        "smtp_password": PASSWORD,
        "smtp_from": SENDER,
        "smtp_ca_file": str(pki.ca_file),
        "smtp_timeout_s": "2",
        "dashboard_url": DASHBOARD,
        **changes,
    }


def add_email_channel(setup: Setup, recipients: list[str]) -> int:
    with psycopg.connect(setup.database_url) as conn:
        row = conn.execute(
            "INSERT INTO notification_channels (brand_id, name, kind, recipients)"
            " VALUES ('acme', 'support mail', 'email', %s) RETURNING id",
            [recipients],
        ).fetchone()
    assert row is not None
    return int(str(row[0]))


def open_alert(setup: Setup, explanation: str = EXPLANATION) -> int:
    with psycopg.connect(setup.rules_url) as conn:
        row = conn.execute(
            "INSERT INTO alerts (brand_id, device_id, rule, rule_version, severity,"
            " first_seen, last_seen, explanation)"
            " VALUES ('acme', %s, 'overheat', 1, 'critical', now(), now(), %s) RETURNING id",
            [DEVICE, json.dumps({"text": explanation, "action": "output stopped"})],
        ).fetchone()
    assert row is not None
    return int(str(row[0]))


def settled(setup: Setup, status: str) -> Callable[[], bool]:
    return lambda: [r["status"] for r in outbox(setup)] == [status]


def parts(message: EmailMessage) -> dict[str, str]:
    found = {}
    for part in message.walk():
        if part.get_content_maintype() == "text":
            assert isinstance(part, EmailMessage)
            found[part.get_content_type()] = str(part.get_content())
    return found


# Pure rendering.


def test_subject_and_html_escape_what_a_device_or_explanation_carries() -> None:
    notice = messages.read(
        {
            "idempotency_key": "ntf_1_2_opened_3",
            "event": "alert.opened",
            "brand": "acme",
            "alert": {
                "id": 2,
                "device_id": 'dev"<b>\r\nBcc: x@evil.example',
                "rule": "overheat",
                "severity": "critical",
                "state": "open",
                "count": 1,
                "explanation": {"text": EXPLANATION},
            },
        },
        DASHBOARD + '"><script>',
    )
    built = smtp.build(notice, SENDER, RECIPIENTS)
    assert "\n" not in str(built["Subject"])
    assert built["Bcc"] is None
    body = parts(built)
    html = body["text/html"]
    assert "<script>" not in html
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; more" in html
    assert "dev&quot;&lt;b&gt;" in html
    assert 'href="https://galvani.example.com/dashboard/&quot;&gt;&lt;script&gt;#/alerts/2"' in html
    assert EXPLANATION in body["text/plain"]
    assert built["Message-ID"] == "<ntf_1_2_opened_3@galvani.example.com>"


# Through the dispatcher and a real SMTP server.


def test_opened_alert_arrives_once_over_starttls_and_auth_with_both_parts(
    setup: Setup,
    pki: DevelopmentPKI,
    inbox: Inbox,
    smtp_server: Controller,
    dispatchers: Callable[..., Dispatcher],
) -> None:
    add_email_channel(setup, RECIPIENTS)
    dispatchers(**smtp_settings(pki, smtp_server.port))
    alert = open_alert(setup)
    wait_for(settled(setup, "delivered"), 20, "the e-mail delivered")
    time.sleep(1.0)  # a second send would have come by now
    [mail] = inbox.mails
    [row] = outbox(setup)
    key = str(row["idempotency_key"])
    assert row["last_status_code"] == 250
    assert (mail.tls, mail.authenticated) == (True, True)
    assert mail.mail_from == SENDER
    assert mail.rcpt_tos == RECIPIENTS
    message = mail.message
    assert message["Subject"] == f"[Galvani] critical: overheat on {DEVICE} (opened)"
    assert message["Message-ID"] == f"<{key}@galvani.example.com>"
    assert message["Galvani-Idempotency-Key"] == key
    assert message.get_content_type() == "multipart/alternative"
    body = parts(message)
    assert set(body) == {"text/plain", "text/html"}
    link = f"{DASHBOARD}#/alerts/{alert}"
    text, html = body["text/plain"], body["text/html"]
    for name in (DEVICE, "m1", "overheat", "critical", "opened", link):
        assert name in text
        assert name in html
    assert EXPLANATION in text
    assert "<script>" not in html
    assert "&lt;script&gt;" in html
    assert f'<a href="{link}">' in html


def test_server_without_starttls_is_refused_with_a_visible_error(
    setup: Setup,
    pki: DevelopmentPKI,
    inbox: Inbox,
    dispatchers: Callable[..., Dispatcher],
) -> None:
    plain = start_server(inbox, None)
    try:
        add_email_channel(setup, RECIPIENTS)
        dispatchers(**smtp_settings(pki, plain.port))
        open_alert(setup)
        wait_for(lambda: any(r["last_error"] for r in outbox(setup)), 20, "the attempt recorded")
        time.sleep(0.5)
    finally:
        plain.stop()
    [row] = outbox(setup)
    assert row["status"] == "pending"  # retried: the operator may fix the server
    assert "does not offer STARTTLS" in str(row["last_error"])
    assert inbox.mails == []


def test_no_smtp_server_configured_says_so_in_the_delivery_log(
    setup: Setup, dispatchers: Callable[..., Dispatcher]
) -> None:
    add_email_channel(setup, RECIPIENTS)
    dispatchers()
    open_alert(setup)
    wait_for(lambda: any(r["last_error"] for r in outbox(setup)), 20, "the attempt recorded")
    [row] = outbox(setup)
    assert row["status"] == "pending"
    assert row["last_error"] == "no SMTP server configured (GALVANI_NOTIFY_SMTP_HOST)"


def test_every_recipient_refused_with_5xx_fails_at_once(
    setup: Setup,
    pki: DevelopmentPKI,
    inbox: Inbox,
    smtp_server: Controller,
    dispatchers: Callable[..., Dispatcher],
) -> None:
    inbox.refuse_recipients = True
    add_email_channel(setup, RECIPIENTS)
    dispatchers(**smtp_settings(pki, smtp_server.port))
    open_alert(setup)
    wait_for(settled(setup, "failed"), 20, "the notification failed")
    [row] = outbox(setup)
    assert row["attempts"] == 1
    assert row["last_status_code"] == 550
    assert "every recipient refused: 550" in str(row["last_error"])
    assert inbox.mails == []


def test_wrong_smtp_password_is_retried_with_the_servers_answer(
    setup: Setup,
    pki: DevelopmentPKI,
    inbox: Inbox,
    smtp_server: Controller,
    dispatchers: Callable[..., Dispatcher],
) -> None:
    add_email_channel(setup, RECIPIENTS)
    dispatchers(**smtp_settings(pki, smtp_server.port, smtp_password="wrong"))
    open_alert(setup)
    wait_for(lambda: any(int(str(r["attempts"])) >= 2 for r in outbox(setup)), 20, "a retry")
    [row] = outbox(setup)
    assert row["status"] == "pending"
    assert str(row["last_error"]).startswith("SMTP authentication failed: 535")
    assert inbox.mails == []


def test_server_certificate_the_dispatcher_does_not_trust_is_refused_before_auth(
    setup: Setup,
    pki: DevelopmentPKI,
    inbox: Inbox,
    smtp_server: Controller,
    dispatchers: Callable[..., Dispatcher],
    tmp_path: Path,
) -> None:
    # A CA file with another CA in it: the suite's server certificate does not verify.
    stranger = tmp_path / "other-ca.pem"
    stranger.write_bytes(pki_module.pem(pki_module.Authority.create("Someone else").certificate))
    add_email_channel(setup, RECIPIENTS)
    dispatchers(**smtp_settings(pki, smtp_server.port, smtp_ca_file=str(stranger)))
    open_alert(setup)
    wait_for(lambda: any(r["last_error"] for r in outbox(setup)), 20, "the attempt recorded")
    [row] = outbox(setup)
    assert row["status"] == "pending"
    assert "CERTIFICATE_VERIFY_FAILED" in str(row["last_error"])
    assert inbox.mails == []
