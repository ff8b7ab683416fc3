"""``/v1/rollouts``: push a mode table to devices, optionally to a canary first; steer it."""

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import APIRouter, Body, Depends, Query, Request, Response, status

from services.api import deps
from services.api.deps import ApiKey, CurrentKey, require
from services.api.models import RolloutRow
from services.api.pagination import NewestFirst, newest_first
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
Page = Annotated[NewestFirst, newest_first(default=20, maximum=MAX_LIMIT)]
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
    responses=responses(401, 403, 404, 409, 422),
)
def create_rollout(
    body: RolloutCreate, request: Request, rollouts: deps.RolloutRepo, key: CurrentKey
) -> Rollout:
    """Fix the targets and push the table to the canary share (or to every target). Each
    device gets its next version, signed; devices a rule restricted keep the rule's locks."""
    require(key, Role.ADMIN, Role.OPERATOR)
    brand = deps.brand_scope(rollouts, key, body.brand)
    row, pushes = service.create(_steering(request, rollouts, key, None), brand, body)
    deps.publish_after_commit(request, pushes)
    return _answer(rollouts, brand, row.id)


@router.get("", response_model=RolloutList, responses=responses(401, 403, 422))
def list_rollouts(rollouts: deps.RolloutRepo, key: CurrentKey, asked: Page) -> Response:
    """The brand's rollouts, newest first, with their progress (one query for the page)."""
    views = rollouts.page(key.brand, after=asked.after, limit=asked.limit + 1)
    kept, next_cursor = asked.answer(views)
    items = [service.to_schema(view) for view in kept]
    return json_response(RolloutList(items=items, next_cursor=next_cursor))


@router.get("/{rollout_id}", response_model=Rollout, responses=responses(401, 403, 404, 422))
def get_rollout(rollout_id: uuid.UUID, rollouts: deps.RolloutRepo, key: CurrentKey) -> Rollout:
    """A rollout with its progress (from the devices' answers) and its canary's health."""
    return _answer(rollouts, key.brand, rollout_id)


@dataclass(frozen=True)
class _Steer:
    """What steering a rollout takes: the request (for the signing key and the publisher),
    the repository, the caller and the brand it names (operator keys)."""

    request: Request
    rollouts: RolloutRepository
    key: ApiKey
    brand: str | None

    def __call__(
        self, step: Step, rollout_id: uuid.UUID, action: RolloutAction | None = None
    ) -> Rollout:
        """Lock the brand's rollout, take ``step``, publish its pushes after the commit."""
        require(self.key, Role.ADMIN, Role.OPERATOR)
        brand = deps.brand_scope(self.rollouts, self.key, self.brand)
        row = self.rollouts.get_for_update(brand, rollout_id)
        if row is None:
            raise service.not_found(rollout_id)
        steering = _steering(self.request, self.rollouts, self.key, action)
        deps.publish_after_commit(self.request, step(steering, row))
        return _answer(self.rollouts, brand, rollout_id)


async def _steer(
    request: Request, rollouts: deps.RolloutRepo, key: CurrentKey, brand: BrandQuery = None
) -> _Steer:
    return _Steer(request, rollouts, key, brand)


Steer = Annotated[_Steer, Depends(_steer)]


@router.post("/{rollout_id}/promote", response_model=Rollout, responses=STEER_RESPONSES)
def promote_rollout(rollout_id: uuid.UUID, steer: Steer) -> Rollout:
    """From the canary stage: push the table to the rest of the targets."""
    return steer(service.promote, rollout_id)


@router.post("/{rollout_id}/pause", response_model=Rollout, responses=STEER_RESPONSES)
def pause_rollout(rollout_id: uuid.UUID, steer: Steer, action: ActionBody = None) -> Rollout:
    """Hold a rollout in its canary stage: nothing more is pushed until it is resumed."""
    return steer(service.pause, rollout_id, action)


@router.post("/{rollout_id}/resume", response_model=Rollout, responses=STEER_RESPONSES)
def resume_rollout(rollout_id: uuid.UUID, steer: Steer, action: ActionBody = None) -> Rollout:
    """Return a paused rollout to the stage it was paused in."""
    return steer(service.resume, rollout_id, action)


@router.post("/{rollout_id}/abort", response_model=Rollout, responses=STEER_RESPONSES)
def abort_rollout(rollout_id: uuid.UUID, steer: Steer, action: ActionBody = None) -> Rollout:
    """Stop the rollout; devices that have not applied its table get their previous one back."""
    return steer(service.abort, rollout_id, action)
