"""Fleet schemas (api.md, ``GET /v1/fleet/summary`` and ``GET /v1/dead-letters``)."""

from datetime import datetime
from typing import Final

from pydantic import BaseModel, Field

PAYLOAD_PREVIEW_BYTES: Final = 512


class OpenAlerts(BaseModel):
    total: int
    by_severity: dict[str, int]
    by_rule: dict[str, int]


class FleetSummary(BaseModel):
    devices: int
    online: int
    sessions_today: int = Field(description="sessions started since 00:00 UTC")
    open_alerts: OpenAlerts


class DeadLetter(BaseModel):
    id: int
    topic: str
    device_id: str | None
    channel: str | None
    reason: str
    detail: str
    payload_size: int
    payload_preview_b64: str = Field(
        description=f"the first {PAYLOAD_PREVIEW_BYTES} bytes as stored, base64"
    )
    received_at: datetime


class DeadLetterList(BaseModel):
    items: list[DeadLetter]
    next_cursor: str | None
