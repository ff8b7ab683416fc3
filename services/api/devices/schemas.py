"""Device schemas (api.md, "A device" and the provisioning answer)."""

from datetime import datetime

from pydantic import BaseModel, Field

from services.api.schemas import body_config
from services.common.provisioning import DEVICE_ID_RE


class DeviceCreate(BaseModel):
    model_config = body_config({"device_id": "glow-00042", "model": "glow-2"})

    device_id: str = Field(pattern=DEVICE_ID_RE.pattern)
    model: str = Field(min_length=1, max_length=64)
    user: str | None = Field(default=None, min_length=1, max_length=128)
    brand: str | None = Field(
        default=None, description="operator keys only: the brand the device belongs to"
    )


class MqttCredentials(BaseModel):
    """Shown once: the password is stored only as a hash."""

    host: str
    port: int
    username: str
    password: str
    client_id: str
    topic_prefix: str


class ProvisionedDevice(BaseModel):
    device_id: str
    mqtt: MqttCredentials


class Device(BaseModel):
    device_id: str
    brand: str
    model: str
    user: str | None
    online: bool
    last_seen: datetime | None
    fw: str | None
    last_seq: int | None
    seq_gaps: int
    config_desired_version: int | None
    config_reported_version: int | None
    open_alerts: int
    provisioned_at: datetime
    decommissioned_at: datetime | None
    seq_reused: int = Field(
        description="messages that came with a seq the device had already used for another "
        "message (kept in GET /v1/devices/{id}/conflicts)"
    )
    seq_reused_at: datetime | None = Field(description="when the latest of them was received")
    seq_resets: int = Field(
        description="runs of reused seqs: each is taken as the device's seq counter restarting "
        "(a factory reset, a lost outbox); a run begins after an hour without a reused seq"
    )
    seq_reset_at: datetime | None = Field(description="when the latest run began")
    suspect_samples_at: datetime | None = Field(
        description="when a sample with a suspect clock (device time more than 30 days before "
        "receipt or 5 minutes after) was last received; such samples are not in "
        "GET /v1/devices/{id}/telemetry but in GET /v1/devices/{id}/telemetry/suspect"
    )


class DeviceList(BaseModel):
    items: list[Device]
    next_cursor: str | None


class Session(BaseModel):
    """A session as ingest built it from the device's events and samples."""

    session: str
    user: str | None
    mode: str | None
    level: int | None
    started_at: datetime | None
    ended_at: datetime | None
    duration_s: float | None
    end_reason: str | None
    output_s: float
    samples: int
    gel_ok_share: float | None = Field(
        description="share of samples with output on whose impedance was in the gel band"
    )


class SessionList(BaseModel):
    items: list[Session]
    next_cursor: str | None


class Event(BaseModel):
    seq: int
    ts: datetime
    type: str
    session: str | None
    body: dict[str, object]
    received_at: datetime
    ts_suspect: bool


class EventList(BaseModel):
    items: list[Event]
    next_cursor: str | None


class PushRecord(BaseModel):
    """One table pushed to the device, and what the device answered."""

    version: int
    source: str
    reason: str
    sha256: str
    issued_at: datetime
    expires_at: datetime | None
    published_at: datetime | None
    superseded_at: datetime | None
    answer_status: str | None
    answer_reason: str | None
    answered_at: datetime | None


class DeviceConfig(BaseModel):
    """The table the backend wants the device to run, the one it reports, and the history."""

    desired_version: int | None
    desired: dict[str, object] | None = Field(description="the signed table, as published")
    reported_version: int | None = Field(description="0 or null: the factory defaults")
    reported_status: str | None
    reported_reason: str | None
    reported_sha256: str | None
    drift: bool = Field(
        description="true while the device does not run the desired table (not yet answered, "
        "rejected, or running another version)"
    )
    history: list[PushRecord]


class DeviceClear(BaseModel):
    """Support's note on why the device is safe to use again."""

    model_config = body_config()

    note: str | None = Field(default=None, max_length=500)
