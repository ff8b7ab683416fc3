"""User schemas (api.md, "Users")."""

from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, Field

from services.api.schemas import body_config


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
    model_config = body_config({"stage": "maintenance", "contraindications": []})

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
