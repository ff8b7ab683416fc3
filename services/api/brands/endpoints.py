"""``POST /v1/brands`` and ``/v1/api-keys``: the operator creates brands; keys are issued
shown once, stored hashed, and revoked."""

import uuid
from datetime import datetime

from fastapi import APIRouter, Response, status
from psycopg import errors
from pydantic import BaseModel, ConfigDict, Field

from services.api.deps import BRAND_ID_PATTERN, ConnDep, CurrentKey, require
from services.api.problems import ProblemError, responses
from services.common.api_keys import Role, issue_key

router = APIRouter(prefix="/v1", tags=["brands and keys"])


class BrandCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"id": "glowco", "name": "GlowCo"}]}
    )

    id: str = Field(pattern=BRAND_ID_PATTERN)
    name: str = Field(min_length=1, max_length=200)


class Brand(BaseModel):
    id: str
    name: str
    created_at: datetime


class KeyCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"brand": "glowco", "role": "support", "name": "desk"}]},
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


@router.post(
    "/brands",
    response_model=Brand,
    status_code=status.HTTP_201_CREATED,
    responses=responses(401, 403, 409, 422),
)
def create_brand(body: BrandCreate, conn: ConnDep, key: CurrentKey) -> Brand:
    """Create a brand (operator)."""
    require(key, Role.OPERATOR)
    try:
        with conn.transaction():
            row = conn.execute(
                "INSERT INTO brands (id, name) VALUES (%s, %s) RETURNING id, name, created_at",
                [body.id, body.name],
            ).fetchone()
    except errors.UniqueViolation:
        raise ProblemError(
            409, "brand-exists", "Brand exists", f"brand {body.id!r} already exists"
        ) from None
    assert row is not None
    return Brand(id=str(row[0]), name=str(row[1]), created_at=row[2])


@router.post(
    "/api-keys",
    response_model=IssuedKey,
    status_code=status.HTTP_201_CREATED,
    responses=responses(401, 403, 404, 422),
)
def create_key(body: KeyCreate, conn: ConnDep, key: CurrentKey) -> IssuedKey:
    """Issue a key (operator: any brand or an operator key; admin: its own brand's roles)."""
    require(key, Role.OPERATOR, Role.ADMIN)
    if (body.role is Role.OPERATOR) != (body.brand is None):
        raise ProblemError(
            422,
            "invalid-key",
            "Invalid key",
            "brand: an operator key has no brand, and every other key has one",
        )
    if key.role is Role.ADMIN and body.brand != key.brand_id:
        raise ProblemError(404, "not-found", "Not found", f"there is no brand {body.brand!r}")
    if body.brand is not None:
        exists = conn.execute("SELECT 1 FROM brands WHERE id = %s", [body.brand]).fetchone()
        if exists is None:
            raise ProblemError(404, "not-found", "Not found", f"there is no brand {body.brand!r}")
    issued = issue_key(conn, role=body.role, name=body.name, brand_id=body.brand, created_by=key.id)
    return IssuedKey(id=issued.id, key=issued.key, brand=body.brand, role=body.role, name=body.name)


@router.delete(
    "/api-keys/{key_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses=responses(401, 403, 404),
)
def revoke_key(key_id: uuid.UUID, conn: ConnDep, key: CurrentKey) -> Response:
    """Revoke a key (operator: any; admin: its own brand's)."""
    require(key, Role.OPERATOR, Role.ADMIN)
    row = conn.execute(
        "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now())"
        " WHERE id = %s AND (%s::text IS NULL OR brand_id = %s) RETURNING id",
        [key_id, key.brand_id, key.brand_id],
    ).fetchone()
    if row is None:
        raise ProblemError(404, "not-found", "Not found", f"there is no key {key_id}")
    return Response(status_code=status.HTTP_204_NO_CONTENT)


class Me(BaseModel):
    """The caller's key: what a client (the dashboard) shows and which actions it offers."""

    id: uuid.UUID
    role: Role
    brand: str | None
    name: str


@router.get("/me", response_model=Me, responses=responses(401))
def me(key: CurrentKey) -> Me:
    """Who the key belongs to: its role and brand (none for the operator)."""
    return Me(id=key.id, role=key.role, brand=key.brand_id, name=key.name)
