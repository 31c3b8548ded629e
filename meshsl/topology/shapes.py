"""Shape inference: run every segment once on two real samples to catch mismatches before training."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from meshsl.align.ids import check_ids, uses_ids
from meshsl.models.layers import build_segment_module, count_parameters, merge_inputs, trainable_layer_count
from meshsl.config.loader import ConfigErrors
from meshsl.data import dataset_rows, load_source
from meshsl.errors import ConfigError, DataError, TopologyError
from meshsl.topology.checks import privacy_problems
from meshsl.topology.llm_checks import llm_problems
from meshsl.topology.target_leakage import target_leakage_problems

PROBE_BATCH = 2


@dataclass
class SegmentInfo:
    """What shape inference learned about a segment (per sample, batch dimension left out)."""

    output_shape: tuple[int, ...]
    parameters: int
    trainable_layers: int
    forward_flops: int  # per sample


def _index(topology, kind: str, name: str) -> int:
    items = topology.spec.data if kind == "data" else topology.spec.segments
    return next(i for i, item in enumerate(items) if item.name == name)


# Layers with parameters that act element-wise (an invertible affine map per feature): they hide nothing,
# so they do not count as protection between raw data and a party boundary.
_ELEMENTWISE = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.PReLU)


# Layers that keep a chain of linear maps linear: Linear, Dropout, Linear is still one linear map.
_LINEAR_MAPS = (nn.Linear, nn.modules.conv._ConvNd)
_TRANSPARENT = (nn.Dropout, nn.Identity, nn.Flatten, nn.Unflatten, *_ELEMENTWISE[:-1])  # PReLU bends


def protective_layer_count(module: nn.Module) -> int:
    """Trainable leaf layers that mix features (Linear, Conv, RNN, Embedding, ...), not element-wise ones.
    In a layer list, consecutive linear maps with nothing non-linear between them (only Dropout, Identity,
    Flatten or normalisation) compose into one linear map and count once."""
    count, linear_run = 0, False
    sequential = isinstance(module, nn.Sequential)
    for m in module.modules():
        if list(m.children()):
            continue
        trainable = any(p.requires_grad for p in m.parameters(recurse=False))
        if trainable and not isinstance(m, _ELEMENTWISE):
            if not (sequential and linear_run and isinstance(m, _LINEAR_MAPS)):
                count += 1
            linear_run = isinstance(m, _LINEAR_MAPS)
        elif not isinstance(m, _TRANSPARENT):
            linear_run = False  # an activation (or anything else) bends the map
    return count


def _inner_key(where: str) -> str:
    """'dataset \'csv\'.options.path' -> '.options.path' (the data registry names its own keys)."""
    if where.startswith("dataset '"):
        end = where.find("'", len("dataset '"))
        if end != -1 and where[end + 1:].startswith("."):
            return where[end + 1:]
    return ""


def _describe(layer: nn.Module) -> str:
    text = repr(layer).splitlines()[0]
    return text if len(text) <= 80 else text[:77] + "..."


def _shape_problem(seg, module: nn.Module, merged: torch.Tensor, exc: Exception, where: str) -> TopologyError:
    """Name the first layer of a layer list that does not accept its input, with the shape it got."""
    if seg.layers is not None and isinstance(module, nn.Sequential):
        x = merged
        for i, layer in enumerate(module):
            try:
                with torch.no_grad():
                    x = layer(x)
            except Exception as inner:
                return TopologyError(f"{_describe(layer)} cannot take input of shape {tuple(x.shape[1:])} "
                                     f"(per sample; segment input {tuple(merged.shape[1:])}): {inner}",
                                     f"{where}.layers[{i}]")
    return TopologyError(f"input of shape {tuple(merged.shape[1:])} does not fit its layers: {exc}",
                         f"{where}.{'layers' if seg.layers is not None else 'factory'}")


def infer_shapes(topology) -> None:
    """Load every data source, run every segment on two samples, then check the cuts and the tasks; fills
    `topology.shapes`, `segment_info`, `num_classes` and `warnings`. Raises ConfigErrors naming each problem."""
    if llm := llm_problems(topology):  # before the data: a text source loads the model's tokenizer
        raise ConfigErrors(llm)
    values = _probe_data(topology)
    protection = _probe_segments(topology, values)
    problems = _cut_problems(topology, protection) + _task_problems(topology)
    if not problems:
        problems.extend(privacy_problems(topology))
    if problems:
        raise ConfigErrors(problems)


def _probe_data(topology) -> dict[str, torch.Tensor]:
    """The first samples of every data source (and its shape, class count); ConfigErrors if one fails."""
    src = topology.source
    problems: list[ConfigError] = []
    values: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    names: dict[str, tuple[str, ...]] = {}
    matched_by_id = uses_ids(topology)
    if matched_by_id and (id_problems := check_ids(topology)):
        raise ConfigErrors(id_problems)  # checked first: a wrong id column would also fail every load below
    for name, data in topology.data.items():
        where = f"{src}: data[{_index(topology, 'data', name)}]({name})"
        try:  # a feature source reads a few rows; a label source its whole (single) column, for the classes
            table = load_source(data, topology.base_dir, head=PROBE_BATCH if data.kind == "features" else None)
            rows[name] = dataset_rows(data.source_dataset, topology.base_dir)
        except DataError as exc:
            key = ".columns" if exc.where == "columns" else f".dataset{_inner_key(exc.where)}"
            problems.append(DataError(exc.message, f"{where}{key}"))
            continue
        except Exception as exc:  # a registered or custom loader failed in its own way
            problems.append(DataError(f"loading dataset {data.dataset.name!r} failed: {type(exc).__name__}: {exc}",
                                      f"{where}.dataset"))
            continue
        if data.kind == "labels":
            if table.labels is None:
                problems.append(DataError("dataset has no labels", f"{where}.dataset"))
                continue
            topology.num_classes[name] = table.num_classes
            values[name] = torch.as_tensor(table.labels[:PROBE_BATCH])
            topology.shapes[name] = tuple(table.labels.shape[1:])
            continue
        features = table.features
        names[name] = tuple(table.feature_names)
        if features.ndim < 2 or features.shape[0] == 0:
            problems.append(DataError(f"features of shape {features.shape} hold no samples", f"{where}.dataset"))
            continue
        values[name] = torch.tensor(np.array(features[:PROBE_BATCH]), dtype=torch.float32)  # a copy: may be a map
        topology.shapes[name] = tuple(features.shape[1:])
    if len(set(rows.values())) > 1 and not matched_by_id:  # with ids, PSI matches the rows
        problems.append(DataError(f"data sources have different row counts {rows}; samples are aligned by row "
                                  f"index (shared sample ids), so every source must describe the same samples",
                                  f"{src}: data"))
    problems.extend(target_leakage_problems(
        topology, names, lambda n: f"{src}: data[{_index(topology, 'data', n)}]({n})"))
    if problems:
        raise ConfigErrors(problems)
    return values


def _probe_segments(topology, values: dict[str, torch.Tensor]) -> dict[str, int]:
    """Run each segment on its inputs' probes (adds its output to `values`); returns, per data source and
    segment, how many feature-mixing layers lie between it and the raw data. ConfigErrors if one fails."""
    src = topology.source
    problems: list[ConfigError] = []
    protection: dict[str, int] = {name: 0 for name in topology.data}  # feature-mixing layers since raw data
    for name in topology.segment_order:
        seg = topology.segments[name]
        where = f"{src}: segments[{_index(topology, 'segment', name)}]({name})"
        if any(i not in values for i in seg.inputs):
            continue  # an upstream segment already failed
        try:
            module = build_segment_module(seg, where)
        except ConfigError as exc:
            problems.append(exc)
            continue
        module.eval()  # probe without batch statistics or dropout (a dataset may hold a single row)
        inputs = [values[i] for i in seg.inputs]
        try:
            merged = merge_inputs(inputs, seg.merge)
        except Exception as exc:
            shapes = [tuple(t.shape[1:]) for t in inputs]
            problems.append(TopologyError(f"cannot {seg.merge} inputs of shapes {shapes}: {exc}", f"{where}.merge"))
            continue
        try:
            with torch.no_grad():
                out = module(merged)
        except Exception as exc:
            problems.append(_shape_problem(seg, module, merged, exc, where))
            continue
        if not isinstance(out, torch.Tensor) or out.dim() < 1 or out.shape[0] != merged.shape[0]:
            problems.append(TopologyError("must return one tensor with the batch as first dimension", where))
            continue
        values[name] = out
        topology.shapes[name] = tuple(out.shape[1:])
        layers = trainable_layer_count(module)
        protection[name] = min(protection[i] for i in seg.inputs) + protective_layer_count(module)
        topology.segment_info[name] = SegmentInfo(
            output_shape=tuple(out.shape[1:]), parameters=count_parameters(module), trainable_layers=layers,
            forward_flops=-1)
    if problems:
        raise ConfigErrors(problems)
    return protection


def _cut_problems(topology, protection: dict[str, int]) -> list[ConfigError]:
    """A cut with nothing trainable before it leaks raw data (an error); one layer is a warning."""
    src = topology.source
    problems: list[ConfigError] = []
    for producer, consumer in topology.cut_edges():
        depth = protection[producer]
        where = f"{src}: segments[{_index(topology, 'segment', producer)}]({producer})"
        if depth == 0:
            problems.append(TopologyError(
                f"has no trainable layer between raw data and the party boundary to {consumer!r}: "
                f"raw data would leak (add a feature-mixing layer such as Linear or Conv before the cut; "
                f"normalisation layers and activations do not hide the input)", where))
        elif depth == 1:
            topology.warnings.append(f"{where}: shallow cut: only one trainable layer between raw data and the "
                                     f"party boundary to {consumer!r}; activations may reveal inputs (consider "
                                     f"a deeper cut or NoPeek/DP)")
    return problems


def _task_problems(topology) -> list[ConfigError]:
    """Each task's loss against its output shape and its labels."""
    src = topology.source
    problems: list[ConfigError] = []
    for i, task in enumerate(topology.spec.tasks):
        where = f"{src}: tasks[{i}]({task.name})"
        if task.output not in topology.shapes:
            continue
        out_shape = topology.shapes[task.output]
        label_shape = topology.shapes.get(task.labels, ())
        classes = topology.num_classes.get(task.labels)
        if task.loss == "causal_lm":
            if len(out_shape) != 2 or len(label_shape) != 1 or out_shape[0] != label_shape[0] or \
                    (classes and out_shape[1] < classes):
                problems.append(TopologyError(
                    f"causal_lm needs logits [tokens, vocabulary] and token ids [tokens] of the same length, got "
                    f"{out_shape} from segment {task.output!r} and {label_shape} from {task.labels!r}", where))
            continue
        if task.loss in ("cross_entropy", "bce_with_logits") and classes is None:
            problems.append(TopologyError(
                f"{task.loss} needs class labels (whole numbers >= 0), but {task.labels!r} holds real-valued "
                f"targets of shape {label_shape}; use loss: mse for regression", f"{where}.loss"))
            continue
        if task.loss == "cross_entropy" and (len(out_shape) != 1 or (classes and out_shape[0] != classes)):
            problems.append(TopologyError(
                f"cross_entropy needs output shape ({classes},) for {classes} classes, got {out_shape} from "
                f"segment {task.output!r}", where))
        if task.loss == "bce_with_logits":
            if out_shape not in ((), (1,)):
                problems.append(TopologyError(f"bce_with_logits needs one logit per sample, got {out_shape} from "
                                              f"segment {task.output!r}", where))
            elif classes is not None and classes > 2:
                problems.append(TopologyError(f"bce_with_logits needs binary labels, but {task.labels!r} has "
                                              f"{classes} classes; use cross_entropy", f"{where}.loss"))
        if task.loss == "mse" and math.prod(out_shape) != math.prod(label_shape):
            problems.append(TopologyError(
                f"mse compares output {out_shape} of segment {task.output!r} with targets {label_shape} of "
                f"{task.labels!r}: they need the same number of values per sample", where))
    return problems


def count_flops(topology) -> None:
    """Forward FLOPs per sample of every segment, into `topology.segment_info` (each counted once).

    Done on demand (`meshsl plan`), not at every load: FlopCounterMode pulls in torch's compiler
    stack, which costs seconds of start-up in every node process. Counted on a fresh module of each
    segment fed zeros of the inferred input shapes (the count depends on shapes, not values), so
    shape inference keeps nothing of its probes; the global RNG is left as it was."""
    from torch.utils.flop_counter import FlopCounterMode  # torch's compiler stack: only `meshsl plan` counts

    for name in topology.segment_order:
        info = topology.segment_info.get(name)
        if info is None or info.forward_flops >= 0:
            continue
        seg = topology.segments[name]
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            where = f"{topology.source}: segments[{_index(topology, 'segment', name)}]({name})"
            module = build_segment_module(seg, where)
            module.eval()
            merged = merge_inputs([torch.zeros(PROBE_BATCH, *topology.shapes[i]) for i in seg.inputs], seg.merge)
            with FlopCounterMode(display=False) as counter:
                module(merged)
        info.forward_flops = int(math.ceil(counter.get_total_flops() / merged.shape[0]))
