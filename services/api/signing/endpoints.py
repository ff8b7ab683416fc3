"""``GET /v1/config-signing-key``: the Ed25519 public key devices verify mode tables with."""

from typing import Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from services.api.deps import CurrentKey
from services.api.problems import responses

router = APIRouter(prefix="/v1", tags=["mode tables"])


class SigningKey(BaseModel):
    """The backend's mode-table signing key (public half)."""

    public_key: str = Field(
        description="base64 of the raw 32-byte Ed25519 public key",
        examples=["8Nm3pV0w2o4b3mI1yq8n4tB2Xb0Qe4y9oYw5sJ8lq2c="],
    )
    algorithm: Literal["ed25519"] = "ed25519"


@router.get("/config-signing-key", response_model=SigningKey, responses=responses(401))
def config_signing_key(request: Request, key: CurrentKey) -> SigningKey:
    """The key a device is provisioned with to check every table's ``sig``."""
    public_key: str = request.app.state.config_public_key
    return SigningKey(public_key=public_key)
