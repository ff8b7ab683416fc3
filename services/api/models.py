"""SQLModel tables of the API's own resources (the schema itself is the migrations').

Only what the API creates and edits row by row is mapped here; device data (samples,
sessions, events) is read with psycopg in bulk, and rollout targets are written with one
statement per rollout, not one ORM object per device.
"""

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Column, DateTime
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import Field, SQLModel


def _now() -> datetime:
    return datetime.now(UTC)


class ModeTableRow(SQLModel, table=True):
    """A brand's mode table as created: ``body`` holds ``modes`` and ``locked_modes``."""

    __tablename__ = "mode_tables"

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    brand_id: str
    name: str
    body: dict[str, Any] = Field(sa_column=Column(JSONB, nullable=False))
    created_at: datetime = Field(
        default_factory=_now, sa_column=Column(DateTime(timezone=True), nullable=False)
    )
    created_by: str


class RolloutRow(SQLModel, table=True):
    """A rollout: which table, to whom, and what it is doing now."""

    __tablename__ = "rollouts"

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    brand_id: str
    mode_table_id: uuid.UUID
    target: dict[str, Any] = Field(sa_column=Column(JSONB, nullable=False))
    canary_share: float | None = None
    status: str
    paused_from: str | None = None
    status_reason: str | None = None
    expires_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )
    created_at: datetime = Field(
        default_factory=_now, sa_column=Column(DateTime(timezone=True), nullable=False)
    )
    created_by: str
    updated_at: datetime = Field(
        default_factory=_now, sa_column=Column(DateTime(timezone=True), nullable=False)
    )
    canary_started_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )
    fleet_started_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )
