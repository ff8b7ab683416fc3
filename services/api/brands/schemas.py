"""Brand and API key schemas (api.md, "Brands and keys")."""

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from services.api.schemas import body_config
from services.common.api_keys import Role

BRAND_ID_PATTERN = r"^[a-z0-9][a-z0-9-]{1,63}$"  # a brand's id, as POST /v1/brands takes it


class BrandCreate(BaseModel):
    model_config = body_config({"id": "glowco", "name": "GlowCo"})

    id: str = Field(pattern=BRAND_ID_PATTERN)
    name: str = Field(min_length=1, max_length=200)


class Brand(BaseModel):
    id: str
    name: str
    created_at: datetime


def _brand_by_role(schema: dict[str, Any]) -> None:
    """An operator key has no brand and every other key has one: said in the schema, so a
    generated client never sends a pair the endpoint refuses."""
    others = [role.value for role in Role if role is not Role.OPERATOR]
    schema["oneOf"] = [
        {"properties": {"role": {"const": Role.OPERATOR.value}, "brand": {"type": "null"}}},
        {
            "properties": {"role": {"enum": others}, "brand": {"type": "string"}},
            "required": ["brand"],
        },
    ]


class KeyCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra=lambda schema, _: _brand_by_role(schema),
    )

    brand: str | None = Field(default=None, description="null only for an operator key")
    role: Role
    name: str = Field(min_length=1, max_length=200)


class IssuedKey(BaseModel):
    """The key itself is in this response only; it is stored as a SHA-256 digest."""

    id: uuid.UUID
    key: str
    brand: str | None
    role: Role
    name: str


class Me(BaseModel):
    """The caller's key: what a client (the dashboard) shows and which actions it offers."""

    id: uuid.UUID
    role: Role
    brand: str | None
    name: str
