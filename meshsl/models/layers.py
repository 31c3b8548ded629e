"""Build a segment's nn.Module from its layer list or its `module:function` factory."""
from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import nn

from meshsl.errors import ConfigError


class Reshape(nn.Module):
    """Reshape each sample to `shape` (the batch dimension is kept)."""

    def __init__(self, *shape: int) -> None:
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], *self.shape)

    def extra_repr(self) -> str:
        return f"shape={self.shape}"


class Preprocess(nn.Module):
    """A party's fitted input transform: fill missing values, then (x - shift) * scale, per column.

    The values are buffers, fitted on the party's own training rows (meshsl.compute.preprocessing),
    so they travel with the segment's weights into checkpoints and exports, never over the wire."""

    fill: torch.Tensor  # buffers (register_buffer): saved with the segment's weights
    shift: torch.Tensor
    scale: torch.Tensor

    def __init__(self, width: int, impute: bool = False) -> None:
        super().__init__()
        self.impute = bool(impute)
        self.register_buffer("fill", torch.zeros(width))
        self.register_buffer("shift", torch.zeros(width))
        self.register_buffer("scale", torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.impute:
            x = torch.where(torch.isnan(x), self.fill, x)
        return (x - self.shift) * self.scale

    def extra_repr(self) -> str:
        return f"width={self.fill.numel()}, impute={self.impute}"


def with_preprocess(module: nn.Module, preprocess: nn.Module | None) -> nn.Module:
    """The segment with its input transform first (the same layout in training, export and assemble)."""
    if preprocess is None:
        return module
    if isinstance(module, nn.Sequential):
        return nn.Sequential(preprocess, *module)
    return nn.Sequential(preprocess, module)


# Layers beyond torch.nn that a layer list may name.
EXTRA_LAYERS: dict[str, type[nn.Module]] = {"Reshape": Reshape, "Preprocess": Preprocess}


def layer_class(name: Any, where: str) -> type[nn.Module]:
    if not isinstance(name, str):
        raise ConfigError(f"layer type must be a name like Linear, got {name!r}", where)
    cls = EXTRA_LAYERS.get(name) or getattr(nn, name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)) or name.startswith("_"):
        raise ConfigError(f"unknown layer type {name!r} (any torch.nn module or {sorted(EXTRA_LAYERS)})", where)
    return cls


def build_layer(entry: list[Any], where: str) -> nn.Module:
    if not isinstance(entry, list) or not entry:
        raise ConfigError("a layer is a list like [Linear, 64, 32] or [ReLU]", where)
    cls = layer_class(entry[0], where)
    args = list(entry[1:])
    kwargs = args.pop() if args and isinstance(args[-1], dict) else {}
    try:
        return cls(*args, **kwargs)
    except Exception as exc:  # torch raises TypeError/ValueError/RuntimeError for bad arguments
        raise ConfigError(f"cannot build {entry[0]} with args {args} {kwargs}: {exc}", where) from None


def import_factory(target: str, where: str):
    module_name, _, function_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ConfigError(f"cannot import module {module_name!r}: {exc}", where) from None
    factory = getattr(module, function_name, None)
    if not callable(factory):
        raise ConfigError(f"{target!r} is not a callable in module {module_name!r}", where)
    return factory


def build_segment_module(segment, where: str) -> nn.Module:
    """`segment` is a SegmentSpec. Factories come only from the operator's topology file, never the network."""
    if segment.llm is not None:
        from meshsl.models.llm_parts import build_llm_part  # transformers: only LLM segments load it

        return build_llm_part(segment.llm, where)
    if segment.factory is not None:
        factory = import_factory(segment.factory.target, f"{where}.factory.target")
        try:
            module = factory(**segment.factory.kwargs)
        except Exception as exc:
            raise ConfigError(f"factory {segment.factory.target} failed: {exc}", f"{where}.factory") from None
        if not isinstance(module, nn.Module):
            raise ConfigError(f"factory {segment.factory.target} returned {type(module).__name__}, not an nn.Module",
                              f"{where}.factory")
        return module
    layers = [build_layer(entry, f"{where}.layers[{i}]") for i, entry in enumerate(segment.layers)]
    if not layers:
        raise ConfigError("a segment needs at least one layer", f"{where}.layers")
    return nn.Sequential(*layers)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def trainable_layer_count(module: nn.Module) -> int:
    """Leaf modules that own trainable parameters (a 'layer' in the privacy lint's sense)."""
    return sum(1 for m in module.modules() if not list(m.children()) and any(p.requires_grad for p in m.parameters(recurse=False)))


def merge_inputs(tensors: list[torch.Tensor], rule: str) -> torch.Tensor:
    """Combine several inputs of a segment (concat along features, sum or mean)."""
    if len(tensors) == 1:
        return tensors[0]
    if rule == "concat":
        return torch.cat([t.reshape(t.shape[0], -1) if t.dim() != tensors[0].dim() else t for t in tensors], dim=1)
    stacked = torch.stack(tensors)
    return stacked.sum(0) if rule == "sum" else stacked.mean(0)
