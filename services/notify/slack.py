"""The Slack message of a notification: an incoming webhook's JSON, ``text`` plus ``blocks``.

Slack's incoming webhooks (https://docs.slack.dev/messaging/sending-messages-using-incoming-webhooks)
take ``{"text": ..., "blocks": [...]}``: ``text`` is the fallback a notification or a
screen reader shows, the blocks the message itself
(https://docs.slack.dev/reference/block-kit/blocks). The limits Slack documents, and refuses
a message over (``invalid_blocks``): a header's plain text at most 150 characters, a section's
text 3,000, a section's fields at most 10 of 2,000 each, a context at most 10 elements, a
button's text 75 and its URL 3,000, at most 50 blocks. Every text here is cut to its limit
*after* escaping, so an escape is never cut in half.

Values a brand or a device chose (device id, rule, explanation) go into ``mrkdwn`` texts with
``&``, ``<`` and ``>`` escaped as Slack asks
(https://docs.slack.dev/messaging/formatting-message-text): unescaped, ``<!channel>``
in a device's name would notify the whole channel and ``<https://x|y>`` would disguise a link.
"""

import json
from typing import Any, Final

from services.notify.messages import ELLIPSIS, Notice, truncate

HEADER_CHARS: Final = 150
SECTION_CHARS: Final = 3000
FIELD_CHARS: Final = 2000
MAX_FIELDS: Final = 10
CONTEXT_ELEMENTS: Final = 10
BUTTON_TEXT_CHARS: Final = 75
BUTTON_URL_CHARS: Final = 3000
MAX_BLOCKS: Final = 50
# Slack answers 400 (invalid_payload, invalid_blocks, no_text) to a message it will never
# accept as it is.
NOT_RETRIED: Final = frozenset({400})
_ESCAPES: Final = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}


def escape(text: str) -> str:
    """``text`` for a ``mrkdwn`` field: ``&``, ``<`` and ``>`` as Slack's entities."""
    return "".join(_ESCAPES.get(char, char) for char in text)


def escape_within(text: str, limit: int) -> str:
    """``text`` escaped and cut to at most ``limit`` characters of escaped text, ending with an
    ellipsis when cut; never in the middle of an entity."""
    escaped = escape(text)
    if len(escaped) <= limit:
        return escaped
    kept: list[str] = []
    used = 0
    for char in text:
        piece = _ESCAPES.get(char, char)
        if used + len(piece) > limit - 1:
            break
        kept.append(piece)
        used += len(piece)
    return "".join(kept) + ELLIPSIS


def _mrkdwn(text: str) -> dict[str, Any]:
    return {"type": "mrkdwn", "text": text}


def _field(label: str, value: str) -> dict[str, Any]:
    prefix = f"*{label}*\n"
    return _mrkdwn(prefix + escape_within(value or "-", FIELD_CHARS - len(prefix)))


def message(notice: Notice) -> dict[str, Any]:
    """The incoming webhook's JSON object for ``notice``."""
    summary = notice.summary()
    blocks: list[dict[str, Any]] = [
        {
            "type": "header",
            # plain_text: shown as written, no mentions nor links parsed.
            "text": {"type": "plain_text", "text": truncate(summary, HEADER_CHARS)},
        }
    ]
    if notice.is_test:
        blocks.append(
            {
                "type": "section",
                "text": _mrkdwn(
                    escape_within(
                        f"This channel receives Galvani's alert notifications for brand "
                        f"{notice.brand}. Nothing needs doing.",
                        SECTION_CHARS,
                    )
                ),
            }
        )
    else:
        fields = [
            _field("Device", notice.device_id),
            _field("Model", notice.model or "-"),
            _field("Rule", notice.rule),
            _field("Severity", notice.severity),
            _field("State", notice.state),
            _field("Count", "-" if notice.count is None else str(notice.count)),
        ]
        blocks.append({"type": "section", "fields": fields[:MAX_FIELDS]})
        if notice.explanation:
            blocks.append(
                {
                    "type": "section",
                    "text": _mrkdwn(escape_within(notice.explanation, SECTION_CHARS)),
                }
            )
        blocks.append(
            {
                "type": "context",
                "elements": [
                    _mrkdwn(escape_within(f"First seen {notice.first_seen}", SECTION_CHARS)),
                    _mrkdwn(escape_within(f"Last seen {notice.last_seen}", SECTION_CHARS)),
                ][:CONTEXT_ELEMENTS],
            }
        )
        link = notice.dashboard_link
        if link is not None and len(link) <= BUTTON_URL_CHARS:
            blocks.append(
                {
                    "type": "actions",
                    "elements": [
                        {
                            "type": "button",
                            "text": {
                                "type": "plain_text",
                                "text": truncate("Open in the dashboard", BUTTON_TEXT_CHARS),
                            },
                            "url": link,
                            "action_id": "galvani-open-alert",
                        }
                    ],
                }
            )
    return {"text": escape_within(summary, SECTION_CHARS), "blocks": blocks[:MAX_BLOCKS]}


def body(notice: Notice) -> bytes:
    """:func:`message` as the request's bytes."""
    return json.dumps(message(notice), ensure_ascii=False, separators=(",", ":")).encode()
