"""Rollout schemas: what to push to whom, and progress from the devices' answers."""

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Self

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator, model_validator

from services.api.schemas import body_config
from services.common.provisioning import DEVICE_ID_RE

MAX_DEVICE_IDS = 10_000

DeviceId = Annotated[str, Field(pattern=DEVICE_ID_RE.pattern)]


def _exactly_one_target(schema: dict[str, Any]) -> None:
    """Say in the schema what :meth:`RolloutTarget._exactly_one` checks."""
    schema["oneOf"] = [
        {"required": ["device_ids"], "properties": {"device_ids": {"type": "array"}}},
        {"required": ["model"], "properties": {"model": {"type": "string"}}},
        {"required": ["all"], "properties": {"all": {"const": True}}},
    ]


class RolloutTarget(BaseModel):
    """Exactly one of: listed devices, every device of a model, or the brand's whole fleet."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra=lambda schema, _: _exactly_one_target(schema)
    )

    device_ids: list[DeviceId] | None = Field(default=None, min_length=1, max_length=MAX_DEVICE_IDS)
    model: str | None = Field(default=None, min_length=1, max_length=64)
    all: bool = Field(default=False, description="every active device of the brand")

    @model_validator(mode="after")
    def _exactly_one(self) -> Self:
        chosen = [self.device_ids is not None, self.model is not None, self.all]
        if sum(chosen) != 1:
            raise ValueError("give exactly one of device_ids, model or all: true")
        return self


class RolloutCreate(BaseModel):
    model_config = body_config(
        {
            "mode_table_id": "6f1c2b0e-8d4a-4a57-9c61-0d1f5a3e7b21",
            "target": {"model": "glow-2"},
            "canary_share": 0.05,
        }
    )

    mode_table_id: uuid.UUID
    target: RolloutTarget
    canary_share: float | None = Field(
        default=None,
        gt=0,
        lt=1,
        description="push to this share of the targets first; the rest on promotion",
    )
    expires_at: AwareDatetime | None = Field(
        default=None, description="devices refuse the table after this time (with a time zone)"
    )
    brand: str | None = Field(
        default=None, description="operator keys only: the brand the rollout belongs to"
    )

    @field_validator("expires_at")
    @classmethod
    def _in_range(cls, value: datetime | None) -> datetime | None:
        # 9999-12-31T23:59:59-23:59 is a valid RFC 3339 time past Python's datetime in UTC
        # (and psycopg's): refused here, not a 500 when the row is read back.
        if value is not None:
            try:
                value.astimezone(UTC)
            except OverflowError:
                raise ValueError(
                    "expires_at: must fall within the years 1 to 9999 in UTC"
                ) from None
        return value


class RolloutStatus(StrEnum):
    CANARY = "canary"
    RUNNING = "running"
    PAUSED = "paused"
    ABORTED = "aborted"
    COMPLETED = "completed"


class GroupProgress(BaseModel):
    """Targets of one group by state: ``waiting`` (not pushed yet), ``pending`` and
    ``offline`` (pushed, no answer yet), ``applied``, ``rejected``, ``superseded`` (a newer
    table reached the device first), ``decommissioned`` (the device left the fleet before it
    answered)."""

    targets: int
    waiting: int
    pending: int
    offline: int
    applied: int
    rejected: int
    superseded: int
    decommissioned: int


class Progress(BaseModel):
    total: GroupProgress
    canary: GroupProgress | None
    rest: GroupProgress | None


class CanaryHealth(BaseModel):
    """Critical alerts first seen since the canary started, per device: the guard pauses the
    rollout when the canary's rate is at least twice the rest of the fleet's, from 3 alerts."""

    canary_devices: int
    canary_alerts: int
    canary_rate: float
    rest_devices: int
    rest_alerts: int
    rest_rate: float


class RolloutFields(BaseModel):
    """A rollout's own fields, as stored (``brand``: its brand's id)."""

    id: uuid.UUID
    brand: str
    mode_table_id: uuid.UUID
    target: RolloutTarget
    canary_share: float | None
    status: RolloutStatus
    paused_from: RolloutStatus | None
    status_reason: str | None
    expires_at: datetime | None
    created_at: datetime
    created_by: str
    updated_at: datetime
    canary_started_at: datetime | None
    fleet_started_at: datetime | None


class Rollout(RolloutFields):
    progress: Progress
    canary_health: CanaryHealth | None


class RolloutList(BaseModel):
    items: list[Rollout]
    next_cursor: str | None


class RolloutAction(BaseModel):
    model_config = body_config()

    note: str | None = Field(default=None, max_length=500)
