"""A node's final weights as safetensors files: written after a run, read by `meshsl node --weights DIR`."""
from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from meshsl.errors import ConfigError


def save_weights(runtime, directory: Path) -> list[Path]:
    """Each segment's final weights as safetensors (replicated client segments get the node name too)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for segment, module in runtime.worker.modules.items():
        name = f"{segment}@{runtime.node}" if runtime.topology.is_replicated(segment) else segment
        path = directory / f"{name}.safetensors"
        base = getattr(module, "base_sha256", None)  # an LLM part: its adapters, and the base they belong to
        save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, str(path),
                  metadata={"base_model_sha256": base} if base else None)
        paths.append(path)
    return paths


def weights_file(runtime_or_topology, segment: str, node: str, directory: Path) -> Path:
    topology = getattr(runtime_or_topology, "topology", runtime_or_topology)
    name = f"{segment}@{node}" if topology.is_replicated(segment) else segment
    return Path(directory) / f"{name}.safetensors"


def load_saved_weights(worker, directory: Path) -> list[Path]:
    """Start a node from the weights `save_weights` wrote (`meshsl node --weights DIR`).

    Optimizer state is not restored: saved weights are for evaluation, prediction or fine-tuning."""
    paths = []
    for segment, module in worker.modules.items():
        path = weights_file(worker.topology, segment, worker.node, directory)
        if not path.is_file():
            raise ConfigError(f"no saved weights for segment {segment!r} of node {worker.node!r}: {path} is missing",
                              "--weights")
        try:
            state = load_file(str(path))
            with safe_open(str(path), "pt") as handle:
                recorded = (handle.metadata() or {}).get("base_model_sha256")
        except (SafetensorError, OSError, ValueError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}", "--weights") from None
        if recorded and recorded != getattr(module, "base_sha256", recorded):
            raise ConfigError(f"{path} holds adapters trained on base model {recorded[:12]}, but segment {segment!r} "
                              f"here has base model {module.base_sha256[:12]}", "--weights")
        expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in state.items()}
        if expected != got:
            raise ConfigError(f"{path} does not fit segment {segment!r}: it holds {got}, the topology needs {expected}",
                              "--weights")
        module.load_state_dict(state)
        paths.append(path)
    return paths
