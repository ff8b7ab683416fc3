"""``/v1/rollouts``: push a mode table to devices, optionally to a canary first; steer it."""

import uuid
from collections.abc import Callable, Sequence
from typing import Annotated

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import APIRouter, Body, Query, Request, Response, status
from sqlmodel import Session

from services.api.deps import (
    ApiKey,
    ConnDep,
    CurrentKey,
    SessionDep,
    after_commit,
    brand_scope,
    require,
)
from services.api.models import RolloutRow
from services.api.pagination import decode_time_cursor, encode_time_cursor, newest_first
from services.api.problems import responses
from services.api.publisher import ConfigPublisher
from services.api.responses import json_response
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
) -> Response:
    """The brand's rollouts, newest first, with their progress."""
    after = decode_time_cursor("rollouts", cursor) if cursor is not None else None
    rows = newest_first(session, RolloutRow, key.brand, after=after, limit=limit + 1)
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        next_cursor = encode_time_cursor("rollouts", rows[-1].created_at, rows[-1].id)
    return json_response(
        RolloutList(items=[service.to_schema(conn, row) for row in rows], next_cursor=next_cursor)
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
    key_ = _signing_key(request)
    return _steer(
        request, session, conn, key, brand, rollout_id,
        lambda row: service.promote(session, conn, key_, row, key.actor),
    )  # fmt: skip


@router.post(
    "/{rollout_id}/pause", response_model=Rollout, responses=responses(401, 403, 404, 409, 422)
)
def pause_rollout(
    rollout_id: uuid.UUID,
    request: Request,
    session: SessionDep,
    conn: ConnDep,
    key: CurrentKey,
    action: ActionBody = None,
    brand: BrandQuery = None,
) -> Rollout:
    """Hold a rollout in its canary stage: nothing more is pushed until it is resumed."""
    note = action.note if action else None
    return _steer(
        request, session, conn, key, brand, rollout_id,
        lambda row: service.pause(session, row, key.actor, note),
    )  # fmt: skip


@router.post(
    "/{rollout_id}/resume", response_model=Rollout, responses=responses(401, 403, 404, 409, 422)
)
def resume_rollout(
    rollout_id: uuid.UUID,
    request: Request,
    session: SessionDep,
    conn: ConnDep,
    key: CurrentKey,
    action: ActionBody = None,
    brand: BrandQuery = None,
) -> Rollout:
    """Return a paused rollout to the stage it was paused in."""
    note = action.note if action else None
    return _steer(
        request, session, conn, key, brand, rollout_id,
        lambda row: service.resume(session, row, key.actor, note),
    )  # fmt: skip


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
    note = action.note if action else None
    key_ = _signing_key(request)
    return _steer(
        request, session, conn, key, brand, rollout_id,
        lambda row: service.abort(session, conn, key_, row, key.actor, note),
    )  # fmt: skip


def _steer(
    request: Request,
    session: Session,
    conn: Conn,
    key: ApiKey,
    brand: str | None,
    rollout_id: uuid.UUID,
    step: Callable[[RolloutRow], Sequence[Push]],
) -> Rollout:
    """Lock the brand's rollout, take ``step``, publish its pushes after the commit."""
    require(key, Role.ADMIN, Role.OPERATOR)
    row = service.get_for_update(session, brand_scope(conn, key, brand), rollout_id)
    _publish_after_commit(request, step(row))
    session.flush()
    return service.to_schema(conn, row)
