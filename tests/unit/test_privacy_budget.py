"""Privacy budgets in (epsilon, delta): Opacus's accountant, noise calibrated from a target epsilon,
runs over budget refused before they start; and the rest of the privacy contract in `meshsl plan`."""
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from meshsl.cli import app
from meshsl.config.loader import parse_spec
from meshsl.errors import ConfigError
from meshsl.schedule.accounting import PrivacyBudgetError, budget, calibrate, check_budget, epsilon
from meshsl.topology.model import load_topology, topology_from_spec

opacus = pytest.importorskip("opacus")

ROOT = Path(__file__).resolve().parents[2]


def vanilla(privacy=None, label_dp=None, **training):
    doc = yaml.safe_load((ROOT / "topologies" / "vanilla.yaml").read_text())
    for node in doc["nodes"]:
        node.pop("metrics_port", None)
    doc["privacy"] = [dict(privacy, segment="bottom")] if privacy else []
    doc["training"].update(label_dp=label_dp, **training)
    return doc


def topology_of(doc):
    return topology_from_spec(parse_spec(doc), "v.yaml", ROOT / "topologies")


@pytest.mark.parametrize("sigma, rate, steps", [(1.0, 0.01, 1000), (0.8, 64 / 1437, 138), (2.0, 1.0, 6), (1.1, 0.25, 40)])
def test_epsilon_matches_opacus_for_the_same_noise_rate_and_steps(sigma, rate, steps):
    from opacus.accountants import RDPAccountant
    accountant = RDPAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=sigma, sample_rate=rate)
    assert epsilon(sigma, rate, steps, 1e-5) == pytest.approx(accountant.get_epsilon(delta=1e-5), rel=1e-9)


def test_target_epsilon_calibrates_the_noise_and_the_summary_reports_the_budget():
    topology = topology_of(vanilla({"dp": {"clip_norm": 1.0, "target_epsilon": 4.0, "delta": 1e-5}}, epochs=6))
    report = budget(topology)
    edge = report["edges"][0]
    assert edge["calibrated"] and edge["edge"] == "bottom->top" and edge["protects"] == "features of clinic"
    # Batch membership is shared by all parties: no amplification, one release per epoch.
    assert edge["sample_rate"] == 1.0 and edge["releases"] == 6 and report["steps"] == 138
    assert 3.9 < edge["epsilon"] <= 4.0
    assert edge["noise_multiplier"] == pytest.approx(calibrate(4.0, 1.0, 6, 1e-5))
    assert report["parties"]["clinic"]["features"]["epsilon"] == pytest.approx(edge["epsilon"])
    # Less noise than calibrated would overspend.
    assert epsilon(edge["noise_multiplier"] * 0.9, 1.0, 6, 1e-5) > 4.0


def test_label_dp_and_gradient_dp_report_the_label_party():
    doc = vanilla({"gradient": {"defence": "dp", "clip_norm": 1.0, "noise_multiplier": 2.0, "amplification": True}},
                  label_dp={"epsilon": 2.0}, steps=50)
    report = budget(topology_of(doc))
    edge = report["edges"][0]
    assert edge["mechanism"] == "gradient_dp" and edge["party"] == "lab"
    assert edge["sample_rate"] == pytest.approx(64 / 1438, rel=0.01) and edge["releases"] == 50
    labels = report["parties"]["lab"]["labels"]
    assert labels["epsilon"] == min(2.0, edge["epsilon"]) and report["label_dp"] == {"epsilon": 2.0, "delta": 0.0}


def test_a_run_over_the_declared_budget_stops_before_it_starts(tmp_path):
    doc = vanilla({"dp": {"clip_norm": 1.0, "noise_multiplier": 0.5, "target_epsilon": 3.0}}, epochs=6)
    with pytest.raises(ConfigError, match=r"privacy\[0\]\.dp\.target_epsilon: activation_dp on edge bottom->top "
                                          r"would reach epsilon \d+\.\d+"):
        topology_of(doc)
    # Calibrated for the YAML's 2 epochs, then asked for 10: refused by `meshsl run` before any node starts.
    doc = vanilla({"dp": {"clip_norm": 1.0, "target_epsilon": 3.0}}, epochs=2)
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(doc))
    topology = load_topology(path)
    with pytest.raises(PrivacyBudgetError):
        check_budget(topology, steps=230)
    result = CliRunner().invoke(app, ["run", str(path), "--epochs", "10", "--run-dir", str(tmp_path / "run"),
                                      "--no-progress"])
    assert result.exit_code != 0
    assert "over the declared target_epsilon 3" in result.output
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").rglob("*.log"))


def test_plan_lists_control_figures_and_the_budget(tmp_path):
    result = CliRunner().invoke(app, ["plan", str(ROOT / "topologies" / "multi_task.yaml"), "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    figures = {(f["party"], f["figure"], f["to_party"]) for f in document["control_contract"]}
    assert ("insurer", "task parity: loss_sum, correct, count", "lab") in figures
    assert ("clinic", "dCor reading of edge encoder->trunk", "lab") in figures
    assert ("insurer", "label-attack AUCs (realistic, upper bound) of edge trunk->parity_head", "lab") in figures
    assert not any(f["party"] == "lab" for f in document["control_contract"])  # the coordinator's own party
    assert document["privacy_budget"] is None
    path = tmp_path / "dp.yaml"
    path.write_text(yaml.safe_dump(vanilla({"dp": {"clip_norm": 1.0, "target_epsilon": 4.0}})))
    result = CliRunner().invoke(app, ["plan", str(path)], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "privacy budget over 138 steps" in result.output and "(calibrated)" in result.output


def shallow(layers):
    doc = vanilla()
    doc["segments"][0]["layers"] = layers
    doc["segments"][1]["layers"][0] = ["Linear", 32, 64]
    return topology_of(doc).warnings


def test_shallow_cut_lint_sees_a_composition_of_linear_maps():
    composed = shallow([["Linear", 64, 48, {"bias": False}], ["Dropout", 0.0], ["Linear", 48, 32, {"bias": False}]])
    assert any("shallow cut" in w for w in composed), composed
    assert any("shallow cut" in w for w in shallow([["Linear", 64, 32]]))
    assert not any("shallow cut" in w for w in shallow([["Linear", 64, 48], ["ReLU"], ["Linear", 48, 32]]))


def test_configuration_recognition_names_the_u_shaped_part_of_a_mixed_topology():
    doc = yaml.safe_load((ROOT / "topologies" / "multi_task.yaml").read_text())
    # The digit head goes back to the clinic (which holds the pixels), parity labels stay with the insurer.
    doc["segments"][2]["node"] = "clinic"
    doc["data"][1]["node"] = "clinic"
    doc["training"]["coordinator"] = "clinic"
    doc["nodes"] = [n for n in doc["nodes"] if n["name"] != "lab"]  # it holds nothing now (an idle node is refused)
    kinds = topology_of(doc).recognised_configurations()
    assert "vanilla" in kinds and "u-shaped part (task digit)" in kinds, kinds
    assert not any(k.startswith("u-shaped part") for k in load_topology(ROOT / "topologies" / "multi_task.yaml")
                   .recognised_configurations())


def test_target_epsilon_needs_a_release_to_calibrate_against():
    doc = yaml.safe_load((ROOT / "topologies" / "multi_hop.yaml").read_text())
    doc["privacy"] = [{"segment": "stage_4", "dp": {"clip_norm": 1.0, "target_epsilon": 2.0}}]  # the last one
    with pytest.raises(ConfigError, match="no release to calibrate target_epsilon against"):
        topology_from_spec(parse_spec(doc), "mh.yaml", ROOT / "topologies")
