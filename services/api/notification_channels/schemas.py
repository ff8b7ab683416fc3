"""Notification channel schemas: a channel as created and shown, and its deliveries."""

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, Field

from services.api.alerts.schemas import Severity
from services.api.schemas import body_config
from services.rules.catalogue import RULES

RULE_IDS = tuple(rule.id for rule in RULES)


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


def _known_rules(values: list[str] | None) -> list[str] | None:
    unknown = [value for value in values or () if value not in RULE_IDS]
    if unknown:
        raise ValueError(f"not rules of the catalogue: {', '.join(map(repr, unknown))}")
    return _unique(values)


class ChannelCreate(BaseModel):
    model_config = body_config(
        {
            "name": "on-call",
            "kind": "webhook",
            "url": "https://hooks.example.com/galvani",
            "min_severity": "warning",
        }
    )

    name: str = Field(min_length=1, max_length=100)
    kind: Literal["webhook"] = Field(description="only `webhook` for now")
    url: str = Field(
        min_length=1,
        max_length=2048,
        description="where deliveries are POSTed: https, to a public address (the host must "
        "resolve, and to no loopback, private, link-local, multicast or reserved address, "
        "unless the operator allows them); no credentials, no fragment",
    )
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


class Channel(BaseModel):
    """A webhook channel: its filter and target. Its secret is shown only when created."""

    id: int
    name: str
    kind: str
    url: str
    rules: list[str] | None
    min_severity: Severity
    models: list[str] | None
    transitions: list[Transition]
    max_concurrency: int
    created_at: datetime


class ChannelCreated(Channel):
    secret: str = Field(
        description="the HMAC-SHA256 key deliveries are signed with (`whsec_…`, the whole "
        "string): shown this once, never again"
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
