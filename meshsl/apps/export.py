"""Per-party export of trained segments, and assembling a single-process model from every owner's export.

An export is, per segment the node hosts, `<segment>.safetensors` (the state dict) and `<segment>.json`
(the segment spec: layers or factory, input names and per-sample shapes, merge rule, output shape, the
tasks it feeds). Replicated (client) segments are named `<segment>@<node>`. Nothing here is needed to
USE an export: `build_segment(spec)` below is plain torch.nn (see docs/using-the-model.md for a
ten-line loader). `assemble` combines exports into one model only when each segment's export came
from the node that owns it in the topology.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import math
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from meshsl.models.layers import Preprocess, with_preprocess
from meshsl.models.llm_parts import base_hash
from meshsl.models.layers import merge_inputs as merge  # the same rule as in training
from meshsl.compute.preprocessing import preprocess_layer, preprocessed_inputs
from meshsl.compute.weights import weights_file
from meshsl.compute.worker import build_module
from meshsl.errors import ConfigError
from meshsl.apps.llm_assemble import assemble_llm, is_llm

SEGMENT_FORMAT = "meshsl-segment/1"
MODEL_FORMAT = "meshsl-model/1"
MERGE_RULES = {
    "concat": "inputs flattened to [batch, -1] where their rank differs from the first input's, then "
              "concatenated along dim 1 in the order of 'inputs'",
    "sum": "element-wise sum of the inputs (same shape)",
    "mean": "element-wise mean of the inputs (same shape)",
}


# ---- plain torch: building a segment from its spec (no meshsl runtime) ---------------------------
def build_layer(entry: list) -> nn.Module:
    """[TypeName, *args, optional {kwargs}] -> torch.nn module. `Reshape` (meshsl's one extra layer:
    keep the batch dimension, reshape the rest) becomes Flatten + Unflatten, which has no parameters."""
    name, args = entry[0], list(entry[1:])
    kwargs = args.pop() if args and isinstance(args[-1], dict) else {}
    if name == "Reshape":
        return nn.Sequential(nn.Flatten(), nn.Unflatten(1, tuple(args)))
    return getattr(nn, name)(*args, **kwargs)


def build_segment(spec: dict) -> nn.Module:
    """The segment's module from its JSON spec (layers: nn.Sequential; factory: the user's function),
    with the party's fitted input transform first when it has one (`preprocess`: its width and imputing)."""
    module: nn.Module
    if spec.get("layers") is not None:
        module = nn.Sequential(*[build_layer(e) for e in spec["layers"]])
    elif spec.get("llm") is not None:  # a part of a local causal LM: its base loads from the model directory
        from meshsl.models.llm_parts import build_llm_part
        from meshsl.config.specs import LLMPartSpec

        module = build_llm_part(LLMPartSpec(**spec["llm"]), f"segment {spec.get('segment')}")
    else:
        module_name, _, function = spec["factory"]["target"].partition(":")
        module = getattr(importlib.import_module(module_name), function)(**spec["factory"].get("kwargs", {}))
    prep = spec.get("preprocess")
    return with_preprocess(module, Preprocess(prep["width"], prep["impute"]) if prep else None)




# ---- export (on the owner's machine) ------------------------------------------------------------
def export_name(topology, segment: str, node: str) -> str:
    return f"{segment}@{node}" if topology.is_replicated(segment) else segment


def segment_spec(topology, segment: str, node: str) -> dict:
    spec = topology.segments[segment]
    lanes = topology.lanes_of(segment, node)
    inputs = []
    for source in spec.inputs:
        entry = {"name": source, "kind": "data" if source in topology.data else "segment",
                 "shape": list(topology.shapes[source])}
        if source in topology.data:
            data = topology.data[source]
            entry.update(dataset=data.dataset.name, columns=data.columns,
                         width=math.prod(topology.shapes[source]))
        inputs.append(entry)
    tasks = [{"name": t.name, "loss": t.loss, "labels": t.labels, "num_classes": topology.num_classes.get(t.labels),
              "metrics": list(t.metrics)} for t in topology.tasks_of(segment)]
    return {
        "format": SEGMENT_FORMAT,
        "topology": topology.spec.name,
        "segment": segment,
        "node": node,
        "party": topology.nodes[node].party,
        "lanes": lanes if topology.lanes > 1 else None,
        "inputs": inputs,
        "merge": spec.merge,
        "merge_rule": MERGE_RULES[spec.merge],
        "layers": spec.layers,
        "factory": spec.factory.model_dump() if spec.factory is not None else None,
        **({"llm": spec.llm.model_dump(), "base_model_sha256": base_hash(spec.llm.model)} if spec.llm else {}),
        "output_shape": list(topology.shapes[segment]),
        "tasks": tasks,
        "preprocess": _preprocess_entry(topology, segment),
    }


def _preprocess_entry(topology, segment: str) -> Optional[dict]:
    layer = preprocess_layer(topology, segment)
    if layer is None:
        return None
    return {"width": layer.fill.numel(), "impute": layer.impute,
            "sources": {s: topology.data[s].preprocess.model_dump() for s in preprocessed_inputs(topology, segment)}}


def export_node(topology, weights_dir: Path, node: str, out_dir: Path) -> list[Path]:
    """Export `node`'s own segments (and nothing else) from the weights it saved."""
    if node not in topology.nodes:
        raise ConfigError(f"unknown node {node!r} (nodes: {', '.join(topology.nodes)})", "--node")
    segments = [s for s in topology.segment_order if node in topology.placement[s]]
    if not segments:
        raise ConfigError(f"node {node!r} hosts no segment; there is nothing to export", "--node")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for segment in segments:
        path = weights_file(topology, segment, node, Path(weights_dir))
        if not path.is_file():
            raise ConfigError(f"no saved weights for segment {segment!r} of node {node!r}: {path} is missing "
                              f"(train with `meshsl run --weights-out DIR`)", "--weights")
        state = load_file(str(path))
        spec = segment_spec(topology, segment, node)
        for builder, what in ((lambda: build_module(topology, segment), "the topology's"),
                              (lambda: build_segment(spec), "a plain torch.nn")):
            module = builder()
            try:
                module.load_state_dict(state)
            except RuntimeError as exc:
                raise ConfigError(f"{path} does not fit {what} segment {segment!r}: {exc}", "--weights") from None
        name = export_name(topology, segment, node)
        tensors = {k: v.contiguous() for k, v in state.items()}
        save_file(tensors, str(out_dir / f"{name}.safetensors"),
                  metadata={"format": SEGMENT_FORMAT, "segment": segment, "node": node,
                            **({"base_model_sha256": spec["base_model_sha256"]} if "llm" in spec else {})})
        spec["state_dict"] = {"file": f"{name}.safetensors",
                              "keys": {k: list(v.shape) for k, v in tensors.items()},
                              "sha256": hashlib.sha256((out_dir / f"{name}.safetensors").read_bytes()).hexdigest()}
        (out_dir / f"{name}.json").write_text(json.dumps(spec, indent=2) + "\n")
        written += [out_dir / f"{name}.safetensors", out_dir / f"{name}.json"]
    return written


def load_segment(json_path: Path, model_dir: Optional[str] = None) -> tuple[nn.Module, dict]:
    """One exported segment as a torch module (checks the weights file's hash); an LLM part's base model
    loads from `model_dir` (this party's copy) where given, else from the directory the export names."""
    json_path = Path(json_path)
    spec = json.loads(json_path.read_text())
    if model_dir is not None and spec.get("llm"):
        spec["llm"] = {**spec["llm"], "model": model_dir}
    weights = json_path.parent / spec["state_dict"]["file"]
    if hashlib.sha256(weights.read_bytes()).hexdigest() != spec["state_dict"]["sha256"]:
        raise ConfigError(f"{weights} does not match the hash in {json_path} (modified or partial copy)", str(json_path))
    module = build_segment(spec)
    module.load_state_dict(load_file(str(weights)))
    return module.eval(), spec


# ---- assemble (where every owner handed over its export) ----------------------------------------
def _scan(export_dirs: list[Path]) -> list[tuple[Path, dict]]:
    found = []
    for directory in export_dirs:
        directory = Path(directory)
        if not directory.is_dir():
            raise ConfigError(f"{directory} is not a directory of exports", "EXPORT_DIR")
        for path in sorted(directory.glob("*.json")):
            try:
                spec = json.loads(path.read_text())
            except ValueError:
                continue
            if isinstance(spec, dict) and spec.get("format") == SEGMENT_FORMAT:
                found.append((path, spec))
    return found


def _lane_of(topology, client: Optional[str]) -> int:
    if client is None:
        return 0
    for segment in topology.segment_order:
        lanes = topology.lanes_of(segment, client)
        if lanes and topology.is_replicated(segment):
            return lanes[0]
    raise ConfigError(f"{client!r} is not a client node of this topology", "--client")


def assemble(topology, export_dirs: list[Path], out: Path, client: Optional[str] = None) -> Path:
    """One model from every segment's owner export; `out` ending in .pt: one torch file (weights_only
    loadable), otherwise a directory with model.safetensors + model.json."""
    lane = _lane_of(topology, client)
    exports = _scan(export_dirs)
    chosen: dict[str, tuple[Path, dict]] = {}
    missing, ignored = [], []
    for segment in topology.segment_order:
        owner = topology.node_of(segment, lane)
        match = [(p, s) for p, s in exports if s.get("segment") == segment and s.get("node") == owner]
        if not match:
            missing.append(f"{segment} (owner {owner}, party {topology.nodes[owner].party})")
            ignored += [f"{p} (from {s.get('node')})" for p, s in exports if s.get("segment") == segment]
            continue
        chosen[segment] = match[0]
    if missing:
        extra = f"; exports not from the owner were ignored: {', '.join(ignored)}" if ignored else ""
        raise ConfigError(f"cannot assemble {topology.spec.name}: no export from the owner of "
                          f"{', '.join(missing)}{extra}", "assemble")
    if is_llm(topology):  # a Hugging Face model directory: the base with every part's adapters merged in
        return assemble_llm(topology, chosen, out, lambda path, model_dir: load_segment(path, model_dir)[0])
    state: dict[str, torch.Tensor] = {}
    segments = []
    for segment in topology.segment_order:
        path, spec = chosen[segment]
        expected = segment_spec(topology, segment, spec["node"])
        for key in ("inputs", "merge", "layers", "factory", "output_shape"):
            if spec.get(key) != expected[key]:
                raise ConfigError(f"export {path} does not match the topology's segment {segment!r} ({key} differs)",
                                  "assemble")
        module, _ = load_segment(path)
        for k, v in module.state_dict().items():
            state[f"{segment}.{k}"] = v.detach().contiguous()
        segments.append({k: v for k, v in spec.items() if k != "state_dict"})
    model = {
        "format": MODEL_FORMAT,
        "topology": topology.spec.name,
        "lane": lane,
        "segments": segments,
        "data": [{"name": d.name, "node": topology.node_of(d.name, lane), "shape": list(topology.shapes[d.name]),
                  "columns": d.columns} for d in topology.spec.data if d.kind == "features"],
        "tasks": [{"name": t.name, "output": t.output, "loss": t.loss,
                   "num_classes": topology.num_classes.get(t.labels)} for t in topology.spec.tasks],
    }
    out = Path(out)
    if out.suffix == ".pt":
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": json.dumps(model), "state_dict": state}, out)
        return out
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": MODEL_FORMAT})
    (out / "model.json").write_text(json.dumps(model, indent=2) + "\n")
    return out


class AssembledModel(nn.Module):
    """The whole topology in one process: forward({data source: tensor}) -> {task: output}."""

    def __init__(self, spec: dict) -> None:
        super().__init__()
        self.spec = spec
        self.segments = nn.ModuleDict({s["segment"]: build_segment(s) for s in spec["segments"]})

    def forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        values = dict(inputs)
        for s in self.spec["segments"]:
            values[s["segment"]] = self.segments[s["segment"]](merge([values[i["name"]] for i in s["inputs"]],
                                                                     s["merge"]))
        return {t["name"]: values[t["output"]] for t in self.spec["tasks"]}

    def predict_proba(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            outputs = self(inputs)
        result = {}
        for t in self.spec["tasks"]:
            out = outputs[t["name"]]
            result[t["name"]] = (out.softmax(dim=1) if t["loss"] == "cross_entropy"
                                 else torch.sigmoid(out) if t["loss"] == "bce_with_logits" else out)
        return result


def load_assembled(path: Union[str, Path]) -> AssembledModel:
    path = Path(path)
    if path.suffix == ".pt":
        blob = torch.load(path, weights_only=True)  # never unpickle arbitrary objects
        spec, state = json.loads(blob["model"]), blob["state_dict"]
    else:
        spec, state = json.loads((path / "model.json").read_text()), load_file(str(path / "model.safetensors"))
    model = AssembledModel(spec)
    model.segments.load_state_dict(state)
    return model.eval()
