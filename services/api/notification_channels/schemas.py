"""Notification channel schemas: a channel of each kind as created, changed and shown, and its
deliveries."""

import functools
import zoneinfo
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Final, Literal, Self

from pydantic import AfterValidator, BaseModel, EmailStr, Field, field_validator, model_validator
from pydantic.json_schema import SkipJsonSchema

from services.api.alerts.schemas import Severity
from services.api.schemas import body_config
from services.rules.catalogue import RULES

RULE_IDS = tuple(rule.id for rule in RULES)
PAGERDUTY_EVENTS_URL: Final = "https://events.pagerduty.com/v2/enqueue"
MAX_RECIPIENTS: Final = 20


class ChannelKind(StrEnum):
    """Where a channel's notifications go."""

    WEBHOOK = "webhook"
    SLACK = "slack"
    PAGERDUTY = "pagerduty"
    EMAIL = "email"


class Transition(StrEnum):
    """An alert transition a channel can subscribe to."""

    OPENED = "opened"
    COUNT_RAISED = "count_raised"
    ACKNOWLEDGED = "acknowledged"
    RESOLVED = "resolved"


class DeliveryStatus(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


def _unique(values: list[str] | None) -> list[str] | None:
    """The values in their first order, each once."""
    return None if values is None else list(dict.fromkeys(values))


RuleId = Annotated[str, Field(json_schema_extra={"enum": list(RULE_IDS)})]
ModelName = Annotated[str, Field(min_length=1, max_length=64)]
LocalTime = Annotated[str, Field(pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$", examples=["22:00"])]


def _known_rules(values: list[str] | None) -> list[str] | None:
    unknown = [value for value in values or () if value not in RULE_IDS]
    if unknown:
        raise ValueError(f"not rules of the catalogue: {', '.join(map(repr, unknown))}")
    return _unique(values)


@functools.cache
def _time_zones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


def _time_zone(name: str) -> str:
    if name not in _time_zones():
        raise ValueError(f"{name!r} is not an IANA time zone name (such as 'Europe/Berlin')")
    return name


class QuietHours(BaseModel):
    """A daily window in which the channel's notifications wait, except critical ones."""

    model_config = body_config({"start": "22:00", "end": "07:00", "time_zone": "Europe/Berlin"})

    start: LocalTime = Field(description="local time (HH:MM, 24-hour) the window opens")
    end: LocalTime = Field(
        description="local time (HH:MM) it closes, excluded; before `start`, the window runs "
        "past midnight (22:00 to 07:00)"
    )
    time_zone: Annotated[str, AfterValidator(_time_zone)] = Field(
        min_length=1,
        max_length=64,
        description="the IANA time zone the times are read in (`Europe/Berlin`), which "
        "follows its daylight saving changes",
    )

    @model_validator(mode="after")
    def _a_window(self) -> Self:
        if self.start == self.end:
            raise ValueError("start and end must differ (an empty or a whole-day window)")
        return self


QUIET_HOURS_DESCRIPTION: Final = (
    "a daily window in the channel's time zone in which notifications that are not "
    "`critical` are held: queued at once, but sent when the window ends (the delivery log "
    "shows `held_until`). `critical` alerts are never held. Omit or null: no quiet hours"
)


class _Filter(BaseModel):
    """What every kind of channel shares: its name, the alerts it is told of, its pace."""

    name: str = Field(min_length=1, max_length=100)
    rules: Annotated[list[RuleId] | None, AfterValidator(_known_rules)] = Field(
        default=None, min_length=1, max_length=len(RULE_IDS), description="omit: every rule"
    )
    min_severity: Severity = Severity.INFO
    models: Annotated[list[ModelName] | None, AfterValidator(_unique)] = Field(
        default=None, min_length=1, max_length=100, description="device models; omit: every model"
    )
    transitions: list[Transition] = Field(default=list(Transition), min_length=1, max_length=4)
    max_concurrency: int = Field(
        default=4, ge=1, le=64, description="deliveries to this channel in flight at once"
    )
    quiet_hours: QuietHours | None = Field(default=None, description=QUIET_HOURS_DESCRIPTION)


TARGET_URL_RULES: Final = (
    "https, to a public address (the host must resolve, and to no loopback, private, "
    "link-local, multicast or reserved address, unless the operator allows them); no "
    "credentials, no fragment"
)


class WebhookChannelCreate(_Filter):
    """A generic webhook: a JSON POST signed with HMAC-SHA256 under a secret Galvani makes
    and shows once."""

    model_config = body_config(
        {
            "name": "on-call",
            "kind": "webhook",
            "url": "https://hooks.example.com/galvani",
            "min_severity": "warning",
        }
    )

    kind: Literal["webhook"]
    url: str = Field(
        min_length=1,
        max_length=2048,
        description=f"where deliveries are POSTed: {TARGET_URL_RULES}",
    )


class SlackChannelCreate(_Filter):
    """A Slack (or Slack-compatible) incoming webhook: text and blocks."""

    model_config = body_config(
        {
            "name": "support channel",
            "kind": "slack",
            "url": "https://hooks.slack.com/services/T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX",
        }
    )

    kind: Literal["slack"]
    url: str = Field(
        min_length=1,
        max_length=2048,
        repr=False,
        json_schema_extra={"writeOnly": True},
        description="the incoming-webhook URL, which is its own credential: stored encrypted "
        "and never shown again (the channel shows a masked form); " + TARGET_URL_RULES,
    )


class PagerDutyChannelCreate(_Filter):
    """PagerDuty Events API v2: trigger, acknowledge and resolve, one incident per alert."""

    model_config = body_config(
        {
            "name": "pager",
            "kind": "pagerduty",
            "routing_key": "0123456789abcdef0123456789abcdef",
            "min_severity": "critical",
        }
    )

    kind: Literal["pagerduty"]
    routing_key: str = Field(
        pattern=r"^[A-Za-z0-9]{32}$",
        repr=False,
        json_schema_extra={"writeOnly": True, "format": "password"},
        description="the service integration's routing (integration) key, 32 characters: "
        "stored encrypted, never shown again",
    )
    url: str = Field(
        default=PAGERDUTY_EVENTS_URL,
        min_length=1,
        max_length=2048,
        description="the Events API v2 endpoint (another region's, such as "
        "`https://events.eu.pagerduty.com/v2/enqueue`): " + TARGET_URL_RULES,
    )


class EmailChannelCreate(_Filter):
    """E-mail over the operator's SMTP server: plain text and HTML."""

    model_config = body_config(
        {"name": "on-call mail", "kind": "email", "recipients": ["oncall@example.com"]}
    )

    kind: Literal["email"]
    recipients: Annotated[list[EmailStr], AfterValidator(_unique)] = Field(
        min_length=1, max_length=MAX_RECIPIENTS, description="the addresses each alert is sent to"
    )


ChannelCreate = Annotated[
    WebhookChannelCreate | SlackChannelCreate | PagerDutyChannelCreate | EmailChannelCreate,
    Field(discriminator="kind"),
]


class ChannelUpdate(BaseModel):
    """What a channel's PATCH may change: only the fields given change. Its kind and secret
    stay (make a new channel for another)."""

    model_config = body_config({"min_severity": "critical", "quiet_hours": None})

    # Fields that may be left out but not set to null (the schema offers no null for them;
    # their constraints are on the type, so the schema states them).
    name: Annotated[str, Field(min_length=1, max_length=100)] | SkipJsonSchema[None] = None
    rules: Annotated[list[RuleId] | None, AfterValidator(_known_rules)] = Field(
        default=None, min_length=1, max_length=len(RULE_IDS), description="null: every rule"
    )
    min_severity: Severity | SkipJsonSchema[None] = None
    models: Annotated[list[ModelName] | None, AfterValidator(_unique)] = Field(
        default=None, min_length=1, max_length=100, description="null: every model"
    )
    transitions: (
        Annotated[list[Transition], Field(min_length=1, max_length=4)] | SkipJsonSchema[None]
    ) = None
    max_concurrency: Annotated[int, Field(ge=1, le=64)] | SkipJsonSchema[None] = None
    quiet_hours: QuietHours | None = Field(
        default=None,
        description="a daily window in the channel's time zone in which notifications that "
        "are not `critical` are held until it ends (`critical` alerts never are); null clears "
        "them. Only notifications queued from now on follow the change",
    )
    url: (
        Annotated[
            str,
            Field(
                min_length=1,
                max_length=2048,
                description="webhook, slack and pagerduty channels: the new target, checked "
                "as when created (an e-mail channel has none)",
            ),
        ]
        | SkipJsonSchema[None]
    ) = None
    recipients: (
        Annotated[
            list[EmailStr],
            AfterValidator(_unique),
            Field(min_length=1, max_length=MAX_RECIPIENTS, description="e-mail channels only"),
        ]
        | SkipJsonSchema[None]
    ) = None

    @field_validator(
        "name", "min_severity", "transitions", "max_concurrency", "url", "recipients", mode="before"
    )
    @classmethod
    def _not_null(cls, value: object) -> object:
        if value is None:
            raise ValueError("may be left out, not null")
        return value


class Channel(BaseModel):
    """A channel: its filter and target. A secret (a webhook's signing key, a Slack URL, a
    PagerDuty routing key) is never shown here."""

    id: int
    name: str
    kind: ChannelKind
    url: str | None = Field(
        description="webhook and pagerduty: the target; slack: a masked form of the "
        "incoming-webhook URL; email: null"
    )
    recipients: list[str] | None = Field(description="email: the addresses; else null")
    rules: list[str] | None
    min_severity: Severity
    models: list[str] | None
    transitions: list[Transition]
    max_concurrency: int
    quiet_hours: QuietHours | None
    created_at: datetime


class ChannelCreated(Channel):
    secret: str | None = Field(
        description="webhook: the HMAC-SHA256 key deliveries are signed with (`whsec_…`, the "
        "whole string), shown this once, never again; null for the other kinds (their "
        "credential is the one you gave)"
    )


class ChannelList(BaseModel):
    items: list[Channel]
    next_cursor: str | None


class Delivery(BaseModel):
    """One notification to a channel: what the dispatcher did with it."""

    id: int
    alert_id: int | None
    transition: str
    idempotency_key: str
    status: DeliveryStatus
    attempts: int
    next_attempt_at: datetime
    held_until: datetime | None = Field(
        description="set when the channel's quiet hours held the notification: it is sent "
        "from then (the window's end)"
    )
    last_error: str | None
    last_status_code: int | None
    created_at: datetime
    delivered_at: datetime | None
    latency_ms: float | None = Field(description="delivered_at - created_at, in milliseconds")


class DeliveryList(BaseModel):
    items: list[Delivery]
    next_cursor: str | None


class QueuedNotification(BaseModel):
    """The test notification queued for the dispatcher."""

    id: int
    idempotency_key: str
    status: DeliveryStatus
