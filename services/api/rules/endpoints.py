"""``GET /v1/rules`` and ``PATCH /v1/rules/{id}``: the catalogue with the brand's thresholds.

Each rule has a ``PATCH`` operation of its own in the OpenAPI document, whose body names that
rule's thresholds and their ranges: one operation for every rule could only say "a map of
numbers", and a generated client would send names and values the server refuses.
"""

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel

from services.api.deps import ApiKey, CurrentKey, RuleRepo, require
from services.api.problems import ProblemError, responses
from services.api.rules.repository import RuleRepository
from services.api.rules.schemas import RuleList, RuleOut, Threshold, rule_patch_model
from services.common.api_keys import Role
from services.rules.catalogue import RULES, Rule, ThresholdError, Thresholds

router = APIRouter(prefix="/v1/rules", tags=["rules"])


def _out(rule: Rule, thresholds: Thresholds) -> RuleOut:
    overrides = thresholds.overrides.get(rule.id, {})
    return RuleOut(
        id=rule.id,
        version=rule.version,
        severity=rule.severity.value,
        action=rule.action.value,
        summary=rule.summary,
        thresholds=[
            Threshold(
                name=p.name,
                unit=p.unit,
                default=p.default,
                value=thresholds.get(rule.id, p.name),
                overridden=p.name in overrides,
                tighter=p.tighter.value,
                limit=p.limit,
                tightest=p.tightest,
            )
            for p in rule.params
        ],
    )


@router.get("", response_model=RuleList, responses=responses(401, 403))
def list_rules(rules: RuleRepo, key: CurrentKey) -> RuleList:
    """Every rule, with the thresholds that apply to the caller's brand."""
    thresholds = rules.thresholds(key.brand)
    return RuleList(items=[_out(rule, thresholds) for rule in RULES])


def patch_rule(rule: Rule, patch: BaseModel, rules: RuleRepository, key: ApiKey) -> RuleOut:
    """Tighten (or return to default) ``rule``'s thresholds for the caller's brand."""
    require(key, Role.ADMIN)
    current: dict[str, Any] = dict(rules.thresholds(key.brand).overrides.get(rule.id, {}))
    thresholds = getattr(patch, "thresholds")  # noqa: B009 - a model built per rule
    for name, value in thresholds.model_dump(exclude_unset=True).items():
        if value is None:
            current.pop(name, None)
        else:
            current[name] = value
    try:
        rules.save_overrides(key.brand, rule.id, current, key.actor)
    except ThresholdError as exc:
        kind = "threshold-outside-envelope" if exc.limit is not None else "unknown-threshold"
        raise ProblemError(
            422,
            kind,
            "Threshold refused",
            str(exc),
            errors=[
                {"field": f"thresholds.{exc.param}", "message": exc.message, "limit": exc.limit}
            ],
        ) from None
    return _out(rule, rules.thresholds(key.brand))


def _add_patch(rule: Rule) -> None:
    body: Any = rule_patch_model(rule)

    def patch(patch: body, rules: RuleRepo, key: CurrentKey) -> RuleOut:
        return patch_rule(rule, patch, rules, key)

    patch.__doc__ = f"Tighten (or return to default) the thresholds of {rule.id} for the brand."
    router.patch(
        f"/{rule.id}",
        response_model=RuleOut,
        responses=responses(401, 403, 422),
        name=f"patch_rule_{rule.id}",
        summary=f"Patch rule {rule.id}",
    )(patch)


for _rule in RULES:
    _add_patch(_rule)
