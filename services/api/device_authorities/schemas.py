"""Device authority schemas: a brand's factory CA as registered."""

from datetime import datetime

from pydantic import BaseModel, Field

from services.api.schemas import body_config


class DeviceAuthorityCreate(BaseModel):
    model_config = body_config({"certificate": "-----BEGIN CERTIFICATE-----\n..."})

    certificate: str = Field(
        min_length=1,
        max_length=65_536,
        description="the brand's factory CA certificate (PEM): a CA (basicConstraints CA:TRUE) "
        "valid now",
    )


class DeviceAuthority(BaseModel):
    """A brand's factory CA: devices with a certificate it signed (CN = the device id) can be
    provisioned with it, and get a Galvani certificate for the same key."""

    id: int
    subject: str = Field(description="the CA's subject, RFC 4514")
    fingerprint: str = Field(description="SHA-256 of the DER certificate, hexadecimal")
    certificate: str
    not_after: datetime
    created_at: datetime


class DeviceAuthorityList(BaseModel):
    items: list[DeviceAuthority]
    next_cursor: str | None
