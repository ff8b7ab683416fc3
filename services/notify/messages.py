"""What a notification says, whatever carries it: the outbox payload read into a
:class:`Notice`, its one-line summary, and the dashboard link.

The payload is the outbox row's (migration 0014): ``event`` is ``alert.<transition>`` or
``test``; ``alert`` holds the alert's fields at the transition (null for a test). Every kind
renders from a :class:`Notice`, so the Slack message, the PagerDuty event and the e-mail name
the same things in the same words.
"""

import json
from dataclasses import dataclass
from typing import Any

# The marker a cut text ends with (one character, so limits stay easy to count).
ELLIPSIS = "…"
TRANSITION_WORDS = {
    "opened": "opened",
    "count_raised": "count raised",
    "acknowledged": "acknowledged",
    "resolved": "resolved",
    "test": "test",
}


@dataclass(frozen=True)
class Notice:
    """One notification's content, read from its payload."""

    idempotency_key: str
    transition: str
    occurred_at: str
    brand: str
    alert_id: int | None
    device_id: str
    model: str | None
    rule: str
    rule_version: int | None
    severity: str
    state: str
    count: int | None
    first_seen: str
    last_seen: str
    explanation: str
    # The explanation as stored (figures, window), for kinds that carry details.
    explanation_details: dict[str, Any] | None
    dashboard_link: str | None

    @property
    def is_test(self) -> bool:
        """A test notification (``POST /v1/notification-channels/{id}/test``): no alert."""
        return self.alert_id is None

    @property
    def transition_text(self) -> str:
        """``opened``, ``count raised to 3``, ``acknowledged``, ``resolved``."""
        if self.transition == "count_raised" and self.count is not None:
            return f"count raised to {self.count}"
        return TRANSITION_WORDS.get(self.transition, self.transition)

    def summary(self) -> str:
        """``critical: overheat on acme-1 (opened)``; a test says so."""
        if self.is_test:
            return f"Galvani test notification for brand {self.brand}"
        return f"{self.severity}: {self.rule} on {self.device_id} ({self.transition_text})"


def read(payload: dict[str, Any], dashboard_base: str | None) -> Notice:
    """The :class:`Notice` of an outbox payload; ``dashboard_base`` is
    ``GALVANI_NOTIFY_DASHBOARD_URL`` (None: no link)."""
    event = str(payload.get("event") or "")
    transition = event.removeprefix("alert.") if event.startswith("alert.") else event
    alert = payload.get("alert")
    common = {
        "idempotency_key": str(payload.get("idempotency_key") or ""),
        "transition": transition or "test",
        "occurred_at": str(payload.get("occurred_at") or ""),
        "brand": str(payload.get("brand") or ""),
    }
    if not isinstance(alert, dict):
        return Notice(
            **common,
            alert_id=None,
            device_id="",
            model=None,
            rule="",
            rule_version=None,
            severity="info",
            state="",
            count=None,
            first_seen="",
            last_seen="",
            explanation="",
            explanation_details=None,
            dashboard_link=None,
        )
    alert_id = int(alert["id"])
    explanation = alert.get("explanation")
    details = explanation if isinstance(explanation, dict) else None
    text = details.get("text") if details is not None else explanation
    return Notice(
        **common,
        alert_id=alert_id,
        device_id=str(alert.get("device_id") or ""),
        model=_optional_str(alert.get("model")),
        rule=str(alert.get("rule") or ""),
        rule_version=_optional_int(alert.get("rule_version")),
        severity=str(alert.get("severity") or "info"),
        state=str(alert.get("state") or ""),
        count=_optional_int(alert.get("count")),
        first_seen=str(alert.get("first_seen") or ""),
        last_seen=str(alert.get("last_seen") or ""),
        explanation=text if isinstance(text, str) else "",
        explanation_details=details,
        dashboard_link=dashboard_link(dashboard_base, alert_id),
    )


def read_body(body: bytes, dashboard_base: str | None) -> Notice:
    """:func:`read` of the payload's JSON text."""
    payload = json.loads(body)
    if not isinstance(payload, dict):
        raise TypeError("the notification payload is not a JSON object")
    return read(payload, dashboard_base)


def dashboard_link(base: str | None, alert_id: int | None) -> str | None:
    """``<base>#/alerts/<id>`` (the dashboard's alert route), or None without a base or an
    alert."""
    if not base or alert_id is None:
        return None
    return f"{base}#/alerts/{alert_id}"


def with_dashboard_url(body: bytes, base: str | None) -> bytes:
    """A webhook payload with its ``dashboard_url`` filled in (null in the outbox), or
    ``body`` itself when there is no base or no alert. The same input gives the same bytes, so
    a retry sends (and signs) exactly what the first attempt did. A payload this cannot write
    back as it read it (a number beyond a float's range) is sent as stored, without the link."""
    if not base:
        return body
    try:
        payload = json.loads(body)
        alert = payload.get("alert") if isinstance(payload, dict) else None
        if not isinstance(alert, dict) or not isinstance(alert.get("id"), int):
            return body
        payload["dashboard_url"] = dashboard_link(base, alert["id"])
        return json.dumps(
            payload, ensure_ascii=False, allow_nan=False, separators=(",", ":")
        ).encode()
    except ValueError:
        return body


def truncate(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters, ending with an ellipsis when cut."""
    if len(text) <= limit:
        return text
    if limit <= 0:
        return ""
    return text[: limit - 1].rstrip() + ELLIPSIS


def single_line(text: str) -> str:
    """``text`` with every control character (line breaks included) as a space: for a mail
    header or a one-line summary, where a line break would end the field."""
    return "".join(" " if ord(char) < 0x20 or ord(char) == 0x7F else char for char in text)


def _optional_str(value: object) -> str | None:
    return None if value is None else str(value)


def _optional_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
