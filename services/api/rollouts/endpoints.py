"""``/v1/rollouts``: push a mode table to devices, optionally to a canary first; steer it."""

import uuid
from collections.abc import Callable, Sequence
from typing import Annotated

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import APIRouter, Body, Query, Request, Response, status

from services.api.deps import (
    ApiKey,
    CurrentKey,
    RolloutRepo,
    brand_scope,
    publish_after_commit,
    require,
)
from services.api.models import RolloutRow
from services.api.pagination import decode_time_cursor, encode_time_cursor, page
from services.api.problems import responses
from services.api.responses import json_response
from services.api.rollouts import service
from services.api.rollouts.repository import RolloutRepository
from services.api.rollouts.schemas import Rollout, RolloutAction, RolloutCreate, RolloutList
from services.common.api_keys import Role
from services.common.config_push import Push

router = APIRouter(prefix="/v1/rollouts", tags=["rollouts"])
MAX_LIMIT = 100

BrandQuery = Annotated[
    str | None, Query(max_length=64, description="operator keys only: the rollout's brand")
]
ActionBody = Annotated[RolloutAction | None, Body()]
STEER_RESPONSES = responses(401, 403, 404, 409, 422)
# A step of the lifecycle (rollouts/service.py) on the locked row: the pushes it recorded.
Step = Callable[[service.Steering, RolloutRow], Sequence[Push]]


def _steering(
    request: Request, rollouts: RolloutRepository, key: ApiKey, action: RolloutAction | None
) -> service.Steering:
    signing_key: Ed25519PrivateKey = request.app.state.signing_key
    return service.Steering(rollouts, signing_key, key.actor, action.note if action else None)


def _answer(rollouts: RolloutRepository, brand: str, rollout_id: uuid.UUID) -> Rollout:
    view = rollouts.view(brand, rollout_id)
    if view is None:
        raise service.not_found(rollout_id)
    return service.to_schema(view)


@router.post(
    "",
    response_model=Rollout,
    status_code=status.HTTP_201_CREATED,
    responses=responses(401, 403, 404, 422),
)
def create_rollout(
    body: RolloutCreate, request: Request, rollouts: RolloutRepo, key: CurrentKey
) -> Rollout:
    """Fix the targets and push the table to the canary share (or to every target). Each
    device gets its next version, signed; devices a rule restricted keep the rule's locks."""
    require(key, Role.ADMIN, Role.OPERATOR)
    brand = brand_scope(rollouts, key, body.brand)
    row, pushes = service.create(_steering(request, rollouts, key, None), brand, body)
    publish_after_commit(request, pushes)
    return _answer(rollouts, brand, row.id)


@router.get("", response_model=RolloutList, responses=responses(401, 403, 422))
def list_rollouts(
    rollouts: RolloutRepo,
    key: CurrentKey,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 20,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> Response:
    """The brand's rollouts, newest first, with their progress (one query for the page)."""
    after = decode_time_cursor("rollouts", cursor) if cursor is not None else None
    views = rollouts.page(key.brand, after=after, limit=limit + 1)
    kept, next_cursor = page(
        views, limit, lambda view: encode_time_cursor("rollouts", view.created_at, view.id)
    )
    items = [service.to_schema(view) for view in kept]
    return json_response(RolloutList(items=items, next_cursor=next_cursor))


@router.get("/{rollout_id}", response_model=Rollout, responses=responses(401, 403, 404, 422))
def get_rollout(rollout_id: uuid.UUID, rollouts: RolloutRepo, key: CurrentKey) -> Rollout:
    """A rollout with its progress (from the devices' answers) and its canary's health."""
    return _answer(rollouts, key.brand, rollout_id)


def _steer(
    step: Step,
    rollout_id: uuid.UUID,
    request: Request,
    rollouts: RolloutRepository,
    key: ApiKey,
    brand: str | None,
    action: RolloutAction | None,
) -> Rollout:
    """Lock the brand's rollout, take ``step``, publish its pushes after the commit."""
    require(key, Role.ADMIN, Role.OPERATOR)
    scope = brand_scope(rollouts, key, brand)
    row = rollouts.get_for_update(scope, rollout_id)
    if row is None:
        raise service.not_found(rollout_id)
    publish_after_commit(request, step(_steering(request, rollouts, key, action), row))
    return _answer(rollouts, scope, rollout_id)


@router.post("/{rollout_id}/promote", response_model=Rollout, responses=STEER_RESPONSES)
def promote_rollout(
    rollout_id: uuid.UUID,
    request: Request,
    rollouts: RolloutRepo,
    key: CurrentKey,
    brand: BrandQuery = None,
) -> Rollout:
    """From the canary stage: push the table to the rest of the targets."""
    return _steer(service.promote, rollout_id, request, rollouts, key, brand, None)


@router.post("/{rollout_id}/pause", response_model=Rollout, responses=STEER_RESPONSES)
def pause_rollout(
    rollout_id: uuid.UUID,
    request: Request,
    rollouts: RolloutRepo,
    key: CurrentKey,
    action: ActionBody = None,
    brand: BrandQuery = None,
) -> Rollout:
    """Hold a rollout in its canary stage: nothing more is pushed until it is resumed."""
    return _steer(service.pause, rollout_id, request, rollouts, key, brand, action)


@router.post("/{rollout_id}/resume", response_model=Rollout, responses=STEER_RESPONSES)
def resume_rollout(
    rollout_id: uuid.UUID,
    request: Request,
    rollouts: RolloutRepo,
    key: CurrentKey,
    action: ActionBody = None,
    brand: BrandQuery = None,
) -> Rollout:
    """Return a paused rollout to the stage it was paused in."""
    return _steer(service.resume, rollout_id, request, rollouts, key, brand, action)


@router.post("/{rollout_id}/abort", response_model=Rollout, responses=STEER_RESPONSES)
def abort_rollout(
    rollout_id: uuid.UUID,
    request: Request,
    rollouts: RolloutRepo,
    key: CurrentKey,
    action: ActionBody = None,
    brand: BrandQuery = None,
) -> Rollout:
    """Stop the rollout; devices that have not applied its table get their previous one back."""
    return _steer(service.abort, rollout_id, request, rollouts, key, brand, action)
