"""Observability of a real run: node processes over ZeroMQ, each exporting Prometheus metrics.

One `meshsl run` (vanilla digits, free ports, checkpoints on, INFO logs) trains for far longer than
the tests need and is stopped when they are done. While it trains:

* every metric the Grafana dashboard queries gets a sample from some node (except the event-only
  ones listed below, which must still be exported as families with HELP/TYPE);
* a real Prometheus, pointed at the targets `meshsl monitoring prometheus` writes for the resolved
  topology, sees `meshsl_samples_total` and `meshsl_bytes_total` for every node, increasing, and
  answers every dashboard panel's query with data (bar the event-only ones);
* each node process logs one structured line per event, naming the node and the step, at the
  level given to `meshsl run --log-level`.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from meshsl.cli import app
from meshsl.launch.metrics import EXPORTED_METRICS
from support.prometheus_server import prometheus_binary, query, running_prometheus, wait_for

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "monitoring" / "grafana" / "dashboards" / "meshsl.json"
METRIC_NAME = re.compile(r"\bmeshsl_[a-zA-Z0-9_]+")
START_TIMEOUT_S = 90.0  # node processes import torch; CI machines are small and busy

# Dashboard metrics a healthy run never records: they count failures, so a scrape of a healthy
# node shows their HELP/TYPE lines but no sample (prometheus_client exposes no series for a
# labelled family before its first event).
EVENT_ONLY = {
    "meshsl_failovers_total": "only after the coordinator lost a node and recovered (tests/e2e/test_failover.py)",
    "meshsl_rejected_messages_total": "only when a malformed or unexpected message arrives (labelled by reason)",
    "meshsl_edge_leakage_dcor": "only where a leakage probe measured an edge; the runtime does not run one yet",
    "meshsl_edge_label_leakage_auc": "only at a label holder of binary labels (this run's digits have 10 classes)",
    "meshsl_edge_label_leakage_auc_upper_bound": "the same: only at a label holder of binary labels",
    "meshsl_privacy_epsilon": "only where an edge declares DP (tests/integration/test_label_privacy.py covers both)",
}


def dashboard_metrics() -> set[str]:
    board = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    exprs += [v["query"] for v in board["templating"]["list"] if v["type"] == "query"]
    return {name for expr in exprs for name in METRIC_NAME.findall(expr)}


@dataclass
class LiveRun:
    process: subprocess.Popen
    run_dir: Path
    resolved: Path
    nodes: dict  # node -> metrics URL
    topology: str

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-1500:]}"
                             for p in sorted(self.run_dir.glob("*.log")))
            pytest.fail(f"meshsl run exited early with {self.process.returncode}:\n{logs}")


def _scrape(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=2.0) as response:
            return response.read().decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None  # not serving yet (still importing torch)


@pytest.fixture(scope="module")
def live_run(tmp_path_factory) -> LiveRun:
    work = tmp_path_factory.mktemp("live")
    document = yaml.safe_load((REPO / "topologies" / "vanilla.yaml").read_text())
    document["checkpoint"] = {"every": 10}  # so the checkpoint panels fill too
    topology = work / "vanilla.yaml"
    topology.write_text(yaml.safe_dump(document, sort_keys=False))
    run_dir = work / "run"
    output = open(work / "meshsl-run.out", "wb")
    # Far more epochs than the tests need: the run paces nothing, the fixture stops it.
    process = subprocess.Popen(
        [sys.executable, "-m", "meshsl", "run", str(topology), "--free-ports", "--epochs", "500",
         "--no-progress", "--run-dir", str(run_dir), "--log-level", "INFO"],
        stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True, env=dict(os.environ, MESHSL_LOG_FORMAT="text"))
    output.close()
    try:
        resolved = run_dir / "topology.yaml"
        wait_for(lambda: resolved.exists() or process.poll() is not None, timeout=START_TIMEOUT_S)
        spec = yaml.safe_load(resolved.read_text()) if resolved.exists() else {"nodes": []}
        nodes = {n["name"]: f"http://127.0.0.1:{n['metrics_port']}/metrics" for n in spec["nodes"]}
        live = LiveRun(process, run_dir, resolved, nodes, spec.get("name", ""))
        live.check_alive()
        yield live
    finally:
        # The run and its node processes share the session (and process group) started above.
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_every_dashboard_metric_gets_a_sample_in_a_real_run(live_run):
    used = dashboard_metrics()
    assert used <= EXPORTED_METRICS
    assert set(EVENT_ONLY) <= used, "event-only list names a metric the dashboard no longer queries"
    expected = used - set(EVENT_ONLY)
    sampled: dict[str, set[str]] = {}  # metric -> nodes that exported a sample of it
    families: set[str] = set()  # names with HELP/TYPE lines
    task_phases: set[str] = set()

    def scrape_all() -> bool:
        live_run.check_alive()
        for node, url in live_run.nodes.items():
            text = _scrape(url)
            if text is None:
                continue
            families.update(re.findall(r"^# TYPE (\S+)", text, re.M))
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    sampled.setdefault(sample.name, set()).add(node)
                    if sample.name == "meshsl_task_metric" and sample.labels.get("metric") == "accuracy":
                        task_phases.add(sample.labels["phase"])
        # Eval results arrive at the end of each epoch; heartbeats after the first interval.
        return expected <= set(sampled) and task_phases == {"train", "eval"}

    try:
        wait_for(scrape_all, timeout=START_TIMEOUT_S, interval=0.5)
    except TimeoutError:
        pytest.fail(f"no sample of {sorted(expected - set(sampled))} "
                    f"(accuracy phases seen: {sorted(task_phases)})")
    # Every node exports the per-node metrics, not just one of them.
    for name in ("meshsl_samples_total", "meshsl_step_seconds_bucket", "meshsl_bytes_total",
                 "meshsl_microbatches_total", "meshsl_queue_depth", "meshsl_peer_up",
                 "meshsl_heartbeats_total", "meshsl_bubble_fraction", "meshsl_current_step",
                 "meshsl_checkpoint_step", "meshsl_node_info", "meshsl_up"):
        assert sampled[name] == set(live_run.nodes), (name, sampled[name])
    # Loss and accuracy come from the node that owns the task (the label holder).
    assert sampled["meshsl_task_loss"] == {"server"}
    # Event-only metrics are still announced, so Grafana and alert rules can refer to them.
    for name in EVENT_ONLY:
        assert name in families, f"{name} not exported as a family"


def test_real_prometheus_scrapes_a_running_topology(live_run, tmp_path, monkeypatch, restore_logging):
    if prometheus_binary() is None:
        pytest.skip("prometheus binary not installed (Debian: apt-get install prometheus; .ci/run does)")
    monkeypatch.delenv("MESHSL_LOG_FORMAT", raising=False)  # the root callback exports it
    targets = tmp_path / "targets" / "meshsl.json"
    # The real command, in this process: the topology loads fast where torch is already imported.
    result = CliRunner().invoke(app, ["monitoring", "prometheus", str(live_run.resolved), "-o", str(targets)])
    assert result.exit_code == 0, result.output
    entries = json.loads(targets.read_text())
    assert {e["labels"]["node"] for e in entries} == set(live_run.nodes)
    ports = {e["labels"]["node"]: e["targets"][0] for e in entries}
    assert ports == {n: url.split("/")[2] for n, url in live_run.nodes.items()}

    nodes = set(live_run.nodes)
    selector = f'{{job="meshsl", topology="{live_run.topology}"}}'  # labels from the file_sd entries

    def by_node(promql: str) -> dict[str, float]:
        live_run.check_alive()
        return {row["metric"]["node"]: float(row["value"][1]) for row in query(base_url, promql)}

    def all_positive(promql: str):
        values = by_node(promql)
        return values if set(values) == nodes and all(v > 0 for v in values.values()) else None

    def all_above(promql: str, before: dict[str, float]):
        values = by_node(promql)
        return values if set(values) == nodes and all(values[n] > before[n] for n in nodes) else None

    with running_prometheus([], tmp_path, file_sd=[targets]) as base_url:
        for promql in (f"sum by (node) (meshsl_samples_total{selector})",
                       f"sum by (node) (meshsl_bytes_total{selector})"):
            first = wait_for(lambda: all_positive(promql), timeout=START_TIMEOUT_S)
            later = wait_for(lambda: all_above(promql, first), timeout=30)
            assert all(later[n] > first[n] for n in nodes), (promql, first, later)
        up = by_node(f"up{selector}")
        assert up == {n: 1.0 for n in nodes}, up

        # What Grafana would draw: every panel query (variables filled in) returns series, except
        # queries of event-only metrics.
        board = json.loads(DASHBOARD.read_text())
        panels = [(p["title"], t["expr"]) for p in board["panels"] for t in p.get("targets", [])
                  if not set(METRIC_NAME.findall(t["expr"])) <= set(EVENT_ONLY)]
        assert len(panels) >= 15

        def empty_panels() -> list[str]:
            live_run.check_alive()
            return [f"{title}: {expr}" for title, expr in panels if not query(base_url, as_promql(expr))]

        try:
            wait_for(lambda: not empty_panels(), timeout=30)
        except TimeoutError:
            pytest.fail("panels without data:\n" + "\n".join(empty_panels()))


def as_promql(expr: str) -> str:
    """A dashboard query as Grafana sends it: $__rate_interval and the template variables filled in."""
    expr = re.sub(r"\$__(rate_)?interval|\$\{__(rate_)?interval\}", "1m", expr)
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


def test_node_processes_log_one_structured_line_per_event(live_run):
    """`meshsl run --log-level INFO` reaches the node processes; each line names node and step."""
    line = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (?P<level>[A-Z]+) (?P<logger>\S+) "
                      r"node=(?P<node>\S+)(?: step=(?P<step>\d+))? (?P<rest>.*)$")

    def round_lines() -> dict[str, list]:
        live_run.check_alive()
        found = {}
        for node in live_run.nodes:
            path = live_run.run_dir / f"{node}.log"
            text = path.read_text(errors="replace") if path.exists() else ""
            matches = [line.match(raw) for raw in text.splitlines() if " round done " in raw]
            found[node] = matches
        return found if all(len(v) >= 3 for v in found.values()) else None

    found = wait_for(round_lines, timeout=START_TIMEOUT_S)
    for node, matches in found.items():
        assert all(matches), f"{node}: a line does not have the structured format"
        for match in matches:
            assert match["node"] == node and match["level"] == "INFO"
            assert match["step"] is not None, match.group(0)
            assert re.search(r"\bphase=(train|eval)\b", match["rest"]), match.group(0)
    coordinator = (live_run.run_dir / "server.log").read_text(errors="replace")
    assert re.search(r"INFO meshsl\.coordinator node=server step=\d+ step committed epoch=\d+ ", coordinator)
    # DEBUG lines (one per round begun) stay out at INFO.
    assert " round begins " not in coordinator
