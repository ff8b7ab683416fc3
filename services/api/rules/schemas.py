"""Rule catalogue schemas."""

from typing import Annotated

from pydantic import BaseModel, Field

from services.api.schemas import body_config


class Threshold(BaseModel):
    """One threshold of a rule, as it applies to the caller's brand."""

    name: str
    unit: str
    default: float | None = Field(
        description="the catalogue's default; null: taken from the mode table the device runs"
    )
    value: float | None = Field(description="what applies to this brand")
    overridden: bool
    tighter: str = Field(description="`lower` or `higher`: which way tightens it")
    limit: float = Field(description="the loosest value a brand may set")
    tightest: float = Field(description="the tightest value that still means something")


class RuleOut(BaseModel):
    """A rule of the safety catalogue."""

    id: str
    version: int
    severity: str
    action: str
    summary: str
    thresholds: list[Threshold]


class RuleList(BaseModel):
    items: list[RuleOut]


class RulePatch(BaseModel):
    """New overrides: a number sets one, ``null`` returns it to the default."""

    model_config = body_config({"thresholds": {"total_s": 5}})

    thresholds: dict[str, Annotated[float, Field(strict=True, allow_inf_nan=False)] | None]
