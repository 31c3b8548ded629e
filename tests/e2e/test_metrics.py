"""NodeMetrics: what a scrape contains, that nodes in one process stay apart, and that a real
Prometheus can scrape it."""
from __future__ import annotations

import json
import shutil
import subprocess
import threading
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from meshsl.launch.metrics import EXPORTED_METRICS, OVERFLOW_LABEL, NodeMetrics, scrape_targets
from support.prometheus_server import query, running_prometheus, wait_for

REPO = Path(__file__).resolve().parents[2]


def samples(metrics: NodeMetrics) -> list:
    text = metrics.render().decode()
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def value(metrics: NodeMetrics, name: str, **labels: str) -> float:
    found = [s.value for s in samples(metrics) if s.name == name and labels.items() <= s.labels.items()]
    assert len(found) == 1, f"{name}{labels}: {len(found)} samples"
    return found[0]


@pytest.fixture
def node() -> NodeMetrics:
    return NodeMetrics("bottom-0", "alice", "bottom", "vanilla", "abc123")


def test_identity_series_exist_before_any_event(node):
    assert value(node, "meshsl_up", node="bottom-0") == 1
    info = [s for s in samples(node) if s.name == "meshsl_node_info"]
    assert [s.labels for s in info] == [{"node": "bottom-0", "party": "alice", "role": "bottom",
                                         "topology": "vanilla", "topology_hash": "abc123"}]
    assert value(node, "meshsl_samples_total") == 0
    assert value(node, "meshsl_current_step") == 0


def test_recorded_values_appear_with_their_labels(node):
    node.microbatch("bottom", "forward", 0.002)
    node.microbatch("bottom", "forward", 0.004)
    node.microbatch("bottom", "backward", 0.003)
    node.step_done(0.5, 64)
    node.step_done(0.25, 64)
    node.message("bottom->top", "sent", 1000)
    node.message("bottom->top", "sent", 500)
    node.message("bottom->top", "received", 200)
    node.rejected("bad_header")
    node.queue_depth("inbox", 3)
    node.bubble("bottom", 0.25)
    node.task("digit", 0.4, {"accuracy": 0.9}, phase="eval")
    node.heartbeat("top-0")
    node.peer_up("top-0", False)
    node.failover("standby")
    node.restart()
    node.leakage("bottom->top", 0.7)
    node.checkpoint(0.1, 40)
    node.auth_refused()
    node.progress(41, 2)

    assert value(node, "meshsl_microbatches_total", segment="bottom", direction="forward") == 2
    assert value(node, "meshsl_stage_compute_seconds_count", segment="bottom", direction="forward") == 2
    assert value(node, "meshsl_stage_compute_seconds_sum", direction="forward") == pytest.approx(0.006)
    assert value(node, "meshsl_step_seconds_count") == 2
    assert value(node, "meshsl_step_seconds_bucket", le="0.25") == 1
    assert value(node, "meshsl_samples_total") == 128
    assert value(node, "meshsl_steps_total") == 2
    assert value(node, "meshsl_samples_per_second") == pytest.approx(256)  # the last step's
    assert value(node, "meshsl_bytes_total", edge="bottom->top", direction="sent") == 1500
    assert value(node, "meshsl_messages_total", edge="bottom->top", direction="sent") == 2
    assert value(node, "meshsl_bytes_total", edge="bottom->top", direction="received") == 200
    assert value(node, "meshsl_rejected_messages_total", reason="bad_header") == 1
    assert value(node, "meshsl_queue_depth", queue="inbox") == 3
    assert value(node, "meshsl_bubble_fraction", segment="bottom") == 0.25
    assert value(node, "meshsl_task_loss", task="digit", phase="eval") == pytest.approx(0.4)
    assert value(node, "meshsl_task_metric", task="digit", metric="accuracy", phase="eval") == pytest.approx(0.9)
    assert value(node, "meshsl_heartbeats_total", peer="top-0") == 1
    assert value(node, "meshsl_peer_up", peer="top-0") == 0
    assert value(node, "meshsl_failovers_total", kind="standby") == 1
    assert value(node, "meshsl_restarts_total") == 1
    assert value(node, "meshsl_edge_leakage_dcor", edge="bottom->top") == pytest.approx(0.7)
    assert value(node, "meshsl_checkpoint_seconds_count") == 1
    assert value(node, "meshsl_checkpoint_step") == 40
    assert value(node, "meshsl_auth_refusals_total") == 1
    assert value(node, "meshsl_current_step") == 41
    assert value(node, "meshsl_epoch") == 2
    # Every sample carries the node label and is a name the dashboard may rely on.
    for sample in samples(node):
        assert sample.labels.get("node") == "bottom-0", sample
        assert sample.name in EXPORTED_METRICS, sample.name


def test_every_exported_name_can_appear_in_a_scrape(node):
    node.microbatch("s", "forward", 0.1)
    node.message("e", "sent", 1)
    node.rejected("r")
    node.queue_depth("q", 1)
    node.bubble("s", 0.1)
    node.task("t", 0.1, {"accuracy": 1.0})
    node.heartbeat("p")
    node.peer_up("p", True)
    node.failover("k")
    node.client_change("drop", "heartbeat")
    node.recovery(2.0)
    node.leakage("e", 0.1)
    node.label_leakage("e", 0.6, 0.9)
    node.privacy_epsilon("e", "activation_dp", 1.0)
    node.checkpoint(1.0, 1)
    node.step_done(1.0, 1)
    assert {s.name for s in samples(node)} == EXPORTED_METRICS


def test_free_text_labels_are_capped(node):
    for i in range(200):
        node.rejected(f"reason-{i}")
    reasons = {s.labels["reason"] for s in samples(node) if s.name == "meshsl_rejected_messages_total"}
    assert len(reasons) <= 65 and OVERFLOW_LABEL in reasons


def test_two_nodes_in_one_process_do_not_collide():
    a = NodeMetrics("a", "alice", "bottom", "t", "h")
    b = NodeMetrics("b", "bob", "top", "t", "h")
    a.step_done(1.0, 10)
    assert value(a, "meshsl_samples_total") == 10
    assert value(b, "meshsl_samples_total") == 0
    assert {s.labels["node"] for s in samples(b)} == {"b"}


def test_serve_exports_over_http(node):
    port = node.serve(0)
    try:
        assert port > 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
        assert 'meshsl_up{node="bottom-0"} 1.0' in text
        assert node.serve(0) == port  # idempotent
    finally:
        node.close()


def test_scrape_targets_are_valid_file_sd(tmp_path):
    entries = scrape_targets([("bottom-0", "alice", "127.0.0.1", 9101),
                              ("top-0", "bob", "10.0.0.2", 9102)], topology="vanilla")
    assert entries[1] == {"targets": ["10.0.0.2:9102"],
                          "labels": {"job": "meshsl", "topology": "vanilla", "node": "top-0", "party": "bob"}}
    promtool = shutil.which("promtool")
    if promtool is None:
        return  # the shape check above still ran
    # The shipped prometheus.yml must accept what scrape_targets writes.
    shutil.copy(REPO / "monitoring" / "prometheus.yml", tmp_path / "prometheus.yml")
    (tmp_path / "targets").mkdir()
    (tmp_path / "targets" / "meshsl.json").write_text(json.dumps(entries))
    result = subprocess.run([promtool, "check", "config", str(tmp_path / "prometheus.yml")],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING" not in result.stdout + result.stderr


def test_real_prometheus_scrapes_increasing_samples(tmp_path):
    node = NodeMetrics("scraped", "alice", "bottom", "vanilla", "abc123")
    port = node.serve(0)
    stop = threading.Event()

    def train() -> None:
        while not stop.wait(0.05):
            node.step_done(0.05, 8)

    worker = threading.Thread(target=train, daemon=True)
    worker.start()
    try:
        with running_prometheus([f"127.0.0.1:{port}"], tmp_path) as base_url:
            seen: list[float] = []

            def increased() -> bool:
                rows = query(base_url, 'meshsl_samples_total{node="scraped"}')
                if rows:
                    current = float(rows[0]["value"][1])
                    if not seen or current != seen[-1]:
                        seen.append(current)
                return len(seen) >= 2 and seen[-1] > seen[0]

            wait_for(increased, timeout=25)
            up = query(base_url, 'meshsl_node_info{node="scraped"}')
            assert up[0]["metric"]["topology"] == "vanilla"
    finally:
        stop.set()
        worker.join()
        node.close()
