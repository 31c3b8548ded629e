"""Label leakage through the gradients a label holder sends back: the attacks, the defences, the live
gauge, on real breast-cancer training through the runtime (all nodes in one process)."""
import asyncio
from pathlib import Path

import pytest
import torch
import yaml

from meshsl.apps.audit import audit_labels, quiet_copy
from meshsl.config.loader import parse_spec
from meshsl.launch.metrics import NodeMetrics
from meshsl.privacy.label_attacks import cluster_attack, cosine_attack_auc, label_leakage_report, norm_attack_auc
from meshsl.privacy.label_defences import GradientDefenceSpec, defend, marvell_covariances
from meshsl.coordinator.runtime import RunOptions
from meshsl.launch.simulate import simulate
from meshsl.topology.model import topology_from_spec

ROOT = Path(__file__).resolve().parents[2]


def leaky_gradients(n: int = 400, d: int = 16, seed: int = 0):
    """Rows like a logistic head's: (p - y) * v_i, the rarer class fitted worse (larger |p - y|)."""
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, generator=g) < 0.35).long()
    error = torch.where(y == 1, 0.6 + 0.3 * torch.rand(n, generator=g), 0.1 + 0.3 * torch.rand(n, generator=g))
    sign = torch.where(y == 1, -1.0, 1.0)
    direction = torch.ones(d) + 0.3 * torch.randn((n, d), generator=g)
    return (sign * error)[:, None] * direction, y


def test_attacks_recover_leaky_labels_and_fall_to_chance_on_noise():
    grads, y = leaky_gradients()
    assert norm_attack_auc(grads, y) > 0.95
    assert cosine_attack_auc(grads, y) > 0.95
    cluster = cluster_attack(grads, y, 2)
    assert cluster["accuracy"] > 0.95 and cluster["chance"] == pytest.approx(float((y == 0).float().mean()))
    noise = torch.randn(grads.shape, generator=torch.Generator().manual_seed(1))
    assert norm_attack_auc(noise, y) < 0.6 and cosine_attack_auc(noise, y) < 0.6
    report = label_leakage_report(noise, y, 2)
    assert report["cluster_accuracy"] < report["chance_accuracy"] + 0.1


def test_each_defence_brings_the_attacks_near_chance():
    grads, y = leaky_gradients()
    generator = torch.Generator().manual_seed(0)
    for spec in (GradientDefenceSpec(defence="max_norm"), GradientDefenceSpec(defence="marvell", strength=2.0),
                 GradientDefenceSpec(defence="dp", clip_norm=0.5, noise_multiplier=3.0)):
        defended = defend(grads, spec, generator, labels=y, scale=1.0)
        assert defended.shape == grads.shape
        assert norm_attack_auc(defended, y) < 0.65, spec
    marvell = defend(grads, GradientDefenceSpec(defence="marvell", strength=2.0), generator, labels=y)
    assert cosine_attack_auc(marvell, y) < 0.75  # noise along the class-mean difference hides the direction too


def test_marvell_spends_its_noise_budget_where_it_hides_the_labels():
    grads, y = leaky_gradients()
    found = marvell_covariances(grads.double().numpy(), y.numpy(), strength=1.0)
    diff = grads[y == 1].mean(0) - grads[y == 0].mean(0)
    p = float(y.float().mean())
    d = grads.shape[1]
    power = p * (found["class1"][0] + (d - 1) * found["class1"][1]) + (1 - p) * (found["class0"][0] + (d - 1) * found["class0"][1])
    assert power <= float(diff @ diff) * 1.0001  # within the budget
    assert found["class1"][0] + found["class0"][0] > 0.5 * power  # most of it along the mean difference


def test_defence_spec_is_checked():
    with pytest.raises(ValueError, match="clip_norm"):
        GradientDefenceSpec(defence="dp", noise_multiplier=1.0)
    with pytest.raises(ValueError, match="belong to defence 'dp'"):
        GradientDefenceSpec(defence="max_norm", clip_norm=1.0)


# -- through the runtime ---------------------------------------------------------------------------
def breast_cancer(gradient=None):
    doc = yaml.safe_load((ROOT / "topologies" / "vanilla_breast_cancer.yaml").read_text())
    for node in doc["nodes"]:
        node.pop("metrics_port", None)
    doc["privacy"] = [{"segment": "bottom", "gradient": gradient}] if gradient else []
    return topology_from_spec(parse_spec(doc), "<label-privacy-test>", ROOT / "topologies")


def train(topology):
    summary, runtimes = asyncio.run(simulate(quiet_copy(topology), RunOptions()))
    modules = {s: runtimes[topology.node_of(s)].worker.modules[s].eval() for s in topology.segment_order}
    return summary, modules


@pytest.fixture(scope="module")
def undefended():
    topology = breast_cancer()
    summary, modules = train(topology)
    return topology, summary, modules


def test_undefended_breast_cancer_leaks_its_labels(undefended):
    topology, summary, modules = undefended
    assert summary["tasks"]["diagnosis"]["eval"]["accuracy"] > 0.9
    report = audit_labels(topology, modules)
    edge = report["bottom->top"]
    assert edge["producer_party"] == "clinic" and edge["consumer_party"] == "lab" and edge["defence"] is None
    attacks = edge["tasks"]["diagnosis"]
    assert attacks["n_samples"] == 569 and attacks["classes"] == 2
    assert attacks["norm_auc"] >= 0.9, attacks
    assert attacks["cosine_auc"] >= 0.95 and attacks["cluster_accuracy"] > attacks["chance_accuracy"] + 0.2
    # The label holder's live gauge, sampled every 10th step, reached the history and the summary.
    gauged = [row["label_leakage"]["bottom->top"] for row in summary["history"] if "label_leakage" in row]
    assert len(gauged) == 8 and max(gauged) > 0.9
    assert summary["label_leakage"]["bottom->top"] == gauged[-1]


@pytest.mark.parametrize("gradient", [{"defence": "max_norm"}, {"defence": "marvell", "strength": 1.0}])
def test_a_declared_defence_stops_the_attacks_at_little_cost(gradient, undefended):
    topology = breast_cancer(gradient)
    summary, modules = train(topology)
    attacks = audit_labels(topology, modules)["bottom->top"]["tasks"]["diagnosis"]
    before = audit_labels(undefended[0], undefended[2])["bottom->top"]["tasks"]["diagnosis"]
    assert attacks["norm_auc"] < 0.7 < before["norm_auc"], (gradient, attacks)
    assert attacks["cosine_auc"] < 0.75 < before["cosine_auc"], (gradient, attacks)
    assert summary["tasks"]["diagnosis"]["eval"]["accuracy"] > 0.85
    assert max(summary["label_leakage"].values()) < 0.85  # the live gauge sees what actually left


def test_label_leakage_gauge_is_exported():
    metrics = NodeMetrics("server", "lab", "node", "t", "h")
    metrics.label_leakage("bottom->top", 0.61, 0.93)
    metrics.privacy_epsilon("bottom->top", "activation_dp", 2.5)
    text = metrics.render().decode()
    assert 'meshsl_edge_label_leakage_auc{edge="bottom->top",node="server"} 0.61' in text
    assert 'meshsl_edge_label_leakage_auc_upper_bound{edge="bottom->top",node="server"} 0.93' in text
    assert 'meshsl_privacy_epsilon{edge="bottom->top",mechanism="activation_dp",node="server"} 2.5' in text


def test_marvell_needs_the_labels_at_the_sender():
    from meshsl.errors import ConfigError
    doc = yaml.safe_load((ROOT / "topologies" / "multi_task.yaml").read_text())
    doc["privacy"] = [{"segment": "encoder", "gradient": {"defence": "marvell"}}]  # cloud holds no labels
    with pytest.raises(ConfigError, match=r"privacy\[0\].gradient.*marvell needs the labels"):
        topology_from_spec(parse_spec(doc), "mt.yaml", ROOT / "topologies")
    doc["privacy"] = [{"segment": "trunk", "gradient": {"defence": "marvell"}}]  # lab's digits: 10 classes
    with pytest.raises(ConfigError, match="marvell needs binary labels"):
        topology_from_spec(parse_spec(doc), "mt.yaml", ROOT / "topologies")


def test_gradient_dp_by_target_epsilon_runs_and_exports_its_gauges():
    """Through run_node with a Prometheus registry per node: the label holder exports the live attack AUC
    (realistic, and its upper bound) and the epsilon it has spent, which ends at the calibrated budget."""
    from support.simulation import run
    from meshsl.schedule.accounting import budget
    topology = breast_cancer({"defence": "dp", "clip_norm": 1.0, "target_epsilon": 2.0})
    summary, runtimes, registries = run(topology, metrics=True)
    modules = {s: runtimes[topology.node_of(s)].worker.modules[s].eval() for s in topology.segment_order}
    attacks = audit_labels(topology, modules)["bottom->top"]["tasks"]["diagnosis"]
    assert attacks["norm_auc"] < 0.7 and attacks["cosine_auc"] < 0.75, attacks  # undefended: 0.9+ and 1.0
    spent = budget(topology)["edges"][0]
    assert spent["calibrated"] and 1.9 < spent["epsilon"] <= 2.0 and spent["party"] == "lab"
    assert summary["privacy_budget"]["edges"][0]["epsilon"] == pytest.approx(spent["epsilon"])
    assert summary["tasks"]["diagnosis"]["eval"]["accuracy"] > 0.6
    text = registries["server"].render().decode()
    assert 'meshsl_edge_label_leakage_auc{edge="bottom->top",node="server"}' in text
    gauges = {name: float(line.split()[-1]) for line in text.splitlines()
              for name in ("meshsl_edge_label_leakage_auc{", "meshsl_edge_label_leakage_auc_upper_bound{")
              if line.startswith(name)}
    assert len(gauges) == 2 and 0.0 <= gauges["meshsl_edge_label_leakage_auc{"] <= 1.0
    assert gauges["meshsl_edge_label_leakage_auc_upper_bound{"] < 0.75  # DP at epsilon 2 hides the labels
    epsilon_line = next(line for line in text.splitlines() if line.startswith("meshsl_privacy_epsilon{"))
    assert float(epsilon_line.split()[-1]) == pytest.approx(spent["epsilon"])
    assert "meshsl_privacy_epsilon{" not in registries["client"].render().decode()  # the sender applies it


def test_label_audit_from_saved_weights_matches_the_finished_run(undefended, tmp_path):
    """`meshsl audit --weights DIR` on what `meshsl run --weights-out DIR` saved gives the same attack figures."""
    import json

    from typer.testing import CliRunner

    from meshsl.cli import app
    from meshsl.launch.entry import save_weights
    topology, _, modules = undefended

    class Runtime:  # what save_weights reads from a node runtime
        def __init__(self, node, segment):
            self.node, self.topology = node, topology
            self.worker = type("W", (), {"modules": {segment: modules[segment]}})()

    save_weights(Runtime("client", "bottom"), tmp_path / "weights")
    save_weights(Runtime("server", "top"), tmp_path / "weights")
    expected = audit_labels(topology, modules)["bottom->top"]["tasks"]["diagnosis"]
    result = CliRunner().invoke(app, ["audit", str(ROOT / "topologies" / "vanilla_breast_cancer.yaml"),
                                      "--weights", str(tmp_path / "weights"), "--json", "--probe-epochs", "5"])
    assert result.exit_code == 0, result.output
    found = json.loads(result.output)["label_edges"]["bottom->top"]["tasks"]["diagnosis"]
    for key in ("norm_auc", "cosine_auc", "cluster_accuracy"):
        assert found[key] == pytest.approx(expected[key], abs=1e-6), key
