"""Label leakage as an attacker sees it: the gradient rows the feature party received, step by step.

The wire-level check captures every gradient message the lab sends the clinic (the in-process transport's
traffic hook, frames as sent), decodes them with the protocol's decoder, maps every row to its sample by
re-deriving the sampler, and recomputes the attacks with its own code (scikit-learn's AUC, an eigen-
decomposition instead of an SVD). The audit's trajectory figures (from the clinic's own recording) must
equal these to 3 decimals, for every defence.
"""
import asyncio
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import yaml
from sklearn.metrics import roc_auc_score

from meshsl.apps.audit_trajectory import audit_run, load_recordings, recording_copy
from meshsl.protocol.compression import make_codec
from meshsl.config.loader import parse_spec
from meshsl.data import batch_indices, load_source
from meshsl.errors import ConfigError
from meshsl.schedule.steps import epoch_steps, sample_pools
from meshsl.privacy.trajectory_attacks import attack_step, phase_figures
from meshsl.protocol.envelope import Kind
from meshsl.protocol.frames import TORCH_DTYPES, decode_message
from meshsl.coordinator.runtime import RunOptions
from meshsl.launch.simulate import simulate
from meshsl.topology.model import topology_from_spec

ROOT = Path(__file__).resolve().parents[2]
DEFENCES = {"none": None, "max_norm": {"defence": "max_norm"}, "marvell": {"defence": "marvell", "strength": 1.0},
            "dp_eps1": {"defence": "dp", "clip_norm": 1.0, "target_epsilon": 1.0}}


def breast_cancer(gradient=None):
    doc = yaml.safe_load((ROOT / "topologies" / "vanilla_breast_cancer.yaml").read_text())
    if gradient is not None:
        doc["privacy"] = [{"segment": "bottom", "gradient": gradient}]
    return topology_from_spec(parse_spec(doc), "<trajectory-test>", ROOT / "topologies")


class GradientCapture:
    """Traffic hook: every training gradient message sent to `receiver`, decoded as its receiver would."""

    def __init__(self, receiver: str) -> None:
        self.receiver = receiver
        self.by_round: dict[int, dict[int, np.ndarray]] = defaultdict(dict)

    def __call__(self, sender, peer, frames) -> None:
        if peer != self.receiver:
            return
        envelope, parts = decode_message([bytearray(f) for f in frames], 1 << 30)
        if envelope.kind != Kind.GRADIENT or envelope.phase != "train":
            return
        descriptor = envelope.tensors[0]
        value = make_codec({"codec": descriptor.codec}).decode([p.clone() for p in parts[0]], descriptor.shape,
                                                               TORCH_DTYPES[descriptor.dtype])
        self.by_round[envelope.step][envelope.micro_batch] = value.reshape(value.shape[0], -1).double().numpy()


def independent_figures(topology, capture: GradientCapture) -> dict:
    """Per-phase figures from the captured wire, with this file's own attack code."""
    training = topology.spec.training
    pool = sample_pools(topology).train[0]
    per_epoch = len(epoch_steps(topology))
    y = np.asarray(load_source(topology.data["diagnoses"], topology.base_dir).labels)
    minority = int(np.argmin(np.bincount(y[pool])))
    prior = float(np.mean(y[pool] == minority))
    steps = []
    for step, round_ in enumerate(sorted(capture.by_round)):
        epoch, within = divmod(step, per_epoch)
        batch = batch_indices(pool, training.batch_size, training.seed, epoch, within, 0)
        samples = np.array_split(batch, training.micro_batches)
        rows = np.concatenate([capture.by_round[round_][mb] for mb in range(training.micro_batches)])
        positive = np.concatenate([y[s] for s in samples]) == minority
        steps.append(_attacks(rows, positive, prior) | {"step": step, "epoch": epoch})
    return steps


def _auc(score, positive):
    return float(roc_auc_score(positive, score)) if 0 < positive.sum() < len(positive) else 0.5


def _attacks(rows: np.ndarray, positive: np.ndarray, prior: float) -> dict:
    unit = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-30)
    centred = unit - unit.mean(axis=0)
    values, vectors = np.linalg.eigh(centred.T @ centred)
    axis = vectors[:, np.argmax(values)]
    axis = axis if axis[np.argmax(np.abs(axis))] >= 0 else -axis
    score = centred @ axis
    if abs(len(rows) - (score > 0).sum() - prior * len(rows)) < abs((score > 0).sum() - prior * len(rows)):
        score = -score
    norms = np.linalg.norm(rows, axis=1)
    side = 1.0 if _auc(norms, score > 0) >= 0.5 else -1.0
    refs = np.flatnonzero(positive)
    cosine = 0.5
    if 2 <= len(refs) < len(positive):
        cosine = float(np.mean([_auc(np.delete(unit, r, 0) @ unit[r], np.delete(positive, r)) for r in refs]))
    return {"norm": _auc(side * norms, positive), "norm_raw": _auc(norms, positive),
            "direction": _auc(score, positive), "cosine": cosine}


def phase(steps: list[dict]) -> dict:
    mean = {k: float(np.mean([s[k] for s in steps])) for k in ("norm", "norm_raw", "direction", "cosine")}
    return {"realistic": (mean["norm"], mean["direction"], mean["norm_raw"]),
            "upper_bound": (max(mean["norm_raw"], 1 - mean["norm_raw"], mean["norm"], 1 - mean["norm"]),
                            max(mean["cosine"], 1 - mean["cosine"], mean["direction"], 1 - mean["direction"]))}


@pytest.mark.parametrize("name", list(DEFENCES))
def test_audit_trajectory_equals_an_independent_recomputation_from_the_wire(name, tmp_path):
    topology = recording_copy(breast_cancer(DEFENCES[name]), tmp_path / "rec")
    capture = GradientCapture("client")
    summary, _ = asyncio.run(simulate(topology, RunOptions(), traffic_hook=capture))
    assert summary["steps"] == 75 and len(capture.by_round) == 75
    document = audit_run(topology, tmp_path / "rec")
    report = document["label_edges"]["bottom->top"]["tasks"]["diagnosis"]
    assert report["node"] == "client" and report["party"] == "clinic" and report["held_out_rows_dropped"] == 0
    assert report["rows"] == 75 * 32
    # Kept at the receiving party only: the clinic holds the gradients, the lab the activations.
    recordings, _ = load_recordings(tmp_path / "rec")
    assert {(r.node, r.direction) for r in recordings} == {("client", "gradient"), ("server", "activation")}
    held_out = set(sample_pools(topology).test.tolist())
    assert not held_out & set(next(r for r in recordings if r.direction == "gradient").arrays["sample"].tolist())
    wire = independent_figures(topology, capture)
    phases = {"steps 0-4": [s for s in wire if s["step"] <= 4],
              "steps 5-14": [s for s in wire if 5 <= s["step"] <= 14],
              "last epoch": [s for s in wire if s["epoch"] == 4], "all steps": wire,
              **{f"epoch {e}": [s for s in wire if s["epoch"] == e] for e in range(5)}}
    assert set(report["phases"]) == set(phases)
    for label, chosen in phases.items():
        expected, got = phase(chosen), report["phases"][label]
        realistic = got["realistic"]
        real = (realistic["norm_auc"], realistic["direction_auc"], realistic["norm_auc_paper_side"])
        upper = (got["upper_bound"]["norm_auc"], got["upper_bound"]["direction_auc"])
        assert np.round(real, 3).tolist() == np.round(expected["realistic"], 3).tolist(), (name, label)
        assert np.round(upper, 3).tolist() == np.round(expected["upper_bound"], 3).tolist(), (name, label)
        if name != "none":  # every defence holds from step 0: no phase above 0.6 realistic, 0.65 upper bound
            assert max(real[:2]) <= 0.6 and max(upper) <= 0.65, (name, label)
    if name == "none":  # the undefended wire leaks the direction from the first step
        assert report["phases"]["steps 0-4"]["realistic"]["direction_auc"] > 0.95


def test_step_attacks_see_a_clean_split_and_nothing_in_noise():
    rng = np.random.default_rng(0)
    positive = rng.random(64) < 0.35
    base = np.ones(16) + 0.3 * rng.standard_normal((64, 16))
    leaky = np.where(positive, -1.0, 1.0)[:, None] * base * np.where(positive, 0.2, 1.0)[:, None]
    step = attack_step(leaky, positive, prior=0.35)
    assert step.direction == 1.0 and step.norm == 1.0 and step.norm_raw == 0.0  # positives fitted best
    noise = [attack_step(rng.standard_normal((32, 16)), rng.random(32) < 0.35, 0.35, s) for s in range(40)]
    figures = phase_figures(noise)
    realistic = figures["realistic"]
    assert abs(realistic["norm_auc"] - 0.5) < 0.06 and abs(realistic["direction_auc"] - 0.5) < 0.06
    assert figures["upper_bound"]["direction_auc"] < 0.56 and figures["best_single_step"]["norm_auc"] > 0.6


def test_audit_cli_reads_a_recorded_run(tmp_path):
    from typer.testing import CliRunner
    from meshsl.cli import app
    doc = yaml.safe_load((ROOT / "topologies" / "vanilla_breast_cancer.yaml").read_text())
    doc["nodes"] = [dict(n, metrics_port=None) for n in doc["nodes"]]
    doc["privacy"] = [{"segment": "bottom", "gradient": {"defence": "max_norm"}, "record": "rec"}]
    doc["training"]["epochs"] = 1
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert CliRunner().invoke(app, ["simulate", str(path)]).exit_code == 0
    assert sorted(p.name for p in (tmp_path / "rec" / "client").iterdir()) == ["bottom__top.gradient.npz", "meta.json"]
    result = CliRunner().invoke(app, ["audit", "--run", str(tmp_path / "rec"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)["label_edges"]["bottom->top"]["tasks"]["diagnosis"]
    assert report["rows"] == 15 * 32 and set(report["phases"]) == {"steps 0-4", "steps 5-14", "epoch 0",
                                                                     "last epoch", "all steps"}
    text = CliRunner().invoke(app, ["audit", "--run", str(tmp_path / "rec")])
    assert text.exit_code == 0 and "upper bound" in text.output and "held-out rows dropped" in text.output


def test_recordings_of_another_topology_are_refused(tmp_path):
    topology = recording_copy(breast_cancer(), tmp_path / "rec")
    asyncio.run(simulate(topology, RunOptions(steps=2, evaluate=False)))
    with pytest.raises(ConfigError, match="not of this one"):
        audit_run(breast_cancer({"defence": "max_norm"}), tmp_path / "rec")
    with pytest.raises(ConfigError, match="no recordings"):
        audit_run(topology, tmp_path)
