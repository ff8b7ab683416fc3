"""The alerts an operator is woken by (deploy/prometheus): the cluster's rules pass promtool's
check and unit tests, every rule file queries only metrics the services export, and the five
conditions the deployment must page for each have a rule and a runbook line in the README."""

import re
from typing import Any

import pytest
import yaml

from tests.exported_metrics import exported_metrics
from tests.promtool import RULES_DIR, check_config, check_rules, run_rule_tests

RULES = "galvani-cluster-alerts.yml"
CONFIG = "prometheus.yml"
RULE_FILES = sorted(p for p in RULES_DIR.glob("galvani-*.yml") if not p.name.endswith(".test.yml"))
# The processes whose metrics the rules and dashboards read: the example scrapes each.
JOBS = {
    "galvani-maintenance",
    "galvani-broker-access",
    "galvani-ingest",
    "galvani-rules",
    "galvani-notify",
    "galvani-api",
}
# What docs/research/issue22-cluster-broker.md and issue 22 name: broker node down, ingest lag,
# dead-letter rate, DB replication lag, notification backlog.
PAGES = (
    "GalvaniBrokerNodeDown",
    "GalvaniIngestLagHigh",
    "GalvaniDeadLetterRate",
    "GalvaniDbReplicationLag",
    "GalvaniNotificationBacklog",
)


def rules_of(path: str) -> list[dict[str, Any]]:
    """Every rule of a rule file of RULES_DIR."""
    groups = yaml.safe_load((RULES_DIR / path).read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_example_config_loads_every_rule_file_and_scrapes_every_service() -> None:
    assert "SUCCESS: prometheus.yml is valid" in check_config(CONFIG)
    config = yaml.safe_load((RULES_DIR / CONFIG).read_text())
    assert sorted(config["rule_files"]) == [p.name for p in RULE_FILES]
    assert {job["job_name"] for job in config["scrape_configs"]} == JOBS


def test_cluster_alert_rules_pass_promtool_check() -> None:
    assert "SUCCESS: 7 rules found" in check_rules(RULES)


def test_cluster_alert_rules_fire_as_their_unit_tests_expect() -> None:
    assert "SUCCESS" in run_rule_tests("galvani-cluster-alerts.test.yml")


@pytest.mark.parametrize("path", [p.name for p in RULE_FILES])
def test_rules_query_only_metrics_the_services_export(path: str) -> None:
    series, families = exported_metrics()
    used_in_exprs: set[str] = set()
    named_in_text: set[str] = set()
    for rule in rules_of(path):
        used_in_exprs.update(re.findall(r"galvani_\w+", str(rule["expr"])))
        named_in_text.update(re.findall(r"galvani_[a-z_]+\b", str(rule.get("annotations", ""))))
    assert used_in_exprs, f"{path} queries no galvani metric"
    assert used_in_exprs <= series, f"{path} queries unexported series: {used_in_exprs - series}"
    # Descriptions that send the on-call to a metric send them to one that exists.
    named = {name for name in named_in_text if not name.endswith("_")}
    assert named <= series | families, f"{path} names unknown metrics: {named - series - families}"


def test_each_condition_to_page_for_has_one_rule_and_a_readme_entry() -> None:
    alerts = [rule["alert"] for path in RULE_FILES for rule in rules_of(path.name)]
    for alert in PAGES:
        assert alerts.count(alert) == 1, f"{alert}: {alerts.count(alert)} rules"
    readme = (RULES_DIR / "README.md").read_text()
    for alert in alerts:
        assert f"`{alert}`" in readme, f"deploy/prometheus/README.md does not explain {alert}"
