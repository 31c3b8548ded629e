"""Leakage audit (`meshsl audit`) and cut-layer advice (`meshsl plan --cuts`) on real digits data."""
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from meshsl.apps.audit import audit, audit_modules, train_modules
from meshsl.cli import app
from meshsl.config.loader import parse_spec
from meshsl.apps.privacy_cuts import cut_candidates
from meshsl.topology.model import topology_from_spec

ROOT = Path(__file__).resolve().parents[2]

SHALLOW = [["Linear", 64, 64]]
DEEP = [["Linear", 64, 128], ["ReLU"], ["Linear", 128, 64], ["ReLU"], ["Linear", 64, 32], ["ReLU"]]


def document(client_layers, nopeek: float = 0.0, steps: int = 40) -> dict:
    width = next(layer[2] for layer in reversed(client_layers) if layer[0] == "Linear")
    return {
        "name": "audit-digits",
        "nodes": [{"name": "client", "endpoint": "tcp://127.0.0.1:5801", "party": "clinic"},
                  {"name": "server", "endpoint": "tcp://127.0.0.1:5802", "party": "lab"}],
        "data": [{"name": "pixels", "node": "client", "dataset": {"name": "digits"}},
                 {"name": "digit_labels", "node": "server", "dataset": {"name": "digits"}, "kind": "labels"}],
        "segments": [{"name": "bottom", "node": "client", "inputs": ["pixels"], "layers": client_layers},
                     {"name": "top", "node": "server", "inputs": ["bottom"],
                      "layers": [["ReLU"], ["Linear", width, 64], ["ReLU"], ["Linear", 64, 10]]}],
        "tasks": [{"name": "digit", "output": "top", "labels": "digit_labels"}],
        "privacy": [{"segment": "bottom", "nopeek": nopeek}] if nopeek else [],
        "training": {"steps": steps, "batch_size": 64, "micro_batches": 2, "optimizer": {"name": "adam", "lr": 0.003}},
    }


def topology_of(doc):
    return topology_from_spec(parse_spec(doc), "<audit-test>", ROOT)


def write(tmp_path: Path, doc: dict, name: str = "topo.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc))
    return path


def test_audit_tells_a_shallow_cut_from_a_deep_protected_one():
    shallow = audit(topology_of(document(SHALLOW)), probe_epochs=150)
    deep = audit(topology_of(document(DEEP, nopeek=0.3)), probe_epochs=150)
    s, d = shallow["edges"]["bottom->top"], deep["edges"]["bottom->top"]
    assert s["producer_party"] == "clinic" and s["consumer_party"] == "lab" and s["raw_sources"] == ["pixels"]
    assert s["n_samples"] == 359  # the held-out rows, never trained on
    assert s["dcor"] > d["dcor"] + 0.1, (s["dcor"], d["dcor"])
    assert s["inversion_relative_error"] < d["inversion_relative_error"] - 0.1
    assert s["inversion_relative_error"] < 0.2  # one Linear: the pixels come back almost exactly
    assert d["nopeek"] == 0.3 and s["nopeek"] == 0.0
    for report in (shallow, deep):
        assert report["trained"]["steps"] == 40
        assert 0 < report["trained"]["live_leakage"]["bottom->top"] <= 1


def test_audit_cli_from_saved_weights_matches_in_memory(tmp_path):
    from meshsl.launch.entry import save_weights
    from meshsl.launch.simulate import simulate  # noqa: F401  (train_modules uses it)
    doc = document(SHALLOW, steps=20)
    topology = topology_of(doc)
    modules, _ = train_modules(topology, evaluate=False)
    weights = tmp_path / "weights"

    class Runtime:  # what save_weights reads from a node runtime
        def __init__(self, node, segment):
            self.node, self.topology = node, topology
            self.worker = type("W", (), {"modules": {segment: modules[segment]}})()

    save_weights(Runtime("client", "bottom"), weights)
    save_weights(Runtime("server", "top"), weights)
    expected = audit_modules(topology, modules, probe_epochs=50)["bottom->top"]
    path = write(tmp_path, doc)
    result = CliRunner().invoke(app, ["audit", str(path), "--weights", str(weights), "--json", "--probe-epochs", "50"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    edge = report["edges"]["bottom->top"]
    assert edge["dcor"] == pytest.approx(expected["dcor"], rel=1e-5)
    assert edge["inversion_relative_error"] == pytest.approx(expected["inversion_relative_error"], rel=1e-4)
    assert report["weights"] == str(weights) and "trained" not in report
    # human output
    table = CliRunner().invoke(app, ["audit", str(path), "--weights", str(weights), "--probe-epochs", "0"],
                               env={"COLUMNS": "200"})
    assert table.exit_code == 0 and "bottom->top" in table.output and "clinic -> lab" in table.output


def test_audit_cli_errors_name_the_problem(tmp_path):
    path = write(tmp_path, document(SHALLOW))
    missing = CliRunner().invoke(app, ["audit", str(path), "--weights", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "weights directory not found" in missing.output
    (tmp_path / "partial").mkdir()
    partial = CliRunner().invoke(app, ["audit", str(path), "--weights", str(tmp_path / "partial")])
    assert partial.exit_code == 2 and "no weights for segment 'bottom'" in partial.output
    assert "Traceback" not in missing.output + partial.output
    single = document(SHALLOW)
    single["nodes"][1]["party"] = "clinic"
    alone = CliRunner().invoke(app, ["audit", str(write(tmp_path, single, "single.yaml")), "--steps", "1"])
    assert alone.exit_code == 2 and "nothing to audit" in alone.output


def test_cut_candidates_cost_and_leakage_per_layer():
    doc = document(DEEP)
    doc["privacy"] = [{"segment": "bottom", "forward": {"codec": "int8"}}]
    topology = topology_of(doc)
    rows = cut_candidates(topology, train_steps=30, samples=256)
    assert [r["cut_after"] for r in rows] == [
        "layers[0] Linear(64, 128)", "layers[1] ReLU", "layers[2] Linear(128, 64)", "layers[3] ReLU",
        "layers[4] Linear(64, 32)", "layers[5] ReLU"]
    assert [r["current"] for r in rows] == [False] * 5 + [True]
    info = topology.segment_info["bottom"]
    last = rows[-1]
    assert last["client_parameters"] == info.parameters
    assert last["client_flops_per_sample"] == info.forward_flops
    assert rows[0]["client_parameters"] == 64 * 128 + 128
    assert rows[0]["client_flops_per_sample"] == 2 * 64 * 128
    # int8 forward (one byte per value + a float32 scale), float32 gradients back
    assert rows[0]["bytes_per_sample"] == (128 + 4) + 128 * 4
    assert last["bytes_per_sample"] == (32 + 4) + 32 * 4
    assert rows[0]["warning"] and rows[2]["warning"] is None
    assert all(0 <= r["dcor"] <= 1 and 0 <= r["dcor_init"] <= 1 and r["trained_steps"] == 30 for r in rows)
    assert rows[0]["dcor_init"] > rows[-1]["dcor_init"]  # deeper cuts leak less at initialisation


def test_plan_cuts_cli(tmp_path):
    path = write(tmp_path, document(SHALLOW))
    result = CliRunner().invoke(app, ["plan", str(path), "--cuts", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)["cut_candidates"]
    assert len(rows) == 1 and rows[0]["segment"] == "bottom" and rows[0]["bytes_per_sample"] == 2 * 64 * 4
    table = CliRunner().invoke(app, ["plan", str(path), "--cuts"])
    assert table.exit_code == 0 and "cut-layer candidates" in table.output
