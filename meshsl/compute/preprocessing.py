"""Per-party preprocessing: which segments get a `Preprocess` first layer, and fitting it.

A data source's `preprocess:` becomes the first layer of the segment reading it (meshsl.models.layers.
Preprocess). Its values are fitted here, on the node's own training rows only, a block of rows at a
time in float64 accumulators (a bank's float32 table is never copied whole). Columns of other inputs
of the same segment pass through unchanged.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from torch import nn

from meshsl.models.layers import Preprocess
from meshsl.errors import ConfigError

FIT_BLOCK_ROWS = 16_384


def preprocessed_inputs(topology, segment: str) -> list[str]:
    return [i for i in topology.segments[segment].inputs
            if i in topology.data and topology.data[i].preprocess is not None]


def preprocess_layer(topology, segment: str) -> Optional[Preprocess]:
    """An identity `Preprocess` over the segment's merged input, or None when no input declares one."""
    spec = topology.segments[segment]
    chosen = preprocessed_inputs(topology, segment)
    if not chosen:
        return None
    if len(spec.inputs) > 1 and spec.merge != "concat":
        raise ConfigError(f"'preprocess' on {chosen} needs the segment's inputs concatenated, not {spec.merge}ed",
                          f"segments({segment}).merge")
    for name in chosen:
        if len(topology.shapes.get(name, ())) != 1:
            raise ConfigError(f"'preprocess' needs [rows, columns] features; {name!r} has per-sample shape "
                              f"{topology.shapes.get(name)}", f"data({name}).preprocess")
    width = sum(math.prod(topology.shapes[i]) for i in spec.inputs)
    impute = any(topology.data[i].preprocess.impute != "none" for i in chosen)
    return Preprocess(width, impute)


def fit_preprocessing(topology, node: str, modules: dict[str, nn.Module], data) -> None:
    """Fit every segment's Preprocess layer on this node's training rows (`data`: its NodeData)."""
    for segment, module in modules.items():
        first = module[0] if isinstance(module, nn.Sequential) and len(module) else None
        if not isinstance(first, Preprocess):
            continue
        lanes = topology.lanes_of(segment, node) or [0]
        rows = np.unique(np.concatenate([data.pools.train[lane] for lane in lanes]))
        start = 0
        for source in topology.segments[segment].inputs:
            width = math.prod(topology.shapes[source])
            spec = topology.data.get(source)
            if spec is not None and spec.preprocess is not None:
                fill, shift, scale = fitted_values(data.tensors[source], rows, spec.preprocess)
                with torch.no_grad():
                    first.fill[start:start + width] = fill
                    first.shift[start:start + width] = shift
                    first.scale[start:start + width] = scale
            start += width


def fitted_values(features: torch.Tensor, rows: np.ndarray, spec) -> tuple[torch.Tensor, ...]:
    """(fill, shift, scale) per column from the training rows, ignoring missing values."""
    width = features.shape[1]
    count = np.zeros(width)
    total = np.zeros(width)
    squares = np.zeros(width)
    low = np.full(width, np.inf)
    high = np.full(width, -np.inf)
    for first in range(0, len(rows), FIT_BLOCK_ROWS):
        block = features[torch.as_tensor(rows[first:first + FIT_BLOCK_ROWS])].numpy().astype(np.float64)
        present = ~np.isnan(block)
        values = np.where(present, block, 0.0)
        count += present.sum(axis=0)
        total += values.sum(axis=0)
        squares += (values * values).sum(axis=0)
        low = np.minimum(low, np.where(present, block, np.inf).min(axis=0))
        high = np.maximum(high, np.where(present, block, -np.inf).max(axis=0))
    seen = np.maximum(count, 1)
    mean = total / seen
    std = np.sqrt(np.maximum(squares / seen - mean * mean, 0.0))
    fill = mean if spec.impute == "mean" else np.zeros(width)
    if spec.scale == "standard":
        shift, scale = mean, np.where(std > 1e-12, 1.0 / np.where(std > 1e-12, std, 1.0), 1.0)
    elif spec.scale == "minmax":
        span = np.where(count > 0, high - low, 0.0)
        shift = np.where(count > 0, low, 0.0)
        scale = np.where(span > 1e-12, 1.0 / np.where(span > 1e-12, span, 1.0), 1.0)
    else:
        shift, scale = np.zeros(width), np.ones(width)
    return tuple(torch.as_tensor(v, dtype=torch.float32) for v in (fill, shift, scale))
