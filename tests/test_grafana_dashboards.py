"""The Grafana dashboards (deploy/grafana/*.json) load: each is the JSON model Grafana imports,
every panel's query parses as PromQL (promtool reads it as a recording rule) and names only
metrics the services export, and the files are what tools/grafana_dashboards.py writes.

There is no Grafana to load them into here (none in Debian or npm), so "loads" is checked
against what the import needs: the keys, the data-source input, the panels' grid and targets.
"""

import json
import re
from pathlib import Path
from typing import Any

import pytest

from services.common.settings import REPO_ROOT
from tests.exported_metrics import exported_metrics
from tests.promtool import check_rules
from tools import grafana_dashboards

DASHBOARD_DIR = REPO_ROOT / "deploy" / "grafana"
FILES = sorted(DASHBOARD_DIR.glob("*.json"))
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
# Grafana's built-in interval variables, as a Prometheus range would read them.
VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}
GRID_WIDTH = 24


def load(path: Path) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(path.read_text())
    return document


def query_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """The panels that query (rows hold none; a collapsed row keeps its panels inside)."""
    found = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            found.extend(panel.get("panels", []))
        else:
            found.append(panel)
    return found


def exprs(dashboard: dict[str, Any]) -> list[str]:
    return [target["expr"] for panel in query_panels(dashboard) for target in panel["targets"]]


def test_the_dashboards_the_deployment_needs_are_there() -> None:
    by_uid = {load(path)["uid"]: load(path) for path in FILES}
    assert set(by_uid) >= {"galvani-ingest", "galvani-rules", "galvani-api", "galvani-fleet"}
    every_expr = " ".join(e for dashboard in by_uid.values() for e in exprs(dashboard))
    for metric in (
        "galvani_broker_node_up",
        "galvani_broker_consumer_pending_messages",
        "galvani_db_replication_lag_seconds",
        "galvani_notify_oldest_pending_age_seconds",
    ):
        assert metric in every_expr, f"no dashboard shows {metric}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_dashboard_is_a_grafana_json_model(path: Path) -> None:
    dashboard = load(path)
    assert dashboard["uid"] == path.stem
    assert isinstance(dashboard["title"], str)
    assert dashboard["title"]
    assert isinstance(dashboard["schemaVersion"], int)
    assert dashboard["schemaVersion"] >= 36
    inputs = {i["name"]: i for i in dashboard["__inputs"]}
    assert inputs["DS_PROMETHEUS"]["type"] == "datasource"
    assert inputs["DS_PROMETHEUS"]["pluginId"] == "prometheus"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= GRID_WIDTH, panel["title"]
        taken = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not taken & cells, f"{panel['title']} overlaps another panel"
        cells |= taken
    panels = query_panels(dashboard)
    assert panels
    for panel in panels:
        assert panel["type"] in {"timeseries", "stat", "gauge", "table", "bargauge"}
        assert panel["title"], panel
        assert panel["description"], panel["title"]
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], f"{panel['title']} has no query"
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]
            assert target["expr"].strip(), panel["title"]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_every_query_parses_as_promql(path: Path, tmp_path: Path) -> None:
    """promtool parses each query as a recording rule's expression; Grafana's own interval
    variables are replaced as Grafana would before sending the query."""
    rules = []
    for n, expr in enumerate(exprs(load(path))):
        for variable, value in VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"unknown variable in {expr}"
        rules.append({"record": f"galvani:dashboard_query_{n}", "expr": expr})
    rule_file = tmp_path / "queries.yml"
    rule_file.write_text(json.dumps({"groups": [{"name": path.stem, "rules": rules}]}))
    assert f"SUCCESS: {len(rules)} rules found" in check_rules(str(rule_file))


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_every_query_names_only_metrics_the_services_export(path: Path) -> None:
    series, _ = exported_metrics()
    used = {name for expr in exprs(load(path)) for name in re.findall(r"galvani_\w+", expr)}
    assert used
    assert used <= series, f"not exported: {used - series}"


def test_every_metric_the_services_export_is_on_a_dashboard() -> None:
    """A metric no dashboard shows is one nobody looks at until an incident."""
    shown = " ".join(e for path in FILES for e in exprs(load(path)))
    used = set(re.findall(r"galvani_\w+", shown))
    _, families = exported_metrics()
    missing = {
        family
        for family in families
        if not family.endswith("_total") and not any(name.startswith(family) for name in used)
    }
    assert not missing, f"on no dashboard: {sorted(missing)}"


def test_committed_files_are_what_the_tool_writes() -> None:
    assert grafana_dashboards.main(["--check"]) == 0, (
        "run `python -m tools.grafana_dashboards` and commit deploy/grafana"
    )
    assert sorted(p.name for p in FILES) == sorted(
        f"{d.uid}.json" for d in grafana_dashboards.DASHBOARDS
    )
