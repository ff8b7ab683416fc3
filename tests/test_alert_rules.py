"""The Prometheus alert rules in deploy/prometheus: valid, unit-tested, and on real metrics."""

import re

from prometheus_client import CollectorRegistry, generate_latest

from services.maintenance.broker_watch import DROPPED_TOPIC, GAUGES, BrokerCollector, BrokerStats
from tests.promtool import RULES_DIR, check_rules, run_rule_tests

RULES = RULES_DIR / "galvani-alerts.yml"
RULE_TESTS = RULES_DIR / "galvani-alerts.test.yml"


def test_alert_rules_pass_promtool_check() -> None:
    assert "SUCCESS: 2 rules found" in check_rules(RULES.name)


def test_alert_rules_fire_as_their_unit_tests_expect() -> None:
    assert "SUCCESS" in run_rule_tests(RULE_TESTS.name)


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
