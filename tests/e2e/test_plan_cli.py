"""Every example topology validates and plans; `meshsl validate` / `meshsl plan` behave for people and scripts."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from meshsl.cli import app
from meshsl.topology import load_topology

ROOT = Path(__file__).resolve().parents[2]
TOPOLOGIES = ROOT / "topologies"
EXAMPLES = sorted(TOPOLOGIES.glob("*.yaml"))

# What `meshsl plan` must recognise in each example (the six configurations).
EXPECTED = {
    "vanilla": ["vanilla"],
    "u_shaped": ["u-shaped"],
    "vertical": ["vertical", "vanilla"],
    "vertical_u_shaped": ["vertical", "u-shaped"],
    "multi_task": ["vanilla", "multi-task"],
    "multi_hop": ["vanilla", "multi-hop (4 hops)"],
    "multi_hop_multi_task": ["vanilla", "multi-task", "multi-hop (3 hops)"],
    "splitfed": ["multi-client (splitfed, 4 clients)", "vanilla"],
    "sequential": ["multi-client (sequential, 4 clients)", "vanilla"],
}
KINDS = ("vanilla", "u-shaped", "vertical", "multi-task", "multi-hop", "multi-client")

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_examples_cover_every_configuration():
    assert {"vanilla", "u_shaped", "vertical", "multi_task", "multi_hop", "splitfed"} <= {p.stem for p in EXAMPLES}
    seen = " | ".join(", ".join(v) for v in EXPECTED.values())
    assert all(kind in seen for kind in KINDS)


def prepared(path: Path) -> Path:
    """An LLM example builds its small model first (`meshsl llm prepare`, as `make run` does); without the
    llm extra it is skipped."""
    if "\n    llm:" in path.read_text() or "llm: {" in path.read_text():
        pytest.importorskip("transformers")
        result = invoke("llm", "prepare", str(path))
        assert result.exit_code == 0, result.output
    return path


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_validates_with_a_comment_header(path):
    assert path.read_text().startswith("#"), f"{path.name} needs a comment header saying what it shows"
    prepared(path)
    result = invoke("validate", str(path))
    assert result.exit_code == 0, result.output
    assert f"{path}: valid (" in result.stdout
    assert "error:" not in result.output


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_plan_json(path):
    topology = load_topology(prepared(path))
    result = invoke("plan", str(path), "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)

    configurations = plan["configurations"]
    if path.stem in EXPECTED:
        assert configurations == EXPECTED[path.stem]
    else:
        assert any(c.startswith(KINDS) for c in configurations), configurations
    assert plan["hash"] == topology.hash and plan["lanes"] == topology.lanes
    assert plan["coordinator"] in plan["nodes"]

    # one plan per concrete node; every segment is hosted exactly where the topology places it
    assert set(plan["nodes"]) == set(topology.nodes)
    for name, node in plan["nodes"].items():
        assert node["party"] == topology.nodes[name].party
        assert node["is_coordinator"] == (name == plan["coordinator"])
        assert set(node["segments"]) == {s for s in topology.segments if name in topology.placement[s]}
        assert node["parameters"] == sum(plan["segments"][s]["parameters"] for s in node["segments"])
        assert set(node["peers"]) == {t["peer"] for t in node["sends"] + node["receives"]}
    assert all(plan["nodes"][n]["segments"] or plan["nodes"][n]["data"] for n in plan["nodes"])

    # edges: bytes per sample are the float32 size of the producer's output, both ways
    assert plan["edges"], "every example has at least one hop"
    assert any(e["cross_party"] for e in plan["edges"].values())
    for name, edge in plan["edges"].items():
        assert name == f"{edge['producer']}->{edge['consumer']}"
        assert edge["shape"] == plan["segments"][edge["producer"]]["output_shape"]
        expected = 4 * math.prod(edge["shape"])
        assert edge["forward_bytes_per_sample"] == edge["backward_bytes_per_sample"] == expected
        if edge["forward_codec"] == "none":
            assert edge["forward_wire_bytes_per_sample"] == expected

    # the privacy contract: only segment activations and their gradients cross, never data or labels;
    # every activation one node sends is received by its peer, and the gradient comes back
    transfers = [(n, t) for n, p in plan["nodes"].items() for t in p["sends"] + p["receives"]]
    assert transfers
    for _node, t in transfers:
        assert t["edge"] in plan["edges"] and t["direction"] in ("activation", "gradient")
        assert t["dtype"] == "float32" and t["shape"][0] == "micro_batch"
        assert t["peer_party"] == topology.nodes[t["peer"]].party
    sends = {(n, t["peer"], t["edge"], t["direction"]) for n, p in plan["nodes"].items() for t in p["sends"]}
    receives = {(t["peer"], n, t["edge"], t["direction"]) for n, p in plan["nodes"].items() for t in p["receives"]}
    assert sends == receives
    for n, peer, edge, direction in sends:
        if direction == "activation":
            assert (peer, n, edge, "gradient") in sends
            assert n in topology.placement[plan["edges"][edge]["producer"]]
    data_names = set(topology.data)
    assert not {t["edge"] for _, t in transfers} & data_names


def test_plan_counts_bytes_per_hop_exactly():
    plan = json.loads(invoke("plan", str(TOPOLOGIES / "multi_hop.yaml"), "--json").stdout)
    hops = {name: e["forward_bytes_per_sample"] for name, e in plan["edges"].items()}
    assert hops == {"stage_0->stage_1": 256, "stage_1->stage_2": 256, "stage_2->stage_3": 256,
                    "stage_3->stage_4": 192}
    # parameters per node: Linear(64,96)+Linear(96,64) on the clinic, Linear(48,10) at the lab
    assert plan["nodes"]["clinic"]["parameters"] == 64 * 96 + 96 + 96 * 64 + 64
    assert plan["nodes"]["lab"]["parameters"] == 48 * 10 + 10
    assert plan["nodes"]["clinic"]["forward_flops_per_sample"] == 2 * (64 * 96 + 96 * 64)


def test_plan_reports_wire_bytes_of_compressed_hops(tmp_path):
    doc = yaml.safe_load((TOPOLOGIES / "vanilla.yaml").read_text())
    doc["privacy"] = [{"segment": "bottom", "forward": {"codec": "fp16"}, "backward": {"codec": "int8"}}]
    path = tmp_path / "compressed.yaml"
    path.write_text(yaml.safe_dump(doc))
    edge = json.loads(invoke("plan", str(path), "--json").stdout)["edges"]["bottom->top"]
    assert edge["forward_bytes_per_sample"] == 256 and edge["forward_wire_bytes_per_sample"] == 128
    assert edge["backward_codec"] == "int8" and edge["backward_wire_bytes_per_sample"] == 64 + 4  # + its scale
    text = invoke("plan", str(path)).stdout
    assert "256 (wire 128)" in text and "256 (wire 68)" in text and "fp16/int8" in text


def test_plan_text_for_people():
    path = TOPOLOGIES / "vertical.yaml"
    result = invoke("plan", str(path))
    assert result.exit_code == 0, result.output
    text = result.stdout
    lines = text.splitlines()
    assert lines[0].startswith("vertical-breast-cancer  hash ")
    assert "configurations: vertical, vanilla" in text
    # the ASCII graph: placement, shapes, a merge of two inputs that cross party boundaries
    assert "(data features_a) @hospital_a/hospital-a [15]" in text
    assert "features_a --> [encoder_a] @hospital_a/hospital-a -> [16]" in text
    assert "encoder_a ~~> + encoder_b ~~> [classifier] @lab/lab -> [2] merge=concat" in text
    assert "[classifier] ==(cross_entropy with diagnosis)==> task cancer" in text
    # tables are not wrapped at 80 columns when stdout is not a terminal: whole rows on one line
    row = next(line for line in lines if line.startswith("│ lab "))
    assert "tcp://127.0.0.1:5723" in row and "classifier" in row and "hospital_a, hospital_b" in row
    assert max(len(line) for line in lines) <= 160
    assert not any("…" in line for line in lines), "truncated cells"
    # the hops table
    assert "hops (bytes per sample)" in text
    hop = next(line for line in lines if "encoder_a->classifier" in line and "yes" in line)
    assert [c.strip() for c in hop.strip("│").split("│")] == ["encoder_a->classifier", "[16]", "yes", "64", "64",
                                                              "none/none"]
    # the privacy contract: per party what it sends and receives
    assert "privacy contract: what each party sends and receives" in text
    contract = [[c.strip() for c in line.strip("│").split("│")] for line in lines
                if line.startswith("│") and "float32[micro_batch, 16]" in line]
    assert ["hospital-a", "hospital_a", "sends activation", "encoder_a->classifier", "float32[micro_batch, 16] (none)",
            "lab (lab)"] in contract
    assert ["hospital-a", "hospital_a", "receives gradient", "encoder_a->classifier",
            "float32[micro_batch, 16] (none)", "lab (lab)"] in contract
    assert ["lab", "lab", "receives activation", "encoder_b->classifier", "float32[micro_batch, 16] (none)",
            "hospital_b (hospital-b)"] in contract
    assert len(contract) == 8
    assert not any(row[0] == "hospital-a" and "hospital-b" in row[5] for row in contract)


def test_plan_text_for_many_clients():
    text = invoke("plan", str(TOPOLOGIES / "splitfed.yaml")).stdout
    assert "(data pixels) @clinic0..clinic3 (4 clients)/clinic-0..clinic-3 [64]" in text
    assert "bottom ~~> [top] @server/lab -> [10]" in text
    assert "clinic0, clinic1, clinic2, clinic3" in text  # the server's peers, on one row


def test_plan_prints_warnings(tmp_path):
    doc = yaml.safe_load((TOPOLOGIES / "vanilla.yaml").read_text())
    doc["segments"][0]["layers"] = [["Linear", 64, 64], ["ReLU"]]
    path = tmp_path / "shallow.yaml"
    path.write_text(yaml.safe_dump(doc))
    result = invoke("plan", str(path))
    assert result.exit_code == 0
    assert "warning: " in result.stdout and "shallow cut" in result.stdout
    validate = invoke("validate", str(path))
    assert validate.exit_code == 0 and "warning: " in validate.stderr and "shallow cut" in validate.stderr


@pytest.mark.parametrize("mutation, message", [
    (lambda d: d["nodes"][1].update(endpoitn="x"), "nodes[1](server).endpoitn: unknown key"),
    (lambda d: d["segments"][1].update(node="cloud"), "segments[1](top).node: is placed on unknown node 'cloud'"),
    (lambda d: d["segments"][0].update(layers=[["Flatten"]]), "segments[0](bottom): has no trainable layer"),
    (lambda d: d["segments"][1]["layers"].__setitem__(0, ["Linear", 32, 64]), "segments[1](top).layers[0]: Linear("),
])
def test_validate_rejects_with_error_lines(tmp_path, mutation, message):
    doc = yaml.safe_load((TOPOLOGIES / "vanilla.yaml").read_text())
    mutation(doc)
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    for command in ("validate", "plan"):
        result = invoke(command, str(path))
        assert result.exit_code == 2
        assert result.stdout == ""
        lines = result.stderr.splitlines()
        assert lines and all(line.startswith("error: ") for line in lines)
        assert f"error: {path}: {message}" in result.stderr
        assert "Traceback" not in result.output


def test_validate_reports_every_problem(tmp_path):
    doc = yaml.safe_load((TOPOLOGIES / "vanilla.yaml").read_text())
    doc["nodes"][0]["colour"] = "red"
    doc["tasks"][0]["lossy"] = True
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(doc))
    result = invoke("validate", str(path))
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [f"error: {path}: nodes[0](client).colour: unknown key",
                                          f"error: {path}: tasks[0](digit).lossy: unknown key (did you mean 'loss'?)"]


def test_validate_missing_file_and_bad_yaml(tmp_path):
    missing = invoke("validate", str(tmp_path / "nope.yaml"))
    assert missing.exit_code == 2 and missing.stderr == f"error: {tmp_path / 'nope.yaml'}: file not found\n"
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: t\nnodes: [\n")
    result = invoke("plan", str(bad), "--json")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith(f"error: {bad}:3:1: invalid YAML")


def test_validate_in_a_real_process(tmp_path):
    """`python -m meshsl` end to end (one process: importing torch is slow): exit code, `error: ` lines, no traceback."""
    doc = yaml.safe_load((TOPOLOGIES / "vanilla.yaml").read_text())
    doc["data"][1]["node"] = "client"  # labels on the clinic, loss at the lab
    bad = tmp_path / "labels.yaml"
    bad.write_text(yaml.safe_dump(doc))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    broken = subprocess.run([sys.executable, "-m", "meshsl", "validate", str(bad)],
                            capture_output=True, text=True, timeout=120, env=env)
    assert broken.returncode != 0
    assert broken.stdout == "" and "Traceback" not in broken.stderr
    assert broken.stderr.splitlines() == [
        f"error: {bad}: tasks[0](digit): labels 'digit_labels' are held by party 'clinic' but output 'top' runs on "
        f"party 'lab': labels or logits would cross a party boundary. Place the output segment on the label holder "
        f"(U-shaped) or move the labels"]
