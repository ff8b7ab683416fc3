"""``/v1/rollouts``: push a mode table to devices, optionally to a canary first; steer it."""

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Annotated

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import APIRouter, Body, Query, Request, status

from services.api.deps import ConnDep, CurrentKey, SessionDep, after_commit, brand_scope, require
from services.api.pagination import decode_cursor, encode_cursor, invalid_cursor
from services.api.problems import responses
from services.api.publisher import ConfigPublisher
from services.api.rollouts import service
from services.api.rollouts.schemas import Rollout, RolloutAction, RolloutCreate, RolloutList
from services.common.api_keys import Role
from services.common.config_push import Push
from services.common.db import Conn

router = APIRouter(prefix="/v1/rollouts", tags=["rollouts"])
MAX_LIMIT = 100

BrandQuery = Annotated[
    str | None, Query(max_length=64, description="operator keys only: the rollout's brand")
]
ActionBody = Annotated[RolloutAction | None, Body()]


def _signing_key(request: Request) -> Ed25519PrivateKey:
    key: Ed25519PrivateKey = request.app.state.signing_key
    return key


def _publish_after_commit(request: Request, pushes: Sequence[Push]) -> None:
    publisher: ConfigPublisher = request.app.state.config_publisher

    def publish(_: Conn) -> None:
        publisher.submit(pushes)

    if pushes:
        after_commit(request, publish)


@router.post(
    "",
    response_model=Rollout,
    status_code=status.HTTP_201_CREATED,
    responses=responses(401, 403, 404, 422),
)
def create_rollout(
    body: RolloutCreate, request: Request, session: SessionDep, conn: ConnDep, key: CurrentKey
) -> Rollout:
    """Fix the targets and push the table to the canary share (or to every target). Each
    device gets its next version, signed; devices a rule restricted keep the rule's locks."""
    require(key, Role.ADMIN, Role.OPERATOR)
    brand = brand_scope(conn, key, body.brand)
    row, pushes = service.create(session, conn, _signing_key(request), brand, body, key.actor)
    _publish_after_commit(request, pushes)
    return service.to_schema(conn, row)


@router.get("", response_model=RolloutList, responses=responses(401, 403, 422))
def list_rollouts(
    session: SessionDep,
    conn: ConnDep,
    key: CurrentKey,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 20,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> RolloutList:
    """The brand's rollouts, newest first, with their progress."""
    after = None
    if cursor is not None:
        created, rollout_id = decode_cursor("rollouts", cursor, 2)
        try:
            after = (datetime.fromisoformat(created), uuid.UUID(rollout_id))
        except ValueError:
            raise invalid_cursor() from None
    rows = service.newest_first(session, key.brand, after=after, limit=limit + 1)
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        next_cursor = encode_cursor("rollouts", rows[-1].created_at.isoformat(), str(rows[-1].id))
    return RolloutList(
        items=[service.to_schema(conn, row) for row in rows], next_cursor=next_cursor
    )


@router.get("/{rollout_id}", response_model=Rollout, responses=responses(401, 403, 404, 422))
def get_rollout(
    rollout_id: uuid.UUID, session: SessionDep, conn: ConnDep, key: CurrentKey
) -> Rollout:
    """A rollout with its progress (from the devices' answers) and its canary's health."""
    return service.to_schema(conn, service.get(session, key.brand, rollout_id))


@router.post(
    "/{rollout_id}/promote", response_model=Rollout, responses=responses(401, 403, 404, 409, 422)
)
def promote_rollout(
    rollout_id: uuid.UUID,
    request: Request,
    session: SessionDep,
    conn: ConnDep,
    key: CurrentKey,
    brand: BrandQuery = None,
) -> Rollout:
    """From the canary stage: push the table to the rest of the targets."""
    require(key, Role.ADMIN, Role.OPERATOR)
    row = service.get_for_update(session, brand_scope(conn, key, brand), rollout_id)
    pushes = service.promote(session, conn, _signing_key(request), row, key.actor)
    _publish_after_commit(request, pushes)
    session.flush()
    return service.to_schema(conn, row)


@router.post(
    "/{rollout_id}/pause", response_model=Rollout, responses=responses(401, 403, 404, 409, 422)
)
def pause_rollout(
    rollout_id: uuid.UUID,
    session: SessionDep,
    conn: ConnDep,
    key: CurrentKey,
    action: ActionBody = None,
    brand: BrandQuery = None,
) -> Rollout:
    """Hold a rollout in its canary stage: nothing more is pushed until it is resumed."""
    require(key, Role.ADMIN, Role.OPERATOR)
    row = service.get_for_update(session, brand_scope(conn, key, brand), rollout_id)
    service.pause(session, row, key.actor, action.note if action else None)
    session.flush()
    return service.to_schema(conn, row)


@router.post(
    "/{rollout_id}/resume", response_model=Rollout, responses=responses(401, 403, 404, 409, 422)
)
def resume_rollout(
    rollout_id: uuid.UUID,
    session: SessionDep,
    conn: ConnDep,
    key: CurrentKey,
    action: ActionBody = None,
    brand: BrandQuery = None,
) -> Rollout:
    """Return a paused rollout to the stage it was paused in."""
    require(key, Role.ADMIN, Role.OPERATOR)
    row = service.get_for_update(session, brand_scope(conn, key, brand), rollout_id)
    service.resume(session, row, key.actor, action.note if action else None)
    session.flush()
    return service.to_schema(conn, row)


@router.post(
    "/{rollout_id}/abort", response_model=Rollout, responses=responses(401, 403, 404, 409, 422)
)
def abort_rollout(
    rollout_id: uuid.UUID,
    request: Request,
    session: SessionDep,
    conn: ConnDep,
    key: CurrentKey,
    action: ActionBody = None,
    brand: BrandQuery = None,
) -> Rollout:
    """Stop the rollout; devices that have not applied its table get their previous one back."""
    require(key, Role.ADMIN, Role.OPERATOR)
    row = service.get_for_update(session, brand_scope(conn, key, brand), rollout_id)
    pushes = service.abort(
        session, conn, _signing_key(request), row, key.actor, action.note if action else None
    )
    _publish_after_commit(request, pushes)
    return service.to_schema(conn, row)
