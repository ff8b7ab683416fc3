"""The e-mail of a notification, sent over the operator's SMTP server.

One message per notification to all of the channel's recipients: ``multipart/alternative``
with a plain-text and an HTML part naming the device, model, rule, severity, transition, the
explanation, first and last seen and the dashboard link (every value HTML-escaped: a device's
name or an explanation is data, never markup). ``Message-ID`` is derived from the idempotency
key, so a re-sent notification (at-least-once) is the same message to a mail system that
deduplicates by it, and ``Galvani-Idempotency-Key`` carries the key itself; ``References``
names one id per alert, so mail clients thread an alert's messages.

The session (:func:`send`): EHLO, STARTTLS with a verifying context (required by default: a
server that does not offer it is refused before anything is sent), EHLO again, AUTH when a
username is set, then the message. Outcomes:

* refused for every recipient with a 5xx, or the message refused with a 5xx after DATA:
  permanent (RFC 5321, 4.2.1: "the SMTP client SHOULD NOT repeat the exact request"); the row
  fails at once (``final``) with the server's answer in the delivery log;
* a 4xx, a network error, a TLS or AUTH failure, a server without STARTTLS, no server
  configured: retried with the usual backoff until the give-up time, each attempt's error in
  the log (an operator's fix takes effect on the next attempt);
* accepted for some recipients only: delivered (the refused ones are logged).
"""

import html
import logging
import smtplib
import ssl
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate
from pathlib import Path
from typing import Final

from pydantic import SecretStr

from services.notify.http_post import ERROR_TEXT_CHARS, Outcome
from services.notify.messages import Notice, single_line, truncate

log = logging.getLogger("galvani.notify")

SUBJECT_CHARS: Final = 200
NOT_CONFIGURED: Final = "no SMTP server configured (GALVANI_NOTIFY_SMTP_HOST)"
# The code recorded as last_status_code for an accepted message (RFC 5321's "250 OK").
ACCEPTED: Final = 250


@dataclass(frozen=True)
class SmtpServer:
    """The operator's SMTP server and how to talk to it (``GALVANI_NOTIFY_SMTP_*``)."""

    host: str
    port: int
    sender: str
    username: str | None
    password: SecretStr | None
    starttls: bool
    tls: ssl.SSLContext
    timeout_s: float


def tls_context(ca_file: Path | None) -> ssl.SSLContext:
    """A client context verifying the server's certificate and name, against ``ca_file`` when
    given (a private CA), else the system's CAs."""
    if ca_file is not None:
        return ssl.create_default_context(cafile=str(ca_file))
    return ssl.create_default_context()


def _domain(address: str) -> str:
    return address.rsplit("@", 1)[-1].strip(" >") or "galvani.invalid"


def subject(notice: Notice) -> str:
    """``[Galvani] critical: overheat on acme-1 (opened)``, on one line."""
    return truncate(single_line(f"[Galvani] {notice.summary()}"), SUBJECT_CHARS)


def _rows(notice: Notice) -> list[tuple[str, str]]:
    if notice.is_test:
        return [("Brand", notice.brand)]
    return [
        ("Device", notice.device_id),
        ("Model", notice.model or "-"),
        ("Rule", notice.rule),
        ("Severity", notice.severity),
        ("Transition", notice.transition_text),
        ("State", notice.state),
        ("First seen", notice.first_seen),
        ("Last seen", notice.last_seen),
    ]


def text_body(notice: Notice) -> str:
    """The plain-text part."""
    lines = [notice.summary(), ""]
    if notice.is_test:
        lines.append(
            f"This address receives Galvani's alert notifications for brand {notice.brand}."
            " Nothing needs doing."
        )
    lines += [f"{label}: {value}" for label, value in _rows(notice)]
    if notice.explanation:
        lines += ["", notice.explanation]
    if notice.dashboard_link is not None:
        lines += ["", f"Open in the dashboard: {notice.dashboard_link}"]
    lines += ["", f"Notification {notice.idempotency_key}"]
    return "\n".join(lines) + "\n"


def html_body(notice: Notice) -> str:
    """The HTML part; every value escaped."""
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8"></head><body>',
        f"<h2>{esc(notice.summary())}</h2>",
    ]
    if notice.is_test:
        parts.append(
            f"<p>This address receives Galvani's alert notifications for brand "
            f"{esc(notice.brand)}. Nothing needs doing.</p>"
        )
    parts.append("<table>")
    parts += [
        f'<tr><th align="left">{esc(label)}</th><td>{esc(value)}</td></tr>'
        for label, value in _rows(notice)
    ]
    parts.append("</table>")
    if notice.explanation:
        parts.append(f"<p>{esc(notice.explanation)}</p>")
    if notice.dashboard_link is not None:
        link = esc(notice.dashboard_link, quote=True)
        parts.append(f'<p><a href="{link}">Open in the dashboard</a></p>')
    parts.append(f"<p><small>Notification {esc(notice.idempotency_key)}</small></p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def build(notice: Notice, sender: str, recipients: list[str]) -> EmailMessage:
    """The message for ``notice``."""
    domain = _domain(sender)
    message = EmailMessage()
    message["Subject"] = subject(notice)
    message["From"] = sender
    message["To"] = ", ".join(recipients)
    message["Date"] = formatdate(usegmt=True)
    message["Message-ID"] = f"<{notice.idempotency_key}@{domain}>"
    if notice.alert_id is not None:
        message["References"] = f"<galvani.alert.{notice.brand}.{notice.alert_id}@{domain}>"
    message["Galvani-Idempotency-Key"] = notice.idempotency_key
    message["Auto-Submitted"] = "auto-generated"
    message.set_content(text_body(notice))
    message.add_alternative(html_body(notice), subtype="html")
    return message


def _answer(code: int, text: bytes | str) -> str:
    said = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
    return f"{code} {single_line(said)}"


def send(server: SmtpServer | None, message: EmailMessage, recipients: list[str]) -> Outcome:
    """Deliver ``message`` to ``recipients`` through ``server`` (see the module docstring for
    what is retried)."""
    if server is None:
        return Outcome(False, error=NOT_CONFIGURED)
    where = f"{server.host}:{server.port}"
    try:
        with smtplib.SMTP(server.host, server.port, timeout=server.timeout_s) as session:
            session.ehlo()
            if server.starttls:
                if not session.has_extn("starttls"):
                    return Outcome(
                        False,
                        error=f"the SMTP server {where} does not offer STARTTLS; nothing sent"
                        " (GALVANI_NOTIFY_SMTP_STARTTLS requires it)",
                    )
                session.starttls(context=server.tls)
                session.ehlo()
            if server.username:
                password = server.password.get_secret_value() if server.password else ""
                session.login(server.username, password)
            refused = session.send_message(message, server.sender, recipients)
    except smtplib.SMTPRecipientsRefused as exc:
        answers = list(exc.recipients.values())
        permanent = all(500 <= code < 600 for code, _ in answers)
        code, text = answers[0]
        return _refused(f"every recipient refused: {_answer(code, text)}", code, permanent)
    except smtplib.SMTPDataError as exc:
        permanent = 500 <= exc.smtp_code < 600
        return _refused(
            f"message refused: {_answer(exc.smtp_code, exc.smtp_error)}", exc.smtp_code, permanent
        )
    except smtplib.SMTPAuthenticationError as exc:
        return _refused(
            f"SMTP authentication failed: {_answer(exc.smtp_code, exc.smtp_error)}",
            exc.smtp_code,
            False,
        )
    except smtplib.SMTPResponseException as exc:
        return _refused(_answer(exc.smtp_code, exc.smtp_error), exc.smtp_code, False)
    except ssl.SSLError as exc:
        return Outcome(False, error=truncate(f"TLS with {where} failed: {exc}", ERROR_TEXT_CHARS))
    except TimeoutError:
        return Outcome(False, error=f"no answer from {where} within {server.timeout_s:g} s")
    except (OSError, smtplib.SMTPException) as exc:
        return Outcome(
            False, error=truncate(f"{where}: {type(exc).__name__}: {exc}", ERROR_TEXT_CHARS)
        )
    if refused:
        log.warning(
            "e-mail %s: %d of %d recipients refused: %s",
            message["Message-ID"],
            len(refused),
            len(recipients),
            "; ".join(f"{_answer(code, text)}" for code, text in refused.values()),
        )
    return Outcome(True, status_code=ACCEPTED)


def _refused(error: str, code: int, permanent: bool) -> Outcome:
    return Outcome(
        False, status_code=code, error=truncate(error, ERROR_TEXT_CHARS), final=permanent
    )
