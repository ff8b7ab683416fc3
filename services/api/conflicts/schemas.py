"""Conflict schemas (api.md, ``GET /v1/devices/{id}/conflicts``)."""

from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field


class ConflictReason(StrEnum):
    SEQ_REUSED = "seq_reused"
    SAMPLE_CONFLICT = "sample_conflict"


class Conflict(BaseModel):
    """A message ingest could not store in full, kept whole with the reason."""

    id: int
    reason: ConflictReason = Field(
        description="seq_reused: the device sent another payload under a seq it had used; "
        "sample_conflict: samples at times already stored with other readings"
    )
    channel: str = Field(description="telemetry, events or state")
    seq: int
    ts: datetime | None = Field(description="the message's time (telemetry: its first sample)")
    received_at: datetime
    detail: dict[str, Any] = Field(
        description="`crc32` of this payload; for seq_reused, `stored`: the CRC-32, time and "
        "receipt of the message its seq holds; for telemetry, `samples` and "
        "`conflicting_samples` (`ts`, `stored_seq`): times taken by other readings, whose "
        "samples of this message were not stored"
    )
    payload: Any = Field(description="the message as the device sent it; null if not JSON")
    payload_b64: str | None = Field(description="the payload in base64 when it is not JSON")
    payload_size: int


class ConflictList(BaseModel):
    items: list[Conflict]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null: none")
