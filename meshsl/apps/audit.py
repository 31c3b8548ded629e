"""Leakage audit: for every edge that crosses a party boundary, how much of the producing party's raw
input can the receiving party recover from what it sees?

Two measures, both on held-out rows (the topology's test pool, never used for training):

* distance correlation dCor(raw inputs, activation): 0 for independence, 1 for a similarity
  transform of the input;
* a model-inversion probe: a decoder (MLP + linear skip) trained on part of the held-out pairs
  (an attacker with auxiliary paired data) reconstructs the inputs of the rest. Its error is
  relative to predicting the mean input (1.0: nothing recovered, 0.0: perfect reconstruction).

The activation audited is what actually crosses the wire: after the edge's clipping and Gaussian
noise (activation DP) and after the forward codec's lossy round trip (int8, top-k, fp16, ...).

The model is either trained first (in-process `simulate`, the same code path as `meshsl run`) or
loaded from the safetensors files that `meshsl run --weights-out DIR` writes.
"""
from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import networkx as nx
import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from meshsl.node.align_runner import aligned_rows
from meshsl.protocol.compression import make_codec
from meshsl.models.layers import merge_inputs
from meshsl.compute.tasks import task_loss
from meshsl.compute.worker import build_module
from meshsl.data import dataset_rows, load_source
from meshsl.errors import ConfigError
from meshsl.schedule.steps import sample_pools
from meshsl.schedule.accounting import budget, effective_dp, gradient_noise
from meshsl.privacy.dp import clip_and_noise, randomized_response
from meshsl.privacy.inversion import leakage_report
from meshsl.privacy.label_attacks import label_leakage_report
from meshsl.privacy.label_defences import defend
from meshsl.privacy.token_recovery import token_recovery_report
from meshsl.coordinator.runtime import RunOptions
from meshsl.launch.simulate import simulate
from meshsl.topology.model import topology_from_spec

AUDIT_SEED = 1234


# -- the model -------------------------------------------------------------------------------------
def quiet_copy(topology):
    """The same topology without metrics ports and checkpoints, for in-process training runs."""
    spec = topology.spec
    nodes = [n.model_copy(update={"metrics_port": None}) for n in spec.nodes]
    checkpoint = spec.checkpoint.model_copy(update={"every": 0})
    copy = spec.model_copy(update={"nodes": nodes, "checkpoint": checkpoint})
    return topology_from_spec(copy, topology.source, topology.base_dir)


def train_modules(topology, steps: Optional[int] = None, epochs: Optional[int] = None,
                  evaluate: bool = True) -> tuple[dict[str, torch.nn.Module], dict]:
    """Train with the real runtime (all nodes in this process); returns lane-0 modules and the summary."""
    quiet = quiet_copy(topology)
    summary, runtimes = asyncio.run(simulate(quiet, RunOptions(steps=steps, epochs=epochs, evaluate=evaluate)))
    modules = {}
    for segment in topology.segment_order:
        node = topology.node_of(segment, 0)
        modules[segment] = runtimes[node].worker.modules[segment].cpu().eval()
    return modules, summary


def load_modules(topology, directory: Path) -> dict[str, torch.nn.Module]:
    """Modules with weights from `meshsl run --weights-out DIR` (safetensors; lane 0 for replicated segments)."""

    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError("weights directory not found", str(directory))
    modules = {}
    for segment in topology.segment_order:
        names = [f"{segment}.safetensors"]
        if topology.is_replicated(segment):
            names.insert(0, f"{segment}@{topology.node_of(segment, 0)}.safetensors")
        path = next((directory / n for n in names if (directory / n).is_file()), None)
        if path is None:
            raise ConfigError(f"no weights for segment {segment!r} (looked for {', '.join(names)})", str(directory))
        module = build_module(topology, segment)
        try:
            state = load_file(str(path))
            module.load_state_dict(state)
        except (SafetensorError, RuntimeError, OSError) as exc:
            raise ConfigError(f"cannot load weights of segment {segment!r}: {str(exc)[:300]}", str(path)) from None
        modules[segment] = module.eval()
    return modules


# -- data and activations --------------------------------------------------------------------------
def feature_tensors(topology, rows: np.ndarray) -> dict[str, torch.Tensor]:
    """Every feature data source at the given sample ids (the auditor sees all parties' data)."""
    values = {}
    index = np.asarray(rows)
    for name, spec in topology.data.items():
        if spec.kind != "features":
            continue
        aligned = aligned_rows(topology, topology.placement[name][0], name)  # sample ids matched by PSI
        at = index if aligned is None else aligned[index]
        # Rows that all lie near the top of the file (the plan's untrained probe) read only that far.
        head = int(at.max()) + 1 if len(at) else None
        if head is not None and head >= dataset_rows(spec.source_dataset, topology.base_dir):
            head = None
        table = load_source(spec, topology.base_dir, head=head)
        values[name] = torch.as_tensor(np.ascontiguousarray(table.features[at]), dtype=torch.float32)
    return values


def crossing_value(topology, segment: str, output: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """What a peer receives from `segment`: after activation DP and the forward codec's round trip."""
    edge = next((p for p in topology.spec.privacy if p.segment == segment), None)
    if edge is None:
        return output
    if edge.dp is not None:
        output = clip_and_noise(output, effective_dp(topology, segment), generator)
    codec = make_codec(edge.forward)
    if codec.name != "none":
        parts = codec.encode(output.float(), slot=("audit", segment))
        output = codec.decode(parts, tuple(output.shape), torch.float32)
        codec.reset()
    return output


@torch.no_grad()
def forward_all(topology, modules: dict[str, torch.nn.Module], rows: np.ndarray,
                seed: int = AUDIT_SEED) -> dict[str, torch.Tensor]:
    """Raw features and the crossing value of every segment on `rows`, in one process."""
    values = feature_tensors(topology, rows)
    generator = torch.Generator().manual_seed(seed)
    for name in topology.segment_order:
        spec = topology.segments[name]
        output = modules[name](merge_inputs([values[i] for i in spec.inputs], spec.merge))
        values[name] = crossing_value(topology, name, output, generator)
    return values


def raw_sources(topology, segment: str) -> list[str]:
    """Feature sources upstream of `segment`: the producing party's own if it has any, else all of them
    (a middle hop relays someone else's data, and that is what its activations leak)."""
    upstream = nx.ancestors(topology.graph, segment)
    features = [n for n, d in topology.data.items() if d.kind == "features" and n in upstream]
    party = topology.party_of(segment)
    own = [n for n in features if topology.party_of(n) == party]
    return own or features


def flat_raw(values: dict[str, torch.Tensor], sources: list[str]) -> torch.Tensor:
    return torch.cat([values[s].reshape(values[s].shape[0], -1) for s in sources], dim=1)


# -- the audit -------------------------------------------------------------------------------------
def audit_modules(topology, modules: dict[str, torch.nn.Module], *, max_samples: int = 1024,
                  probe_epochs: int = 200, seed: int = AUDIT_SEED) -> dict[str, dict]:
    """Per cut edge: dCor and inversion-probe figures on the held-out rows."""
    rows = np.asarray(sample_pools(topology).test)
    if len(rows) < 10:
        raise ConfigError(f"the held-out set has {len(rows)} rows; the audit needs at least 10 "
                          f"(raise dataset.test_fraction)", f"{topology.source}: data")
    rows = rows[:max_samples]
    values = forward_all(topology, modules, rows, seed)
    privacy = {p.segment: p for p in topology.spec.privacy}
    reports: dict[str, dict] = {}
    cache: dict[str, dict] = {}
    for producer, consumer in topology.cut_edges():
        edge = f"{producer}->{consumer}"
        sources = raw_sources(topology, producer)
        entry = {"producer": producer, "consumer": consumer,
                 "producer_party": topology.party_of(producer), "consumer_party": topology.party_of(consumer),
                 "raw_sources": sources}
        spec = privacy.get(producer)
        entry["nopeek"] = spec.nopeek if spec else 0.0
        entry["dp"] = spec.dp.model_dump() if spec and spec.dp else None
        entry["forward_codec"] = spec.forward.codec if spec else "none"
        if not sources:
            entry.update(dcor=None, note="no raw features upstream of this edge")
            reports[edge] = entry
            continue
        if producer not in cache and topology.segments[producer].llm is not None:  # hidden states of an LLM
            cache[producer] = token_report(topology, values, producer, sources, seed)
        if producer not in cache:
            cache[producer] = leakage_report(flat_raw(values, sources), values[producer], seed=seed,
                                             max_dcor_samples=max_samples, epochs=probe_epochs)
        entry.update(cache[producer])
        reports[edge] = entry
    return reports


def token_report(topology, values: dict[str, torch.Tensor], producer: str, sources: list[str], seed: int) -> dict:
    """An LLM cut: the fraction of the client's tokens the receiver recovers (meshsl.privacy.token_recovery),
    with the public base model's input embeddings that the receiver holds too (it runs the same base)."""
    from meshsl.models.llm_parts import load_causal_lm
    lm: Any = load_causal_lm(topology.segments[producer].llm.model)  # a transformers model
    embedding = lm.get_input_embeddings().weight.detach()
    return {"dcor": None, "token_recovery": token_recovery_report(values[producer], values[sources[0]], embedding,
                                                                   seed=seed)}


# -- label leakage ---------------------------------------------------------------------------------
def label_tensors(topology, rows: np.ndarray) -> dict[str, torch.Tensor]:
    """Every labels source at the given sample ids."""
    values = {}
    for name, spec in topology.data.items():
        if spec.kind == "labels":
            table = load_source(spec, topology.base_dir)
            values[name] = torch.as_tensor(np.asarray(table.labels)[np.asarray(rows)])
    return values


def _straight_through(output: torch.Tensor, crossed: torch.Tensor) -> torch.Tensor:
    """The crossed value forward, the identity backward (a codec round trip has no useful gradient)."""
    return output + (crossed - output).detach()


def _backward_crossing(topology, producer: str, grad: torch.Tensor) -> torch.Tensor:
    """The backward codec's round trip of a gradient on the producer's privacy entry."""
    edge = next((p for p in topology.spec.privacy if p.segment == producer), None)
    if edge is None:
        return grad
    codec = make_codec(edge.backward)
    if codec.name == "none":
        return grad
    parts = codec.encode(grad.float(), slot=("audit-backward", producer))
    value = codec.decode(parts, tuple(grad.shape), torch.float32)
    codec.reset()
    return value


def _codec_round_trip(spec, value: torch.Tensor, segment: str) -> torch.Tensor:
    codec = make_codec(spec)
    if codec.name == "none":
        return value
    parts = codec.encode(value.float(), slot=("audit-forward", segment))
    out = codec.decode(parts, tuple(value.shape), torch.float32)
    codec.reset()
    return out


def label_tasks(topology, producer: str, consumer: str) -> list:
    """Classification tasks whose loss reaches `producer` through `consumer` with labels of another party."""
    below = nx.descendants(topology.graph, consumer) | {consumer}
    return [t for t in topology.spec.tasks if t.output in below and t.loss not in ("mse", "causal_lm")
            and topology.party_of(t.labels) != topology.party_of(producer)]


def edge_gradients(topology, modules: dict[str, torch.nn.Module], rows: np.ndarray,
                   seed: int = AUDIT_SEED) -> tuple[dict[tuple[str, str], torch.Tensor], dict[str, torch.Tensor]]:
    """The gradient rows every cut edge carries back for `rows` (one batch, the runtime's order: each
    segment's input gradients from its own loss plus what came back to its output), after the edge's
    gradient defence and backward codec; and the true labels. Label DP is applied as in training."""
    features = feature_tensors(topology, rows)
    labels = label_tensors(topology, rows)
    generator = torch.Generator().manual_seed(seed)  # one stream, drawn in the runtime's order
    trained_labels = _trained_labels(topology, labels, generator)
    cut = set(topology.cut_edges())
    with torch.enable_grad():
        forward = _forward(topology, modules, features, trained_labels, cut, generator)
        crossed = _backward(topology, forward, trained_labels, cut, generator, scale=float(len(rows)))
    return crossed, labels


def _trained_labels(topology, labels: dict[str, torch.Tensor], generator) -> dict[str, torch.Tensor]:
    """The labels training sees: randomized response on classification labels under label DP."""
    trained_labels = dict(labels)
    label_dp = topology.spec.training.label_dp
    if label_dp is not None:
        for task in topology.spec.tasks:
            if task.loss != "mse":
                classes = topology.num_classes.get(task.labels) or int(labels[task.labels].max()) + 1
                trained_labels[task.labels] = randomized_response(labels[task.labels].long(), classes,
                                                                  label_dp.epsilon, generator)
    return trained_labels


@dataclass
class _Forward:
    outputs: dict[str, torch.Tensor]  # segment -> its output (after the edge's DP and codec)
    leaves: dict[tuple[str, str], torch.Tensor]  # (segment, input segment) -> the detached input it read
    losses: dict[str, torch.Tensor]  # segment -> the weighted sum of its tasks' losses


def _forward(topology, modules, features, trained_labels, cut, generator) -> _Forward:
    """Every segment in order, each cut input a fresh leaf (as a receiving node sees it)."""
    outputs: dict[str, torch.Tensor] = {}
    leaves: dict[tuple[str, str], torch.Tensor] = {}
    losses: dict[str, torch.Tensor] = {}
    for name in topology.segment_order:
        spec = topology.segments[name]
        inputs = []
        for source in spec.inputs:
            if source in features:
                inputs.append(features[source])
            else:
                leaves[(name, source)] = outputs[source].detach().requires_grad_(True)
                inputs.append(leaves[(name, source)])
        output = modules[name](merge_inputs(inputs, spec.merge))
        entry = next((p for p in topology.spec.privacy if p.segment == name), None)
        if entry is not None and any(p == name for p, _ in cut):
            if entry.dp is not None:  # differentiable: the gradient flows through the clipping
                output = clip_and_noise(output, effective_dp(topology, name), generator)
            without_dp = entry.model_copy(update={"dp": None})
            output = _straight_through(output, _codec_round_trip(without_dp.forward, output.detach(), name))
        outputs[name] = output
        for task in topology.tasks_of(name):
            term = task_loss(task.loss, output, trained_labels[task.labels]) * task.weight
            losses[name] = term if name not in losses else losses[name] + term
    return _Forward(outputs, leaves, losses)


def _backward(topology, forward: _Forward, trained_labels, cut, generator, scale: float
              ) -> dict[tuple[str, str], torch.Tensor]:
    """Segments in reverse: each one's input gradients from its loss plus what came back to its output;
    a gradient crossing a cut edge is defended and codec'd first. `scale`: rows of the mean loss."""
    outputs, leaves, losses = forward.outputs, forward.leaves, forward.losses
    incoming: dict[str, list[torch.Tensor]] = {}
    crossed: dict[tuple[str, str], torch.Tensor] = {}
    for name in reversed(topology.segment_order):
        targets, grads = [], []
        if incoming.get(name):
            targets.append(outputs[name])
            grads.append(sum(incoming[name][1:], incoming[name][0]))
        if name in losses:
            targets.append(losses[name])
            grads.append(torch.ones_like(losses[name]))
        sources = [s for s in topology.segments[name].inputs if (name, s) in leaves]
        if not sources:
            continue
        if not targets:
            found = [torch.zeros_like(leaves[(name, s)]) for s in sources]
        else:
            found = list(torch.autograd.grad(targets, [leaves[(name, s)] for s in sources], grads, allow_unused=True))
        for source, grad in zip(sources, found):
            grad = torch.zeros_like(leaves[(name, source)]) if grad is None else grad.detach()
            if (source, name) in cut:
                grad = _crossing_gradient(topology, source, name, grad, trained_labels, generator, scale)
                crossed[(source, name)] = grad
            incoming.setdefault(source, []).append(grad)
    return crossed


def _crossing_gradient(topology, source: str, name: str, grad: torch.Tensor, trained_labels, generator,
                       scale: float) -> torch.Tensor:
    """What the edge `source -> name` carries back: the gradient after its defence and backward codec."""
    entry = next((p for p in topology.spec.privacy if p.segment == source), None)
    if entry is not None and entry.gradient is not None:
        tasks = label_tasks(topology, source, name)
        task_labels = trained_labels[tasks[0].labels] if tasks else None
        noise = None
        if entry.gradient.defence == "dp":
            noise = gradient_noise(topology, f"{source}->{name}")
        grad = defend(grad, entry.gradient, generator, labels=task_labels, scale=scale, noise_multiplier=noise)
    return _backward_crossing(topology, source, grad)


def audit_labels(topology, modules: dict[str, torch.nn.Module], *, rows: Optional[np.ndarray] = None,
                 max_samples: int = 1024, seed: int = AUDIT_SEED) -> dict[str, dict]:
    """Per cut edge whose gradients go back to a party without the labels: label-inference attacks."""
    if rows is None:
        pools = sample_pools(topology)
        rows = np.concatenate([pools.train[0], pools.test])
    rows = np.asarray(rows)[:max_samples]
    grads, labels = edge_gradients(topology, modules, rows, seed)
    reports: dict[str, dict] = {}
    for (producer, consumer), grad in grads.items():
        tasks = label_tasks(topology, producer, consumer)
        if not tasks:
            continue
        edge = {"producer_party": topology.party_of(producer), "consumer_party": topology.party_of(consumer),
                "defence": None, "tasks": {}}
        entry = next((p for p in topology.spec.privacy if p.segment == producer), None)
        if entry is not None and entry.gradient is not None:
            edge["defence"] = entry.gradient.model_dump(exclude_none=True)
        for task in tasks:
            classes = topology.num_classes.get(task.labels) or int(labels[task.labels].max()) + 1
            report = label_leakage_report(grad, labels[task.labels], classes, seed=seed)
            report["label_party"] = topology.party_of(task.labels)
            edge["tasks"][task.name] = report
        reports[f"{producer}->{consumer}"] = edge
    return reports


def audit(topology, *, steps: Optional[int] = None, weights: Optional[Path] = None,
          probe_epochs: int = 200) -> dict:
    """Train (or load `weights`) and audit every cut edge; a JSON-ready document."""
    document = {"topology": topology.spec.name, "topology_hash": topology.hash}
    if not topology.cut_edges():
        raise ConfigError("no segment output crosses a party boundary: nothing to audit", topology.source)
    if weights is not None:
        modules = load_modules(topology, weights)
        document["weights"] = str(weights)
    else:
        modules, summary = train_modules(topology, steps=steps)
        document["trained"] = {
            "steps": summary["steps"],
            "eval": {t: {k: v for k, v in r.get("eval", {}).items() if k in ("accuracy", "loss", "f1", "auroc")}
                     for t, r in summary["tasks"].items()},
            "bytes_per_sample": summary["bytes_per_sample"],
            "live_leakage": summary.get("leakage", {}),
            "live_label_leakage": summary.get("label_leakage", {}),
        }
    document["label_dp"] = topology.spec.training.label_dp.model_dump() if topology.spec.training.label_dp else None
    document["edges"] = audit_modules(topology, modules, probe_epochs=probe_epochs)
    document["label_edges"] = audit_labels(topology, modules)
    if topology.spec.privacy or topology.spec.training.label_dp:
        document["privacy_budget"] = budget(topology, document.get("trained", {}).get("steps"))
    return document


def finite(value) -> bool:
    return isinstance(value, float) and math.isfinite(value)
