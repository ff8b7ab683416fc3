"""``GET /v1/rules`` and ``PATCH /v1/rules/{id}``: the catalogue with the brand's thresholds."""

from fastapi import APIRouter

from services.api.deps import CurrentKey, RuleRepo, require
from services.api.problems import ProblemError, responses
from services.api.rules.schemas import RuleList, RuleOut, RulePatch, Threshold
from services.common.api_keys import Role
from services.rules.catalogue import BY_ID, RULES, Rule, ThresholdError, Thresholds

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


@router.patch("/{rule_id}", response_model=RuleOut, responses=responses(401, 403, 404, 422))
def patch_rule(rule_id: str, patch: RulePatch, rules: RuleRepo, key: CurrentKey) -> RuleOut:
    """Tighten (or return to default) a rule's thresholds for the caller's brand."""
    require(key, Role.ADMIN)
    rule = BY_ID.get(rule_id)
    if rule is None:
        raise ProblemError(404, "not-found", "Not found", f"there is no rule {rule_id!r}")
    current = dict(rules.thresholds(key.brand).overrides.get(rule_id, {}))
    for name, value in patch.thresholds.items():
        if value is None:
            current.pop(name, None)
        else:
            current[name] = value
    try:
        rules.save_overrides(key.brand, rule_id, current, key.actor)
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
