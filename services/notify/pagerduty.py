"""The PagerDuty Events API v2 event of a notification.

The event (https://developer.pagerduty.com/docs/events-api-v2/trigger-events/, schema in
https://github.com/PagerDuty/api-schema, reference/events-v2/openapiv3.json): ``routing_key``
(the channel's integration key), ``event_action`` and ``dedup_key``; a ``trigger`` also
carries ``payload`` (``summary`` at most 1,024 characters, ``source``, ``severity``, ...),
``client``/``client_url`` and ``links``. ``acknowledge`` and ``resolve`` carry only the three
keys, as PagerDuty's own examples do.

One PagerDuty alert per Galvani alert: its ``dedup_key`` is ``galvani:<brand>:alert:<id>``, the
same for every transition, so ``opened`` and ``count_raised`` trigger (the second only adds to
the open alert's log), ``acknowledged`` acknowledges and ``resolved`` resolves it. A test
notification triggers an alert of its own (``galvani:<brand>:test:<idempotency key>``), which
the brand resolves in PagerDuty.

Answers (the same page, "Response Codes & Retry Logic"): 202 accepted; 400 "check that the JSON
is valid", not to be retried (the same event would be refused again: the row fails at once);
429 and 5xx retried later.
"""

import json
from typing import Any, Final

from services.notify.messages import Notice, truncate

DEFAULT_URL: Final = "https://events.pagerduty.com/v2/enqueue"
SUMMARY_CHARS: Final = 1024
DEDUP_KEY_CHARS: Final = 255
CLIENT: Final = "Galvani"
# Galvani's severities are PagerDuty's, minus ``error``.
SEVERITIES: Final = {"critical": "critical", "warning": "warning", "info": "info"}
ACTIONS: Final = {
    "opened": "trigger",
    "count_raised": "trigger",
    "acknowledged": "acknowledge",
    "resolved": "resolve",
    "test": "trigger",
}
# The explanation's stored form goes into custom_details only up to this size (PagerDuty
# refuses an event over 512 KB; the explanation text is always there).
DETAILS_BYTES: Final = 16 * 1024
# Statuses PagerDuty documents as not worth retrying.
NOT_RETRIED: Final = frozenset({400})


def dedup_key(notice: Notice) -> str:
    """The key that ties a Galvani alert's events to one PagerDuty alert."""
    if notice.alert_id is None:
        key = f"galvani:{notice.brand}:test:{notice.idempotency_key}"
    else:
        key = f"galvani:{notice.brand}:alert:{notice.alert_id}"
    return key[:DEDUP_KEY_CHARS]


def event(notice: Notice, routing_key: str, dashboard_base: str | None) -> dict[str, Any]:
    """The event to POST for ``notice`` with the channel's ``routing_key``."""
    action = ACTIONS.get(notice.transition, "trigger")
    result: dict[str, Any] = {
        "routing_key": routing_key,
        "event_action": action,
        "dedup_key": dedup_key(notice),
    }
    if action != "trigger":
        return result
    payload: dict[str, Any] = {
        "summary": truncate(notice.summary(), SUMMARY_CHARS),
        "source": notice.device_id or "galvani",
        "severity": SEVERITIES.get(notice.severity, "info"),
        "group": notice.brand,
        "custom_details": _details(notice),
    }
    if notice.occurred_at:
        payload["timestamp"] = notice.occurred_at
    if notice.model:
        payload["component"] = notice.model
    if notice.rule:
        payload["class"] = notice.rule
    result["payload"] = payload
    result["client"] = CLIENT
    if dashboard_base:
        result["client_url"] = dashboard_base
    if notice.dashboard_link is not None:
        result["links"] = [
            {"href": notice.dashboard_link, "text": f"Alert {notice.alert_id} in Galvani"}
        ]
    return result


def _details(notice: Notice) -> dict[str, Any]:
    if notice.is_test:
        return {"test": True, "idempotency_key": notice.idempotency_key}
    details: dict[str, Any] = {
        "alert_id": notice.alert_id,
        "transition": notice.transition,
        "state": notice.state,
        "count": notice.count,
        "rule_version": notice.rule_version,
        "first_seen": notice.first_seen,
        "last_seen": notice.last_seen,
        "explanation": notice.explanation,
        "idempotency_key": notice.idempotency_key,
    }
    stored = notice.explanation_details
    if stored is not None and len(json.dumps(stored).encode()) <= DETAILS_BYTES:
        details["explanation_details"] = stored
    return details


def body(notice: Notice, routing_key: str, dashboard_base: str | None) -> bytes:
    """:func:`event` as the request's bytes."""
    return json.dumps(
        event(notice, routing_key, dashboard_base), ensure_ascii=False, separators=(",", ":")
    ).encode()
