"""Alert schemas (api.md, "An alert")."""

from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from services.api.schemas import body_config


class AlertState(StrEnum):
    OPEN = "open"
    ACKNOWLEDGED = "acknowledged"
    RESOLVED = "resolved"


class Severity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


class Explanation(BaseModel):
    """Why the alert was raised, in terms a support agent can read out."""

    model_config = ConfigDict(extra="allow")

    threshold: dict[str, Any]
    observed: dict[str, Any]
    window: dict[str, Any]
    action: str
    text: str = Field(
        examples=[
            "The device ran 41 s past its 20-minute limit for LIFT; it has been switched to "
            "safe mode (mode table v4)."
        ]
    )


class Transition(BaseModel):
    from_state: AlertState | None
    to_state: AlertState
    actor: str
    at: datetime
    note: str | None


class Alert(BaseModel):
    id: int
    device_id: str
    rule: str
    rule_version: int
    severity: Severity
    state: AlertState
    count: int
    first_seen: datetime
    last_seen: datetime
    explanation: Explanation
    acknowledged_at: datetime | None
    acknowledged_by: str | None
    resolved_at: datetime | None
    resolved_by: str | None
    resolution: str | None


class AlertDetail(Alert):
    """An alert with every transition, oldest first."""

    transitions: list[Transition]


class AlertList(BaseModel):
    items: list[Alert]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null: none")


class AlertAction(BaseModel):
    """An optional note kept with the transition."""

    model_config = body_config()

    note: str | None = Field(default=None, max_length=1000)
