"""Rule catalogue schemas."""

from typing import Annotated, Any

from pydantic import BaseModel, Field, create_model
from pydantic.config import JsonDict

from services.api.schemas import body_config
from services.rules.catalogue import Param, Rule


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


def _threshold(param: Param) -> Any:
    """A threshold's value in a patch: a finite number from the tightest value that means
    something to the loosest a brand may set (both said in the schema), or ``null``. The
    catalogue checks the range itself, so a refusal names the limit."""
    low, high = sorted((param.tightest, param.limit))
    bounds: JsonDict = {"minimum": low, "maximum": high}
    value = Annotated[
        float | None,
        Field(
            default=None,
            strict=True,
            allow_inf_nan=False,
            description=f"{param.unit}; tighter is {param.tighter.value}; null: the default",
            json_schema_extra=bounds,
        ),
    ]
    return value


def rule_patch_model(rule: Rule) -> type[BaseModel]:
    """The body of ``PATCH /v1/rules/{rule.id}``: its ``thresholds`` name exactly that rule's
    thresholds (a name is set, ``null`` returns it to the default, absent leaves it)."""
    name = "".join(part.title() for part in rule.id.split("_"))
    thresholds = create_model(
        f"{name}Thresholds",
        __config__=body_config(),
        **{param.name: _threshold(param) for param in rule.params},
    )
    example: JsonDict = {p.name: p.limit for p in rule.params[:1]}
    return create_model(
        f"{name}Patch",
        __config__=body_config({"thresholds": example}),
        thresholds=(thresholds, ...),
    )
