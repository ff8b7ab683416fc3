"""``GET /v1/config-signing-key``: the Ed25519 public keys devices verify mode tables with."""

import logging
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from services.api.deps import CurrentKey
from services.api.problems import responses
from services.common.signing import SigningKeyError, key_id, load_next_key, public_key_b64

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["mode tables"])


class TrustedKey(BaseModel):
    """A key devices should trust: the one tables are signed with, or the next one."""

    kid: str = Field(
        description="the key id a signed table names in its `kid`: the first 16 hex digits "
        "of the SHA-256 of the raw public key",
        examples=["4096066c96f56343"],
    )
    public_key: str = Field(description="base64 of the raw 32-byte Ed25519 public key")
    use: Literal["current", "next"] = Field(
        description="`current`: tables are signed with it now; `next`: a rotation is under "
        "way, and tables will be signed with it once devices trust it"
    )


class SigningKey(BaseModel):
    """The backend's mode-table signing keys (public halves)."""

    public_key: str = Field(
        description="base64 of the raw 32-byte Ed25519 public key tables are signed with now",
        examples=["8Nm3pV0w2o4b3mI1yq8n4tB2Xb0Qe4y9oYw5sJ8lq2c="],
    )
    algorithm: Literal["ed25519"] = "ed25519"
    kid: str = Field(description="the current key's id, as signed tables name it in `kid`")
    keys: list[TrustedKey] = Field(
        description="every key a device should trust: the current one and, during a key "
        "rotation, the next (docs/protocol.md, 'Signing keys')"
    )


@router.get("/config-signing-key", response_model=SigningKey, responses=responses(401))
def config_signing_key(request: Request, key: CurrentKey) -> SigningKey:
    """The keys a device is provisioned with to check every table's ``sig``."""
    current = request.app.state.signing_key
    keys = [TrustedKey(kid=key_id(current), public_key=public_key_b64(current), use="current")]
    # Read on each request: a next key created while the API runs is served at once.
    key_dir: Path = request.app.state.settings.key_dir()
    try:
        upcoming = load_next_key(key_dir)
    except SigningKeyError as exc:  # e.g. left readable by others: not served, and said why
        log.warning("the next config-signing key is not served: %s", exc)
        upcoming = None
    if upcoming is not None:
        keys.append(
            TrustedKey(kid=key_id(upcoming), public_key=public_key_b64(upcoming), use="next")
        )
    return SigningKey(public_key=keys[0].public_key, kid=keys[0].kid, keys=keys)
