"""Device schemas (api.md, "A device" and the provisioning answer)."""

from datetime import datetime
from typing import Literal, Self

from pydantic import BaseModel, Field, model_validator

from services.api.schemas import body_config
from services.common.provisioning import DEVICE_ID_RE

CSR_MAX_CHARS = 16_384
CERTIFICATE_MAX_CHARS = 65_536
CSR_FIELD = Field(
    default=None,
    min_length=1,
    max_length=CSR_MAX_CHARS,
    description="a PEM certificate signing request the device made (its key never leaves it): "
    "EC P-256/P-384 or RSA of 2048 bits or more, self-signature valid, CN absent or the "
    "device id",
)
FACTORY_FIELD = Field(
    default=None,
    min_length=1,
    max_length=CERTIFICATE_MAX_CHARS,
    description="instead of a CSR: the device's factory certificate (PEM), CN the device id, "
    "signed by one of the brand's device authorities (POST /v1/device-authorities); the "
    "answer certifies the same key (EC P-256/P-384)",
)


class CertificateRequestBody(BaseModel):
    """A CSR or a factory certificate, exactly one."""

    csr: str | None = CSR_FIELD
    certificate: str | None = FACTORY_FIELD

    @model_validator(mode="after")
    def _one_request(self) -> Self:
        if (self.csr is None) == (self.certificate is None):
            raise ValueError("send exactly one of csr and certificate")
        return self


class DeviceCreate(BaseModel):
    model_config = body_config({"device_id": "glow-00042", "model": "glow-2"})

    device_id: str = Field(pattern=DEVICE_ID_RE.pattern)
    model: str = Field(min_length=1, max_length=64)
    user: str | None = Field(default=None, min_length=1, max_length=128)
    brand: str | None = Field(
        default=None, description="operator keys only: the brand the device belongs to"
    )
    auth: Literal["password", "certificate"] = Field(
        default="password",
        description="password: the answer carries a broker password; certificate: send `csr` "
        "or `certificate`, and the answer carries the device's certificate",
    )
    csr: str | None = CSR_FIELD
    certificate: str | None = FACTORY_FIELD

    @model_validator(mode="after")
    def _request_matches_auth(self) -> Self:
        given = (self.csr is not None) + (self.certificate is not None)
        if self.auth == "password" and given:
            raise ValueError('csr and certificate go with "auth": "certificate"')
        if self.auth == "certificate" and given != 1:
            raise ValueError('"auth": "certificate" needs exactly one of csr and certificate')
        return self


class MqttCredentials(BaseModel):
    """Shown once: the password is stored only as a hash."""

    host: str
    port: int = Field(
        description="the device listener (password), or the certificate listener (certificate)"
    )
    username: str
    password: str | None = Field(description="null for a device with a certificate")
    client_id: str
    topic_prefix: str


class ProvisionedDevice(BaseModel):
    device_id: str
    auth: Literal["password", "certificate"]
    mqtt: MqttCredentials
    certificate: str | None = Field(
        default=None, description="the device's certificate (PEM), signed by Galvani's device CA"
    )
    not_after: datetime | None = Field(default=None, description="when the certificate expires")


class IssuedCertificate(BaseModel):
    """A new certificate for a device (rotation): the ones it had stay valid until they expire."""

    device_id: str
    certificate: str = Field(description="PEM, signed by Galvani's device CA")
    serial: str = Field(description="the serial number, hexadecimal")
    fingerprint: str = Field(description="SHA-256 of the DER certificate, hexadecimal")
    not_before: datetime
    not_after: datetime


class DeviceCertificate(BaseModel):
    """A certificate Galvani issued to the device."""

    id: int
    serial: str = Field(description="the serial number, hexadecimal")
    fingerprint: str
    not_before: datetime
    not_after: datetime
    issued_at: datetime
    revoked_at: datetime | None
    authority_id: int | None = Field(
        description="the brand's device authority that vouched for the key (null: a CSR)"
    )


class DeviceCertificateList(BaseModel):
    items: list[DeviceCertificate]
    next_cursor: str | None


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
    auth: Literal["password", "certificate"] = Field(
        description="how the device authenticates to the broker"
    )
    not_after: datetime | None = Field(
        description="when the latest of its unrevoked certificates expires (null: none)"
    )
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
