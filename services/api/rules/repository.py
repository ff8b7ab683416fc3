"""A brand's rule thresholds, through the rules engine's own functions (one definition of how
overrides are stored and checked). Never commits: the request's unit of work owns the
transaction."""

from collections.abc import Mapping

from services.api.repository import Repository
from services.rules.catalogue import Thresholds
from services.rules.context import load_thresholds, save_overrides


class RuleRepository(Repository):
    """Thresholds on the read-write unit."""

    def thresholds(self, brand_id: str) -> Thresholds:
        """The thresholds that apply to the brand: the catalogue's, with its overrides."""
        return load_thresholds(self.conn, [brand_id])[brand_id]

    def save_overrides(
        self, brand_id: str, rule_id: str, overrides: Mapping[str, object], actor: str
    ) -> None:
        """Replace the brand's overrides of one rule; raises the catalogue's
        ``ThresholdError`` for a value past its limit or an unknown name."""
        save_overrides(self.conn, brand_id, rule_id, overrides, actor)
