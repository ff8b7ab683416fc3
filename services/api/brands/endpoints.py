"""``POST /v1/brands`` and ``/v1/api-keys``: the operator creates brands; keys are issued
shown once, stored hashed, and revoked."""

import uuid

import psycopg
from fastapi import APIRouter, Response, status

from services.api.brands.schemas import Brand, BrandCreate, IssuedKey, KeyCreate, Me
from services.api.deps import BrandRepo, CurrentKey, require
from services.api.problems import ProblemError, constraint_problem, responses
from services.common.api_keys import Role

router = APIRouter(prefix="/v1", tags=["brands and keys"])
CREATED = status.HTTP_201_CREATED


@router.post(
    "/brands", response_model=Brand, status_code=CREATED, responses=responses(401, 403, 409, 422)
)
def create_brand(body: BrandCreate, brands: BrandRepo, key: CurrentKey) -> Brand:
    """Create a brand (operator)."""
    require(key, Role.OPERATOR)
    try:
        return brands.create(body.id, body.name)
    except psycopg.IntegrityError as exc:
        raise constraint_problem(exc, f"brand {body.id!r} already exists") or exc from None


@router.post(
    "/api-keys",
    response_model=IssuedKey,
    status_code=CREATED,
    responses=responses(401, 403, 404, 422),
)
def create_key(body: KeyCreate, brands: BrandRepo, key: CurrentKey) -> IssuedKey:
    """Issue a key (operator: any brand or an operator key; admin: its own brand's roles)."""
    require(key, Role.OPERATOR, Role.ADMIN)
    if (body.role is Role.OPERATOR) != (body.brand is None):
        raise ProblemError(
            422,
            "invalid-key",
            "Invalid key",
            "brand: an operator key has no brand, and every other key has one",
        )
    if (key.role is Role.ADMIN and body.brand != key.brand_id) or (
        body.brand is not None and not brands.exists(body.brand)
    ):
        raise ProblemError(404, "not-found", "Not found", f"there is no brand {body.brand!r}")
    issued = brands.issue_key(
        role=body.role, name=body.name, brand_id=body.brand, created_by=key.id
    )
    return IssuedKey(id=issued.id, key=issued.key, brand=body.brand, role=body.role, name=body.name)


@router.delete(
    "/api-keys/{key_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses=responses(401, 403, 404),
)
def revoke_key(key_id: uuid.UUID, brands: BrandRepo, key: CurrentKey) -> Response:
    """Revoke a key (operator: any; admin: its own brand's)."""
    require(key, Role.OPERATOR, Role.ADMIN)
    if not brands.revoke_key(key_id, key.brand_id):
        raise ProblemError(404, "not-found", "Not found", f"there is no key {key_id}")
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/me", response_model=Me, responses=responses(401))
def me(key: CurrentKey) -> Me:
    """Who the key belongs to: its role and brand (none for the operator)."""
    return Me(id=key.id, role=key.role, brand=key.brand_id, name=key.name)
