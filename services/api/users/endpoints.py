"""``PUT /v1/users/{id}`` and ``GET /v1/users/{id}/usage``."""

from datetime import datetime
from enum import StrEnum
from typing import Annotated

from fastapi import APIRouter, Path
from pydantic import BaseModel, ConfigDict, Field

from services.api.deps import ConnDep, CurrentKey, require
from services.api.problems import ProblemError, responses
from services.common.api_keys import Role
from services.rules.catalogue import DEFAULT_THRESHOLDS

router = APIRouter(prefix="/v1/users", tags=["users"])
UserId = Annotated[str, Path(min_length=1, max_length=128)]


class Stage(StrEnum):
    INTRO = "intro"
    MAINTENANCE = "maintenance"


class Contraindication(StrEnum):
    PACEMAKER = "pacemaker"
    EPILEPSY = "epilepsy"
    PREGNANCY = "pregnancy"
    IMPLANT = "implant"
    SKIN_INFECTION = "skin_infection"


class UserUpdate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"stage": "maintenance", "contraindications": []}]},
    )

    stage: Stage
    contraindications: list[Contraindication] = Field(default_factory=list, max_length=5)


class User(BaseModel):
    id: str
    stage: Stage
    contraindications: list[Contraindication]
    updated_at: datetime


class Window(BaseModel):
    sessions: int
    output_min: float = Field(description="minutes with output on, from the sessions' samples")


class Usage(BaseModel):
    """Sessions started by the user on any of the brand's devices, in rolling windows."""

    user: str
    stage: Stage
    last_24h: Window
    last_7d: Window
    limit_sessions_7d: int = Field(description="the overuse_7d default for the user's stage")
    limit_output_min_7d: float


@router.put("/{user_id}", response_model=User, responses=responses(401, 403, 422))
def put_user(user_id: UserId, body: UserUpdate, conn: ConnDep, key: CurrentKey) -> User:
    """Create or update a user of the caller's brand (admin)."""
    require(key, Role.ADMIN)
    row = conn.execute(
        "INSERT INTO users (brand_id, id, stage, contraindications) VALUES (%s, %s, %s, %s)"
        " ON CONFLICT (brand_id, id) DO UPDATE SET stage = EXCLUDED.stage,"
        " contraindications = EXCLUDED.contraindications, updated_at = now()"
        " RETURNING id, stage, contraindications, updated_at",
        [
            key.brand,
            user_id,
            body.stage.value,
            sorted({c.value for c in body.contraindications}),
        ],
    ).fetchone()
    assert row is not None
    names = ("id", "stage", "contraindications", "updated_at")
    return User.model_validate(dict(zip(names, row, strict=True)))


@router.get("/{user_id}/usage", response_model=Usage, responses=responses(401, 403, 404))
def usage(user_id: UserId, conn: ConnDep, key: CurrentKey) -> Usage:
    """Sessions and output-minutes over the rolling 24 hours and 7 days."""
    user = conn.execute(
        "SELECT stage FROM users WHERE brand_id = %s AND id = %s", [key.brand, user_id]
    ).fetchone()
    if user is None:
        raise ProblemError(404, "not-found", "Not found", f"there is no user {user_id!r}")
    row = conn.execute(
        "SELECT count(*) FILTER (WHERE started_at > now() - interval '24 hours'),"
        " coalesce(sum(output_s) FILTER (WHERE started_at > now() - interval '24 hours'), 0),"
        " count(*), coalesce(sum(output_s), 0)"
        " FROM sessions WHERE brand_id = %s AND user_id = %s"
        " AND started_at > now() - interval '7 days'",
        [key.brand, user_id],
    ).fetchone()
    assert row is not None
    day_n, day_s, week_n, week_s = row
    stage = Stage(str(user[0]))
    name = "max_sessions_intro" if stage is Stage.INTRO else "max_sessions"
    return Usage(
        user=user_id,
        stage=stage,
        last_24h=Window(sessions=int(str(day_n)), output_min=round(float(str(day_s)) / 60, 1)),
        last_7d=Window(sessions=int(str(week_n)), output_min=round(float(str(week_s)) / 60, 1)),
        limit_sessions_7d=int(DEFAULT_THRESHOLDS.value("overuse_7d", name)),
        limit_output_min_7d=DEFAULT_THRESHOLDS.value("overuse_7d", "max_output_min"),
    )
