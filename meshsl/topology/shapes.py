"""Shape inference: run every segment once on two real samples to catch mismatches before training."""
from __future__ import annotations

import math

import torch
from torch.utils.flop_counter import FlopCounterMode

from meshsl.compute.layers import build_segment_module, count_parameters, merge_inputs, trainable_layer_count
from meshsl.config.loader import ConfigErrors
from meshsl.data import load_dataset, select_columns
from meshsl.errors import ConfigError, DataError, TopologyError
from meshsl.topology.model import SegmentInfo

PROBE_BATCH = 2


def _index(topology, kind: str, name: str) -> int:
    items = topology.spec.data if kind == "data" else topology.spec.segments
    return next(i for i, item in enumerate(items) if item.name == name)


def infer_shapes(topology) -> None:
    src = topology.source
    problems: list[ConfigError] = []
    values: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    for name, data in topology.data.items():
        where = f"{src}: data[{_index(topology, 'data', name)}]({name})"
        try:
            table = load_dataset(data.dataset, topology.base_dir)
        except DataError as exc:
            problems.append(DataError(exc.message, f"{where}.dataset"))
            continue
        rows[name] = len(table.features)
        if data.kind == "labels":
            if table.labels is None:
                problems.append(DataError("dataset has no labels", f"{where}.dataset"))
                continue
            topology.num_classes[name] = table.num_classes
            values[name] = torch.as_tensor(table.labels[:PROBE_BATCH])
            topology.shapes[name] = tuple(table.labels.shape[1:])
            continue
        try:
            features = select_columns(table, data.columns)
        except DataError as exc:
            problems.append(DataError(exc.message, f"{where}.columns"))
            continue
        values[name] = torch.as_tensor(features[:PROBE_BATCH], dtype=torch.float32)
        topology.shapes[name] = tuple(features.shape[1:])
    if len(set(rows.values())) > 1:
        problems.append(DataError(f"data sources have different row counts {rows}; samples are aligned by row "
                                  f"index (shared sample ids), so every source must describe the same samples",
                                  f"{src}: data"))
    if problems:
        raise ConfigErrors(problems)

    protection: dict[str, int] = {name: 0 for name in topology.data}  # trainable layers since raw data
    for name in topology.segment_order:
        seg = topology.segments[name]
        where = f"{src}: segments[{_index(topology, 'segment', name)}]({name})"
        if any(i not in values for i in seg.inputs):
            continue  # an upstream segment already failed
        module = build_segment_module(seg, where)
        inputs = [values[i] for i in seg.inputs]
        try:
            merged = merge_inputs(inputs, seg.merge)
        except RuntimeError as exc:
            shapes = [tuple(t.shape[1:]) for t in inputs]
            problems.append(TopologyError(f"cannot {seg.merge} inputs of shapes {shapes}: {exc}", f"{where}.merge"))
            continue
        try:
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                out = module(merged)
        except Exception as exc:
            problems.append(TopologyError(
                f"input of shape {tuple(merged.shape[1:])} does not fit its layers: {exc}", f"{where}.layers"))
            continue
        if not isinstance(out, torch.Tensor) or out.dim() < 1 or out.shape[0] != PROBE_BATCH:
            problems.append(TopologyError("must return one tensor with the batch as first dimension", where))
            continue
        values[name] = out
        topology.shapes[name] = tuple(out.shape[1:])
        layers = trainable_layer_count(module)
        protection[name] = min(protection[i] for i in seg.inputs) + layers
        topology.segment_info[name] = SegmentInfo(
            output_shape=tuple(out.shape[1:]), parameters=count_parameters(module), trainable_layers=layers,
            forward_flops=int(math.ceil(counter.get_total_flops() / PROBE_BATCH)))
    if problems:
        raise ConfigErrors(problems)

    for producer, consumer in topology.cut_edges():
        depth = protection[producer]
        where = f"{src}: segments[{_index(topology, 'segment', producer)}]({producer})"
        if depth == 0:
            problems.append(TopologyError(
                f"has no trainable layer between raw data and the party boundary to {consumer!r}: "
                f"raw data would leak", where))
        elif depth == 1:
            topology.warnings.append(f"{where}: shallow cut: only one trainable layer between raw data and the "
                                     f"party boundary to {consumer!r}; activations may reveal inputs (consider "
                                     f"a deeper cut or NoPeek/DP)")
    for i, task in enumerate(topology.spec.tasks):
        where = f"{src}: tasks[{i}]({task.name})"
        if task.output not in topology.shapes:
            continue
        out_shape = topology.shapes[task.output]
        classes = topology.num_classes.get(task.labels)
        if task.loss == "cross_entropy" and (len(out_shape) != 1 or (classes and out_shape[0] != classes)):
            problems.append(TopologyError(
                f"cross_entropy needs output shape ({classes},) for {classes} classes, got {out_shape}", where))
        if task.loss == "bce_with_logits" and out_shape not in ((), (1,)):
            problems.append(TopologyError(f"bce_with_logits needs one logit per sample, got {out_shape}", where))
    if problems:
        raise ConfigErrors(problems)
