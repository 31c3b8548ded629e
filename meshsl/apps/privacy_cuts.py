"""Cut-layer advice (`meshsl plan --cuts`): for every layer boundary inside a data-holding segment,
what would cutting there cost and leak?

Per candidate (cut after layer i of the segment's stack; the layers after it would move to the
consumer): wire bytes per sample (forward + backward, with the edge's configured codecs),
parameters and forward FLOPs per sample left on the data holder (including its upstream
segments), and a leakage estimate: dCor(raw input, activation after layer i) on a sample of real
training rows, at initialisation (`dcor_init`) and after a short unsplit training of the whole
model (`dcor`; the model function does not depend on where it is cut, so one training serves all
candidates). The estimate is for a model trained without NoPeek/DP: it ranks cut points, the
audit (`meshsl audit`) measures a trained, protected model.
"""
from __future__ import annotations

import math

import networkx as nx
import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from meshsl.apps.audit import feature_tensors, flat_raw, raw_sources
from meshsl.protocol.compression import make_codec
from meshsl.models.layers import count_parameters, merge_inputs, trainable_layer_count
from meshsl.compute.worker import build_module
from meshsl.schedule.steps import sample_pools, training_steps
from meshsl.privacy.dcor import distance_correlation
from meshsl.apps.reference import train_reference
from meshsl.topology.shapes import count_flops

SAMPLE_ROWS = 512
TRAIN_STEPS = 60


def _codec_bytes(spec, shape: tuple[int, ...]) -> int:
    """Payload bytes of one sample through a codec (int8 carries a per-sample scale, top-k indices)."""
    layout = make_codec(spec).part_layout((1, *shape), torch.float32)
    return sum(n * torch.empty(0, dtype=dtype).element_size() for dtype, n in layout)


def _layers(module: nn.Module) -> list[nn.Module]:
    return list(module.children()) if isinstance(module, nn.Sequential) else [module]


def _describe(spec, index: int, layer: nn.Module) -> str:
    if spec.layers is not None and index < len(spec.layers):
        entry = spec.layers[index]
        args = [a for a in entry[1:] if not isinstance(a, dict)]
        return f"layers[{index}] {entry[0]}({', '.join(map(str, args))})" if args else f"layers[{index}] {entry[0]}"
    return f"layers[{index}] {type(layer).__name__}"


def _trained_modules(topology, steps: int) -> tuple[dict[str, nn.Module], int]:
    modules = {name: build_module(topology, name) for name in topology.segment_order}
    if steps <= 0 or topology.lanes != 1:
        return modules, 0  # the unsplit reference covers single-client topologies
    steps = min(steps, len(training_steps(topology)) or steps)
    state, _ = train_reference(topology, steps)
    for name, module in modules.items():
        module.load_state_dict(state[name])
    return modules, steps


def _sample_values(topology, modules: dict[str, nn.Module], rows: np.ndarray) -> dict[str, torch.Tensor]:
    values = feature_tensors(topology, rows)
    with torch.no_grad():
        for name in topology.segment_order:
            spec = topology.segments[name]
            values[name] = modules[name].eval()(merge_inputs([values[i] for i in spec.inputs], spec.merge))
    return values


def _dcor(raw: torch.Tensor, activation: torch.Tensor) -> float:
    with torch.no_grad():
        return float(distance_correlation(raw.double(), activation.reshape(activation.shape[0], -1).double()))


def _prefix_outputs(topology, segment: str, modules, values) -> list[tuple[nn.Module, torch.Tensor, int]]:
    """(layer, output after it, forward FLOPs per sample of that layer) for each layer of the stack."""
    spec = topology.segments[segment]
    x = merge_inputs([values[i] for i in spec.inputs], spec.merge)
    rows = x.shape[0]
    result = []
    with torch.no_grad():
        for layer in _layers(modules[segment]):
            with FlopCounterMode(display=False) as counter:
                x = layer.eval()(x)
            result.append((layer, x, int(math.ceil(counter.get_total_flops() / rows))))
    return result


def _probe_rows(topology, samples: int, trained: bool) -> np.ndarray:
    """Training rows to measure dCor on: a seeded sample; for `meshsl plan`'s untrained probe the first
    ones, so that a party's file is read only that far."""
    pool = np.asarray(sample_pools(topology).train[0])
    if trained:
        return np.sort(np.random.default_rng(topology.spec.training.seed).permutation(pool)[:samples])
    return np.sort(pool)[:samples]


def cut_candidates(topology, *, train_steps: int = TRAIN_STEPS, samples: int = SAMPLE_ROWS) -> list[dict]:
    """One row per candidate cut point inside each data-holding segment that feeds another party."""
    holders = [name for name in topology.segment_order
               if any(i in topology.data and topology.data[i].kind == "features" for i in topology.segments[name].inputs)]
    if not holders:
        return []
    rows = _probe_rows(topology, samples, trained=train_steps > 0)
    init_modules, _ = _trained_modules(topology, 0)
    trained_modules, trained_steps = _trained_modules(topology, train_steps)
    init_values = _sample_values(topology, init_modules, rows)
    trained_values = _sample_values(topology, trained_modules, rows)
    privacy = {p.segment: p for p in topology.spec.privacy}
    consumers = {p: c for p, c in topology.cut_edges()}
    candidates = []
    for segment in holders:
        party = topology.party_of(segment)
        upstream = [s for s in nx.ancestors(topology.graph, segment)
                    if s in topology.segments and topology.party_of(s) == party]
        base_params = sum(topology.segment_info[s].parameters for s in upstream)
        count_flops(topology)
        base_flops = sum(topology.segment_info[s].forward_flops for s in upstream)
        base_layers = sum(topology.segment_info[s].trainable_layers for s in upstream)
        sources = raw_sources(topology, segment)
        raw_init, raw_trained = flat_raw(init_values, sources), flat_raw(trained_values, sources)
        edge = privacy.get(segment)
        init_outputs = _prefix_outputs(topology, segment, init_modules, init_values)
        trained_outputs = _prefix_outputs(topology, segment, trained_modules, trained_values)
        params = flops = layers = 0
        spec = topology.segments[segment]
        for index, ((layer, init_out, layer_flops), (_, trained_out, _)) in enumerate(zip(init_outputs, trained_outputs)):
            params += count_parameters(layer)
            flops += layer_flops
            layers += trainable_layer_count(layer)
            shape = tuple(trained_out.shape[1:])
            forward = _codec_bytes(edge.forward if edge else None, shape)
            backward = _codec_bytes(edge.backward if edge else None, shape)
            depth = base_layers + layers
            candidates.append({
                "segment": segment,
                "cut_after": _describe(spec, index, layer),
                "layer_index": index,
                "current": index == len(init_outputs) - 1,
                "crosses_to": consumers.get(segment),
                "shape": list(shape),
                "bytes_per_sample": forward + backward,
                "forward_bytes_per_sample": forward,
                "backward_bytes_per_sample": backward,
                "client_parameters": base_params + params,
                "client_flops_per_sample": base_flops + flops,
                "trainable_layers": depth,
                "dcor_init": _dcor(raw_init, init_out),
                "dcor": _dcor(raw_trained, trained_out),
                "trained_steps": trained_steps,
                "samples": len(rows),
                "warning": ("raw data would cross: no trainable layer before the cut" if depth == 0 else
                            "shallow cut: one trainable layer" if depth == 1 else None),
            })
    return candidates
