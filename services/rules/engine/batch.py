"""One evaluation's state: the transaction, the signing key, the contexts read so far, and
what was raised and resolved."""

from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from services.common.db import Conn
from services.rules.alerts import Finding, Outcome, apply_finding, resolve
from services.rules.context import DeviceContext, load_contexts, load_user


@dataclass
class Batch:
    """One evaluation: the transaction's connection, the signing key, what was found."""

    conn: Conn
    key: Ed25519PrivateKey
    contexts: dict[str, DeviceContext]
    outcome: Outcome = field(default_factory=Outcome)
    # Devices whose no_contact alert this batch raised (it may clear within the batch).
    raised_no_contact: set[str] = field(default_factory=set)
    stages: dict[tuple[str, str], str] = field(default_factory=dict)

    def context(self, device_id: str) -> DeviceContext | None:
        """A device's context, loaded on first use (other devices of a user)."""
        if device_id not in self.contexts:
            self.contexts.update(load_contexts(self.conn, [device_id]))
        return self.contexts.get(device_id)

    def stage(self, brand_id: str, user_key: str) -> str:
        """The stage of the user a session counts for (``intro`` without a known user)."""
        kind, _, name = user_key.partition(":")
        if kind != "user":
            return "intro"
        if (brand_id, name) not in self.stages:
            self.stages[(brand_id, name)] = load_user(self.conn, brand_id, name).stage
        return self.stages[(brand_id, name)]

    def resolve(self, alert_id: int, resolution: str) -> None:
        """Resolve an alert whose condition cleared."""
        if resolve(self.conn, alert_id, resolution):
            self.outcome.resolved += 1

    def raise_(self, finding: Finding | None) -> None:
        """Count a check's finding (nothing when the check found none)."""
        if finding is None:
            return
        context = self.context(finding.device_id)
        if context is None:
            return
        if finding.rule == "no_contact":
            self.raised_no_contact.add(finding.device_id)
        apply_finding(self.conn, self.key, context, finding, self.outcome)
