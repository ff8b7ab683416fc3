"""Checks on device certificates (run by the periodic sweep): one about to expire."""

from dataclasses import dataclass
from datetime import datetime, timedelta

from services.rules.alerts import Finding
from services.rules.context import DeviceContext
from services.rules.explain import say

RULE = "certificate_expiring"


@dataclass(frozen=True)
class CertificateRow:
    """A device's newest unrevoked certificate (the one that expires last)."""

    device_id: str
    serial: int
    not_after: datetime


def lead_time(context: DeviceContext) -> timedelta:
    """How long before a certificate expires its brand wants to hear of it."""
    return timedelta(days=context.thresholds.value(RULE, "days_before"))


def certificate_expiring(
    context: DeviceContext, certificate: CertificateRow, now: datetime
) -> Finding | None:
    """certificate_expiring: the device's newest certificate expires within ``days_before``
    days (or has expired). One occurrence per certificate (keyed by its serial)."""
    lead = lead_time(context)
    left = certificate.not_after - now
    if left > lead:
        return None
    days_left = left.total_seconds() / 86_400
    expired = days_left <= 0
    return Finding(
        rule=RULE,
        device_id=context.device_id,
        started_at=certificate.not_after - lead,
        ended_at=certificate.not_after,
        threshold={"days_before": lead.days},
        observed={
            "serial": f"{certificate.serial:x}",
            "not_after": certificate.not_after.isoformat(),
            "days_left": round(days_left, 2),
        },
        text=say(
            RULE,
            "expired" if expired else "",
            serial=f"{certificate.serial:x}",
            expires=certificate.not_after.strftime("%Y-%m-%d %H:%M UTC"),
            left=_days_text(days_left),
        ),
        variant="expired" if expired else "",
        key=f"cert:{certificate.serial}",
    )


def certificate_renewed(
    context: DeviceContext, newest_not_after: datetime | None, now: datetime
) -> bool:
    """Whether the device now has a certificate that expires after the brand's lead time (a
    newer one was issued): its certificate_expiring alert resolves."""
    return newest_not_after is not None and newest_not_after - now > lead_time(context)


def _days_text(days: float) -> str:
    if days >= 2:
        return f"{days:.0f} days"
    hours = max(1, round(days * 24))
    return f"{hours} hour{'s' if hours != 1 else ''}"
