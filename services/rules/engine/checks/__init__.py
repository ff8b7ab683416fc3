"""The checks: pure functions from what the rules know to findings (no I/O).

One function per rule, or per way a rule can fire: ``samples`` (runs of a condition, the
battery's rate of rise, a session's samples), ``sessions`` (usage windows, cooldown,
contraindications), ``events`` (reboots, reports, faults, table answers, silence, bans),
``certificates`` (a device certificate about to expire). A check
decides whether its rule fired and with what figures; the rule's severity, action and sentence
are the catalogue's (``services/rules/catalogue.toml``; a finding's ``minor`` picks the rule's
minor grade, :func:`services.rules.explain.say` renders the sentence). The callers in
``engine/samples.py``, ``engine/events.py`` and ``sweeps.py`` read the data through SQL and
raise what the checks return.
"""

from services.rules.engine.checks.certificates import (
    CertificateRow,
    certificate_expiring,
    certificate_renewed,
)
from services.rules.engine.checks.events import (
    CRITICAL_FAULTS,
    UNEXPECTED_REBOOTS,
    adverse_report,
    config_rejected,
    config_unacked,
    device_fault,
    device_flooding,
    offline,
    reboot_loops,
)
from services.rules.engine.checks.samples import (
    battery_rising,
    low_battery_start,
    no_gel,
    run_finding,
    run_findings,
    session_overrun,
)
from services.rules.engine.checks.sessions import (
    contraindicated_use,
    cooldown,
    overuse_7d,
    overuse_24h,
)

__all__ = [
    "CRITICAL_FAULTS",
    "UNEXPECTED_REBOOTS",
    "CertificateRow",
    "adverse_report",
    "battery_rising",
    "certificate_expiring",
    "certificate_renewed",
    "config_rejected",
    "config_unacked",
    "contraindicated_use",
    "cooldown",
    "device_fault",
    "device_flooding",
    "low_battery_start",
    "no_gel",
    "offline",
    "overuse_7d",
    "overuse_24h",
    "reboot_loops",
    "run_finding",
    "run_findings",
    "session_overrun",
]
