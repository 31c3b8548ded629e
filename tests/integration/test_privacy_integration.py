"""Privacy and compression switched on from the topology YAML alone, checked end to end through the
real runtime (all nodes in one process over the in-process transport) on scikit-learn digits."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from meshsl.apps.audit import audit_modules
from meshsl.compute.node_data import NodeData
from meshsl.compute.worker import SegmentWorker, build_module
from meshsl.config.loader import parse_spec
from meshsl.errors import ProtocolError
from meshsl.privacy.dp import clip_per_sample, keep_probability
from meshsl.protocol.envelope import Kind
from meshsl.protocol.frames import decode_message
from meshsl.topology.model import topology_from_spec
from support.simulation import run

ROOT = Path(__file__).resolve().parents[2]
STEPS = 60  # about 2.7 epochs of digits at batch 64


def document(privacy=None, label_dp=None, **training) -> dict:
    doc = yaml.safe_load((ROOT / "topologies" / "vanilla.yaml").read_text())
    for node in doc["nodes"]:
        node.pop("metrics_port", None)
    doc["privacy"] = [dict(privacy, segment="bottom")] if privacy else []
    doc["training"].update({"steps": STEPS, "micro_batches": 2, "label_dp": label_dp, **training})
    return doc


def topology_of(doc: dict):
    return topology_from_spec(parse_spec(doc), "<privacy-test>", ROOT)


def modules_of(runtimes) -> dict:
    return {name: module for r in runtimes.values() for name, module in r.worker.modules.items()}


def accuracy(summary) -> float:
    return summary["tasks"]["digit"]["eval"]["accuracy"]


@pytest.fixture(scope="module")
def vanilla():
    """The unprotected, uncompressed baseline, with Prometheus registries (for the live gauge)."""
    topology = topology_of(document())
    summary, runtimes, registries = run(topology, metrics=True)
    return topology, summary, runtimes, registries


# -- NoPeek ---------------------------------------------------------------------------------------
def test_nopeek_lowers_leakage_at_similar_accuracy(vanilla):
    topology, base_summary, base_runtimes, _ = vanilla
    nopeek = topology_of(document({"nopeek": 0.2}))
    summary, runtimes, _ = run(nopeek)
    base = audit_modules(topology, modules_of(base_runtimes), probe_epochs=0)["bottom->top"]
    protected = audit_modules(nopeek, modules_of(runtimes), probe_epochs=0)["bottom->top"]
    # held-out dCor(raw pixels, cut activation) drops, and so does the live gauge of the last sampled step
    assert protected["dcor"] < base["dcor"] - 0.02, (protected["dcor"], base["dcor"])
    assert summary["leakage"]["bottom->top"] < base_summary["leakage"]["bottom->top"] - 0.02
    assert accuracy(summary) > accuracy(base_summary) - 0.08, (accuracy(summary), accuracy(base_summary))
    assert summary["privacy"][0]["nopeek"] == 0.2  # the summary reports what was switched on


# -- live leakage gauge ---------------------------------------------------------------------------
def test_live_leakage_gauge_is_sampled_and_exported(vanilla):
    _, summary, _, registries = vanilla
    sampled = [row["step"] for row in summary["history"] if "leakage" in row]
    every = SegmentWorker.leakage_every
    assert sampled == [s for s in range(STEPS) if s % every == 0]
    value = summary["leakage"]["bottom->top"]
    assert 0.5 < value < 1.0  # a plain MLP cut leaks a lot
    text = registries["client"].render().decode()
    line = next(l for l in text.splitlines() if l.startswith("meshsl_edge_leakage_dcor{"))
    assert 'edge="bottom->top"' in line and 'node="client"' in line
    assert float(line.rsplit(" ", 1)[1]) == pytest.approx(value)
    # only the data holder measures: the server has no raw pixels
    assert "meshsl_edge_leakage_dcor{" not in registries["server"].render().decode()


# -- activation DP --------------------------------------------------------------------------------
def _first_step_activations(topology):
    """Activations of training step 0 as they crossed the wire, by micro-batch."""
    seen = {}

    def hook(sender, peer, frames):
        envelope, tensors = decode_message(list(frames), 2**30)
        if envelope.kind == Kind.ACTIVATION and envelope.phase == "train":
            d = envelope.tensors[0]
            seen.setdefault(envelope.step, {})[envelope.micro_batch] = tensors[0][0].reshape(d.shape).clone()

    run(topology, hook=hook, evaluate=False)
    return seen[min(seen)]


def _clean_activation(topology, micro_batch: int) -> torch.Tensor:
    data = NodeData(topology, "client")
    rows = data.rows("train", 0, 0, 0, micro_batch, topology.spec.training.micro_batches)
    with torch.no_grad():
        return build_module(topology, "bottom")(data.get("pixels", rows, "train"))


def test_activation_dp_noise_has_the_declared_scale():
    clip, sigma = 0.5, 0.8
    topology = topology_of(document({"dp": {"clip_norm": clip, "noise_multiplier": sigma}}, steps=1))
    wire = _first_step_activations(topology)
    residuals = []
    for mb, sent in wire.items():
        clean = _clean_activation(topology, mb)
        assert bool((clean.norm(dim=1) > clip).all())  # the clean activations really needed clipping
        residuals.append((sent - clip_per_sample(clean, clip)).reshape(-1))
    noise = torch.cat(residuals)
    assert noise.numel() == 64 * 64
    assert float(noise.std()) == pytest.approx(sigma * clip, rel=0.05)
    assert abs(float(noise.mean())) < 0.05 * sigma * clip


def test_activation_dp_clipping_bounds_the_per_sample_norm():
    clip = 0.6
    topology = topology_of(document({"dp": {"clip_norm": clip, "noise_multiplier": 0.0}}, steps=1))
    for mb, sent in _first_step_activations(topology).items():
        clean = _clean_activation(topology, mb)
        norms = sent.norm(dim=1)
        assert float(norms.max()) <= clip * (1 + 1e-5)
        torch.testing.assert_close(sent, clean * (clip / clean.norm(dim=1, keepdim=True)).clamp(max=1.0))


# -- label DP -------------------------------------------------------------------------------------
def test_label_dp_flips_labels_at_the_declared_rate(monkeypatch):
    epsilon = 1.0
    topology = topology_of(document(label_dp={"epsilon": epsilon}, steps=26, batch_size=128))
    used = []  # (sample id, label the loss saw) from the worker's own label-DP path
    original = SegmentWorker.private_labels

    def recording(self, task, labels, rows=None):
        noisy = original(self, task, labels, rows)
        used.extend(zip(np.asarray(rows).tolist(), noisy.tolist()))
        return noisy

    monkeypatch.setattr(SegmentWorker, "private_labels", recording)
    summary, _, _ = run(topology, evaluate=False)
    truth = NodeData(topology, "server").tensors["digit_labels"]
    ids = torch.tensor([i for i, _ in used])
    noisy = torch.tensor([y for _, y in used])
    assert len(used) == 26 * 128
    per_sample = {}
    for i, y in used:  # 26 steps of 128 > one epoch: many samples are seen twice
        per_sample.setdefault(i, set()).add(y)
    assert sum(1 for i, _ in used) - len(per_sample) > 1000
    assert all(len(ys) == 1 for ys in per_sample.values())  # one response per sample, not one per epoch
    unique = torch.tensor(sorted(per_sample))
    flipped = torch.tensor([next(iter(per_sample[int(i)])) for i in unique]) != truth[unique]
    expected = 1 - keep_probability(10, epsilon)
    tolerance = 4 * math.sqrt(expected * (1 - expected) / len(unique))
    assert abs(float(flipped.float().mean()) - expected) < tolerance
    # a flipped label is uniform over the 9 other classes
    offsets = ((noisy - truth[ids]) % 10)[noisy != truth[ids]]
    shares = torch.bincount(offsets, minlength=10)[1:].float() / len(offsets)
    assert float(shares.max() - shares.min()) < 0.06
    assert summary["label_dp"] == {"epsilon": epsilon}


# -- compression ----------------------------------------------------------------------------------
def _payload(summary, direction: str) -> int:
    return summary["edges"]["bottom->top"][f"{direction}_bytes"]


def test_int8_cuts_bytes_four_fold_with_bounded_accuracy_loss(vanilla):
    _, base, _, _ = vanilla
    topology = topology_of(document({"forward": {"codec": "int8"}, "backward": {"codec": "int8"}}))
    summary, _, _ = run(topology)
    for direction in ("forward", "backward"):
        # whole messages are counted (JSON header included), so a little under the payload's 256/68
        assert _payload(base, direction) / _payload(summary, direction) > 3.3
    assert base["bytes_per_sample"]["bottom->top"] / summary["bytes_per_sample"]["bottom->top"] > 3.3
    assert accuracy(summary) > accuracy(base) - 0.03, (accuracy(summary), accuracy(base))


def test_half_precision_codecs_halve_the_bytes(vanilla):
    _, base, _, _ = vanilla
    topology = topology_of(document({"forward": {"codec": "fp16"}, "backward": {"codec": "bf16"}}))
    summary, _, _ = run(topology)
    for direction in ("forward", "backward"):
        assert 1.8 < _payload(base, direction) / _payload(summary, direction) <= 2.0
    assert accuracy(summary) > accuracy(base) - 0.03


def test_topk_forward_with_int8_backward_still_trains(vanilla):
    _, base, _, _ = vanilla
    topology = topology_of(document({"forward": {"codec": "topk", "ratio": 0.25}, "backward": {"codec": "int8"}}))
    summary, _, _ = run(topology)
    # top-k sends 16 of 64 values with their int32 indices: 128 instead of 256 bytes per sample
    assert 1.7 < _payload(base, "forward") / _payload(summary, "forward") < 2.0
    assert _payload(base, "backward") / _payload(summary, "backward") > 3.3
    history = summary["history"]
    assert history[-1]["tasks"]["digit"]["loss"] < 0.5 * history[0]["tasks"]["digit"]["loss"]
    assert accuracy(summary) > accuracy(base) - 0.05  # no error feedback on activations by default


def test_a_peer_with_another_codec_is_rejected():
    from meshsl.plans.nodeplan import build_edges
    from meshsl.node.wire import EdgeCodecs
    sender_topo = topology_of(document({"forward": {"codec": "int8"}}))
    receiver_topo = topology_of(document())
    sender = EdgeCodecs(build_edges(sender_topo))
    receiver = EdgeCodecs(build_edges(receiver_topo))
    descriptor, parts = sender.encode("bottom->top", "act", torch.randn(8, 64), slot=(0, 0))
    with pytest.raises(ProtocolError) as caught:
        receiver.decode(receiver.edges["bottom->top"], "act", descriptor, parts, max_rows=32)
    assert caught.value.reason == "bad_codec"
    # and the matching side accepts it
    decoded = EdgeCodecs(build_edges(sender_topo)).decode(sender.edges["bottom->top"], "act", descriptor, parts, 32)
    assert decoded.shape == (8, 64)
