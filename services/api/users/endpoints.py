"""``PUT /v1/users/{id}`` and ``GET /v1/users/{id}/usage``."""

from typing import Annotated

from fastapi import APIRouter, Path

from services.api.deps import CurrentKey, UserRepo, require
from services.api.problems import ProblemError, responses
from services.api.users.schemas import Stage, Usage, User, UserUpdate, Window
from services.common.api_keys import Role
from services.rules.catalogue import DEFAULT_THRESHOLDS

router = APIRouter(prefix="/v1/users", tags=["users"])
UserId = Annotated[str, Path(min_length=1, max_length=128)]


@router.put("/{user_id}", response_model=User, responses=responses(401, 403, 422))
def put_user(user_id: UserId, body: UserUpdate, users: UserRepo, key: CurrentKey) -> User:
    """Create or update a user of the caller's brand (admin)."""
    require(key, Role.ADMIN)
    contraindications = sorted({c.value for c in body.contraindications})
    return users.put(key.brand, user_id, body.stage, contraindications)


@router.get("/{user_id}/usage", response_model=Usage, responses=responses(401, 403, 404))
def usage(user_id: UserId, users: UserRepo, key: CurrentKey) -> Usage:
    """Sessions and output-minutes over the rolling 24 hours and 7 days."""
    row = users.usage(key.brand, user_id)
    if row is None:
        raise ProblemError(404, "not-found", "Not found", f"there is no user {user_id!r}")
    stage = Stage(row.stage)
    name = "max_sessions_intro" if stage is Stage.INTRO else "max_sessions"
    return Usage(
        user=user_id,
        stage=stage,
        last_24h=Window(sessions=row.day_sessions, output_min=round(row.day_output_s / 60, 1)),
        last_7d=Window(sessions=row.week_sessions, output_min=round(row.week_output_s / 60, 1)),
        limit_sessions_7d=int(DEFAULT_THRESHOLDS.value("overuse_7d", name)),
        limit_output_min_7d=DEFAULT_THRESHOLDS.value("overuse_7d", "max_output_min"),
    )
