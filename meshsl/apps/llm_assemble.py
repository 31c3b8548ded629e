"""`meshsl assemble` of an LLM topology: one Hugging Face model directory, the base model with every
part's LoRA adapters merged into its weights (W + B A alpha/r), plus the tokenizer. It loads with plain
`AutoModelForCausalLM.from_pretrained(DIR)` and predicts what the split model predicts."""
from __future__ import annotations

from typing import Any

import json
import shutil
from pathlib import Path

from meshsl.models.llm_parts import base_hash, load_causal_lm
from meshsl.models.lora import merge_lora
from meshsl.errors import ConfigError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def is_llm(topology) -> bool:
    return any(topology.segments[s].llm is not None for s in topology.segment_order)


def assemble_llm(topology, chosen: dict, out: Path, load_segment) -> Path:
    """`chosen`: {segment: (export json, its spec)} from each owner; `load_segment(json, model_dir)`: the part
    with its adapters. The adapters must belong to this party's copy of the base model (by hash)."""
    parts = [topology.segments[s].llm for s in topology.segment_order]
    if any(p is None for p in parts):
        raise ConfigError("cannot assemble a topology that mixes LLM parts with other segments", "assemble")
    model_dir = parts[0].model
    own = base_hash(model_dir)
    full: Any = load_causal_lm(model_dir)  # a transformers model (save_pretrained)
    expected = set(full.state_dict())
    for segment in topology.segment_order:
        path, spec = chosen[segment]
        if spec.get("base_model_sha256") != own:
            raise ConfigError(f"export {path} holds adapters of base model {str(spec.get('base_model_sha256'))[:12]}, "
                              f"but the base model in {model_dir} is {own[:12]}", "assemble")
        part = load_segment(path, topology.segments[segment].llm.model)
        merged = merge_lora(part.lm).state_dict()
        unknown = set(merged) - expected
        if unknown:
            raise ConfigError(f"export {path}: weights {sorted(unknown)[:3]} are not in the base model", "assemble")
        full.load_state_dict(merged, strict=False)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    full.save_pretrained(str(out))
    for name in TOKENIZER_FILES:
        if (Path(model_dir) / name).is_file():
            shutil.copyfile(Path(model_dir) / name, out / name)
    manifest = {"format": "meshsl-llm/1", "topology": topology.spec.name, "base_model_sha256": own,
                "segments": {s: str(chosen[s][0]) for s in topology.segment_order}}
    (out / "meshsl.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out
