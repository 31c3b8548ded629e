"""The Grafana dashboard only queries metrics the code exports, and its PromQL is valid."""
from __future__ import annotations

import json
import re
import runpy
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from meshsl.launch.metrics import EXPORTED_METRICS

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "monitoring" / "grafana" / "dashboards" / "meshsl.json"
METRIC_NAME = re.compile(r"\bmeshsl_[a-zA-Z0-9_]+")


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panel_exprs(dashboard: dict) -> list[tuple[str, str]]:
    return [(panel["title"], target["expr"])
            for panel in dashboard["panels"] for target in panel.get("targets", [])]


def variable_queries(dashboard: dict) -> list[str]:
    return [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]


def test_committed_json_matches_its_builder():
    builder = runpy.run_path(str(REPO / "monitoring" / "build_dashboard.py"))
    assert DASHBOARD.read_text() == builder["render"](), "run: python monitoring/build_dashboard.py"


def test_every_queried_metric_is_exported(dashboard):
    exprs = [expr for _, expr in panel_exprs(dashboard)] + variable_queries(dashboard)
    used = {name for expr in exprs for name in METRIC_NAME.findall(expr)}
    assert used, "no meshsl_ metric found in the dashboard"
    assert used <= EXPORTED_METRICS, f"not exported: {sorted(used - EXPORTED_METRICS)}"


def test_every_panel_has_a_datasource_and_queries(dashboard):
    assert dashboard["schemaVersion"] >= 36
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_every_query_is_scoped_to_the_node_variable(dashboard):
    for title, expr in panel_exprs(dashboard):
        selectors = METRIC_NAME.findall(expr)
        assert expr.count('node=~"$node"') == len(selectors), f"{title}: {expr}"


def test_template_variables(dashboard):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["topology"]["query"] == "label_values(meshsl_node_info, topology)"
    assert variables["node"]["multi"] and variables["node"]["includeAll"]
    assert "$topology" in variables["node"]["query"]


def test_the_panels_the_issue_asks_for_exist(dashboard):
    used = {name for _, expr in panel_exprs(dashboard) for name in METRIC_NAME.findall(expr)}
    for needed in ("meshsl_samples_total", "meshsl_step_seconds_bucket",
                   "meshsl_stage_compute_seconds_bucket", "meshsl_bytes_total", "meshsl_messages_total",
                   "meshsl_bubble_fraction", "meshsl_task_loss", "meshsl_task_metric",
                   "meshsl_queue_depth", "meshsl_peer_up", "meshsl_heartbeats_total",
                   "meshsl_failovers_total", "meshsl_restarts_total", "meshsl_rejected_messages_total",
                   "meshsl_auth_refusals_total", "meshsl_edge_leakage_dcor", "meshsl_checkpoint_step",
                   "meshsl_edge_label_leakage_auc", "meshsl_privacy_epsilon"):
        assert needed in used, needed


def as_plain_promql(expr: str) -> str:
    """Replace Grafana variables with literals Prometheus accepts."""
    expr = re.sub(r"\$__(rate_)?interval|\$\{__(rate_)?interval\}", "1m", expr)
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


def test_promql_is_valid(dashboard, tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install prometheus)")
    rules = [{"record": f"meshsl_dashboard:panel{i}", "expr": as_plain_promql(expr)}
             for i, (_, expr) in enumerate(panel_exprs(dashboard))]
    rules_file = tmp_path / "rules.yml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(rules_file)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_config_is_valid():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install prometheus)")
    result = subprocess.run([promtool, "check", "config", str(REPO / "monitoring" / "prometheus.yml")],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
