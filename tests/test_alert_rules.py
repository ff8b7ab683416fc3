"""The Prometheus alert rules in deploy/prometheus: valid, unit-tested, and on real metrics."""

import re
import shutil
import subprocess

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from services.common.settings import REPO_ROOT
from services.maintenance.broker_watch import DROPPED_TOPIC, GAUGES, BrokerCollector, BrokerStats

RULES_DIR = REPO_ROOT / "deploy" / "prometheus"
RULES = RULES_DIR / "galvani-alerts.yml"
RULE_TESTS = RULES_DIR / "galvani-alerts.test.yml"


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail(
            "promtool is missing: `make test` installs it (Debian's prometheus package, through "
            "deploy/install-system-deps.sh)"
        )
    return found


def test_alert_rules_pass_promtool_check() -> None:
    result = subprocess.run(
        [promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 2 rules found" in result.stdout


def test_alert_rules_fire_as_their_unit_tests_expect() -> None:
    result = subprocess.run(
        [promtool(), "test", "rules", RULE_TESTS.name],
        cwd=RULES_DIR,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_alert_rules_use_only_metrics_the_broker_watch_exports() -> None:
    stats = BrokerStats()
    stats.set_connected(True)
    for topic in (*(gauge.topic for gauge in GAUGES), DROPPED_TOPIC):
        stats.update(topic, b"1")
    registry = CollectorRegistry()
    registry.register(BrokerCollector(stats))
    exported = set(re.findall(r"^(galvani_broker_\w+) ", generate_latest(registry).decode(), re.M))
    used = set(re.findall(r"galvani_broker_\w+", RULES.read_text()))
    assert used
    assert used <= exported, f"not exported: {used - exported}"
