"""Builds monitoring/grafana/dashboards/meshsl.json from the panel table below.

The JSON is committed (Grafana provisioning and "Import dashboard" need a file); this script is
how it is edited, so the layout stays regular. tests/e2e/test_dashboard.py checks the committed file
equals this script's output. Run: python monitoring/build_dashboard.py
"""
from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).parent / "grafana" / "dashboards" / "meshsl.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
N = 'node=~"$node"'  # every query is scoped to the selected nodes
RATE = "$__rate_interval"

# (title, panel type, unit, [(expr, legend), ...]); panels are laid out two per row.
PANELS: list[tuple[str, str, str, list[tuple[str, str]]]] = [
    ("Throughput (samples/s)", "timeseries", "short", [
        (f"sum by (node) (rate(meshsl_samples_total{{{N}}}[{RATE}]))", "{{node}}"),
        (f"meshsl_samples_per_second{{{N}}}", "{{node}} last step"),
    ]),
    ("Step time p50 / p95", "timeseries", "s", [
        (f"histogram_quantile(0.5, sum by (le, node) (rate(meshsl_step_seconds_bucket{{{N}}}[{RATE}])))",
         "{{node}} p50"),
        (f"histogram_quantile(0.95, sum by (le, node) (rate(meshsl_step_seconds_bucket{{{N}}}[{RATE}])))",
         "{{node}} p95"),
    ]),
    ("Stage compute time per micro-batch (p95)", "timeseries", "s", [
        ("histogram_quantile(0.95, sum by (le, node, segment, direction) "
         f"(rate(meshsl_stage_compute_seconds_bucket{{{N}}}[{RATE}])))",
         "{{segment}} {{direction}}"),
    ]),
    ("Micro-batches/s per segment", "timeseries", "short", [
        (f"sum by (segment, direction) (rate(meshsl_microbatches_total{{{N}}}[{RATE}]))",
         "{{segment}} {{direction}}"),
    ]),
    ("Bytes/s per hop", "timeseries", "Bps", [
        (f"sum by (edge, direction) (rate(meshsl_bytes_total{{{N}}}[{RATE}]))",
         "{{edge}} {{direction}}"),
    ]),
    ("Messages/s per hop", "timeseries", "short", [
        (f"sum by (edge, direction) (rate(meshsl_messages_total{{{N}}}[{RATE}]))",
         "{{edge}} {{direction}}"),
    ]),
    ("Pipeline bubble fraction", "timeseries", "percentunit", [
        (f"meshsl_bubble_fraction{{{N}}}", "{{node}} {{segment}}"),
    ]),
    ("Queue depth", "timeseries", "short", [
        (f"meshsl_queue_depth{{{N}}}", "{{node}} {{queue}}"),
    ]),
    ("Loss per task", "timeseries", "short", [
        (f"meshsl_task_loss{{{N}}}", "{{task}} {{phase}}"),
    ]),
    ("Accuracy per task", "timeseries", "percentunit", [
        (f'meshsl_task_metric{{{N}, metric="accuracy"}}', "{{task}} {{phase}}"),
    ]),
    ("Peers up", "timeseries", "short", [
        (f"meshsl_peer_up{{{N}}}", "{{node}} sees {{peer}}"),
        (f"meshsl_up{{{N}}}", "{{node}} exporter"),
    ]),
    ("Heartbeats/s", "timeseries", "short", [
        (f"sum by (node, peer) (rate(meshsl_heartbeats_total{{{N}}}[{RATE}]))", "{{node}} <- {{peer}}"),
    ]),
    ("Failovers and restarts", "timeseries", "short", [
        (f"sum by (kind) (increase(meshsl_failovers_total{{{N}}}[{RATE}]))", "failover {{kind}}"),
        (f"sum by (node) (increase(meshsl_restarts_total{{{N}}}[{RATE}]))", "restart {{node}}"),
    ]),
    ("Rejected messages/s by reason", "timeseries", "short", [
        (f"sum by (reason) (rate(meshsl_rejected_messages_total{{{N}}}[{RATE}]))", "{{reason}}"),
    ]),
    ("Authentication refusals", "timeseries", "short", [
        (f"sum by (node) (increase(meshsl_auth_refusals_total{{{N}}}[{RATE}]))", "{{node}}"),
    ]),
    ("Leakage (distance correlation) per edge", "timeseries", "short", [
        (f"meshsl_edge_leakage_dcor{{{N}}}", "{{edge}}"),
    ]),
    ("Label leakage (attack AUC on the gradients sent; realistic and upper bound)", "timeseries", "short", [
        (f"meshsl_edge_label_leakage_auc{{{N}}}", "{{edge}} realistic"),
        (f"meshsl_edge_label_leakage_auc_upper_bound{{{N}}}", "{{edge}} upper bound"),
    ]),
    ("Privacy budget spent (epsilon)", "timeseries", "short", [
        (f"meshsl_privacy_epsilon{{{N}}}", "{{edge}} {{mechanism}}"),
    ]),
    ("Checkpoints", "timeseries", "short", [
        (f"meshsl_checkpoint_step{{{N}}}", "{{node}} checkpoint step"),
        (f"meshsl_current_step{{{N}}}", "{{node}} current step"),
    ]),
    ("Checkpoint write time (p95)", "timeseries", "s", [
        (f"histogram_quantile(0.95, sum by (le, node) (rate(meshsl_checkpoint_seconds_bucket{{{N}}}[{RATE}])))",
         "{{node}}"),
    ]),
    ("Nodes", "table", "short", [
        (f"meshsl_node_info{{{N}}}", ""),
    ]),
    ("Step and epoch", "stat", "short", [
        (f"max by (node) (meshsl_current_step{{{N}}})", "{{node}} step"),
        (f"max by (node) (meshsl_epoch{{{N}}})", "{{node}} epoch"),
    ]),
]


def _variable(name: str, label: str, query: str, multi: bool) -> dict:
    variable = {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "query": query,
        "definition": query,
        "refresh": 2,  # on time range change, so new nodes appear
        "sort": 1,
        "multi": multi,
        "includeAll": multi,
        "current": {},
        "options": [],
        "hide": 0,
        "regex": "",
    }
    if multi:
        variable["allValue"] = ".*"  # a short regex instead of a long (a|b|c|...) alternation
    return variable


def _panel(pid: int, title: str, kind: str, unit: str, queries: list[tuple[str, str]]) -> dict:
    index = pid - 1
    panel = {
        "id": pid,
        "type": kind,
        "title": title,
        "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": 12, "x": 12 * (index % 2), "y": 8 * (index // 2)},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "none"}},
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr,
             "legendFormat": legend, "range": kind != "table", "instant": kind == "table"}
            for i, (expr, legend) in enumerate(queries)
        ],
    }
    if kind == "table":
        panel["targets"][0]["format"] = "table"
        panel["options"] = {"showHeader": True}
        # Show the node facts, not Prometheus's bookkeeping columns.
        panel["transformations"] = [{"id": "organize", "options": {
            "excludeByName": {"Time": True, "Value": True, "__name__": True}}}]
    return panel


def build() -> dict:
    return {
        "uid": "meshsl-overview",
        "title": "meshsl: split-learning nodes",
        "tags": ["meshsl"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,  # shared crosshair across panels
        "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"},
        "timezone": "",
        "annotations": {"list": []},
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource",
             "query": "prometheus", "current": {}, "options": [], "hide": 0, "regex": "",
             "refresh": 1, "multi": False, "includeAll": False},
            _variable("topology", "Topology", "label_values(meshsl_node_info, topology)", False),
            _variable("node", "Node",
                      'label_values(meshsl_node_info{topology=~"$topology"}, node)', True),
        ]},
        "panels": [_panel(i + 1, *spec) for i, spec in enumerate(PANELS)],
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(render())
    print(f"wrote {OUT}")
