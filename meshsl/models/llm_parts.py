"""Segments that are parts of a Hugging Face causal LM: embeddings, decoder blocks [first, stop), norm + LM head.

One tensor crosses each cut: the hidden states [batch, tokens, width]. Sequences are packed to a fixed
length without padding (meshsl.data.text), so everything else a block needs is rebuilt at every part from
the sequence length alone: positions 0..T-1 (offset by the tokens already in the part's KV cache when
generating), the causal mask (transformers' own `create_causal_mask`) and, for Llama-style models, the
rotary cos/sin from the part's own copy of `model.model.rotary_emb`. Nothing else needs to travel.

The base model loads from a local `save_pretrained` directory (offline, `local_files_only`); its weights
are frozen and never leave the part: the part's state dict holds the LoRA adapters only, so checkpoints,
saved weights, exports and SplitFed averaging carry adapters and nothing else."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from meshsl.models.lora import freeze_base, inject_lora, is_adapter
from meshsl.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HASHES: dict[tuple[str, float], str] = {}


def offline() -> None:
    """Nothing downloads at run time: the hub client stays offline in every process that loads a model."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def base_hash(model_dir: str | Path) -> str:
    """sha256 of the base model: its config and weight files (what makes two parties' copies the same model)."""
    root = Path(model_dir)
    files = sorted(p for p in root.iterdir() if p.name == "config.json" or p.suffix in (".safetensors", ".bin"))
    key = (str(root.resolve()), max((p.stat().st_mtime for p in files), default=0.0))
    if key not in _HASHES:
        digest = hashlib.sha256()
        for path in files:
            digest.update(path.name.encode() + b"\0")
            with path.open("rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


def load_config(model_dir: str | Path):
    offline()
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(model_dir), local_files_only=True)


def load_causal_lm(model_dir: str | Path, dtype: str = "float32") -> nn.Module:
    offline()
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    return AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True, dtype=DTYPES[dtype])


class Arch:
    """Where an architecture keeps its pieces (Llama-style: Llama, Mistral, Qwen2, ...; GPT-2)."""

    body: Any  # the transformer stack (model.model, model.transformer)

    def __init__(self, model: Any) -> None:  # a transformers causal LM: attributes per architecture
        if hasattr(model, "model") and hasattr(model.model, "layers") and hasattr(model.model, "rotary_emb"):
            self.kind, self.body, self.blocks = "llama", model.model, "layers"
            self.embed, self.norm = "embed_tokens", "norm"
        elif hasattr(model, "transformer") and hasattr(model.transformer, "h"):
            self.kind, self.body, self.blocks = "gpt2", model.transformer, "h"
            self.embed, self.norm = "wte", "ln_f"
        else:
            raise ConfigError(f"unsupported architecture {type(model).__name__} (Llama-style or GPT-2)", "llm")


def layer_count(config) -> int:
    return int(getattr(config, "num_hidden_layers", None) or config.n_layer)


def context_length(config) -> int:
    return int(getattr(config, "max_position_embeddings", None) or config.n_positions)


class CausalLMPart(nn.Module):
    """embed? -> blocks [first, stop) -> norm + lm_head? of one causal LM (see the module docstring)."""

    def __init__(self, model: Any, first: int, stop: int, embed: bool, head: bool, base_sha256: str) -> None:
        super().__init__()
        arch = Arch(model)
        self.kind, self.first, self.stop, self.embed, self.head = arch.kind, first, stop, embed, head
        self.base_sha256 = base_sha256
        self.config: Any = model.config
        blocks = getattr(arch.body, arch.blocks)
        for i in range(len(blocks)):  # placeholders keep the original block indices in the adapters' names
            if not first <= i < stop:
                blocks[i] = nn.Identity()
        if not embed:
            setattr(arch.body, arch.embed, None)
            if arch.kind == "gpt2":
                arch.body.wpe = None
        if not head:
            setattr(arch.body, arch.norm, None)
            model.lm_head = None
        self.lm: Any = model
        self.arch = arch
        self.cache: Any = None  # generation: this part's own KV cache
        self.past = 0  # tokens already in the cache
        self.generating = False  # a predict run: a sequence (a prompt) starts a cache, one token extends it

    # -- adapters only in the state dict ------------------------------------------------------------
    def state_dict(self, *args, **kwargs):
        full = super().state_dict(*args, **kwargs)
        return type(full)((k, v) for k, v in full.items() if is_adapter(k))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        expected, given = set(self.state_dict()), set(state_dict)
        if strict and expected != given:
            raise RuntimeError(f"adapters of this part: missing {sorted(expected - given)[:4]}, "
                               f"unexpected {sorted(given - expected)[:4]}")
        return super().load_state_dict(state_dict, strict=False, assign=assign)

    # -- generation --------------------------------------------------------------------------------
    def start_cache(self) -> None:
        from transformers import DynamicCache

        self.cache, self.past = DynamicCache(config=self.config), 0

    def drop_cache(self) -> None:
        self.cache, self.past = None, 0

    # -- forward -----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        body = self.arch.body
        h = getattr(body, self.arch.embed)(x.long()) if self.embed else x.to(self.lm.dtype)
        length = h.shape[1]
        if self.generating and (length > 1 or self.cache is None):
            self.start_cache()
        positions = (torch.arange(length, device=h.device) + self.past).unsqueeze(0)
        mask = self._mask(h, positions)
        if self.kind == "gpt2":
            h = self._gpt2(h, positions, mask)
        elif self.stop > self.first:
            rotary = body.rotary_emb(h, position_ids=positions)
            for i in range(self.first, self.stop):
                h = body.layers[i](h, attention_mask=mask, position_ids=positions, position_embeddings=rotary,
                                   cache=self.cache, use_cache=self.cache is not None)
        if self.cache is not None:
            self.past += length
        if self.head:
            h = self.lm.lm_head(getattr(body, self.arch.norm)(h))
        return h.float()  # what crosses a cut is float32 (a bf16 part: the edge's codec may send bf16)

    def _gpt2(self, h: torch.Tensor, positions: torch.Tensor, mask) -> torch.Tensor:
        body = self.arch.body
        if self.embed:
            h = body.drop(h + body.wpe(positions))
        for i in range(self.first, self.stop):
            h = body.h[i](h, cache=self.cache, attention_mask=mask, use_cache=self.cache is not None)
        return h

    def _mask(self, h: torch.Tensor, positions: torch.Tensor) -> Optional[torch.Tensor]:
        """The full model's causal mask for a whole sequence; none for one new token (it sees every cached one)."""
        if self.past and h.shape[1] == 1:
            return None
        if self.past:
            raise ValueError("a part decodes one new token at a time after the prompt")
        from transformers.masking_utils import create_causal_mask

        return create_causal_mask(config=self.config, inputs_embeds=h, attention_mask=None, cache=None,
                                  position_ids=positions)


def base_models(modules: dict[str, nn.Module]) -> dict[str, str]:
    """{segment: sha256 of its base model} of the LLM parts among `modules` (recorded with their adapters)."""
    return {name: m.base_sha256 for name, m in modules.items() if isinstance(m, CausalLMPart)}


def check_base(segment: str, recorded: Optional[str], module: nn.Module, what: str) -> None:
    """Adapters trained on one base model do not fit another: refuse them (ConfigError naming both)."""
    own = getattr(module, "base_sha256", None)
    if recorded is not None and own is not None and recorded != own:
        raise ConfigError(f"the adapters of segment {segment!r} in {what} were trained on base model {recorded[:12]}, "
                          f"but this party's base model is {own[:12]}", what)


def build_llm_part(spec, where: str) -> CausalLMPart:
    """The part `spec` (an LLMPartSpec) names; ConfigError naming `where` for a bad directory or range."""
    model_dir = Path(spec.model)
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"no model at {model_dir} (a save_pretrained directory with config.json)"
                          + ("; create it with `meshsl llm prepare TOPOLOGY`" if spec.create else ""),
                          f"{where}.llm.model")
    try:
        model = load_causal_lm(model_dir, spec.dtype)
    except Exception as exc:  # transformers raises OSError/ValueError/KeyError for a broken directory
        raise ConfigError(f"cannot load the model in {model_dir}: {type(exc).__name__}: {exc}", f"{where}.llm.model") \
            from None
    layers = layer_count(model.config)
    first, stop = spec.blocks
    if stop > layers:
        raise ConfigError(f"blocks {spec.blocks} lie outside the model's {layers} decoder blocks ({model_dir})",
                          f"{where}.llm.blocks")
    if spec.lora is not None:
        try:
            model = inject_lora(model, spec.lora)
        except ValueError as exc:
            raise ConfigError(f"LoRA targets {spec.lora.targets} do not fit {type(model).__name__}: {exc}",
                              f"{where}.llm.lora.targets") from None
    else:
        freeze_base(model)
    return CausalLMPart(model, first, stop, spec.embed, spec.head, base_hash(model_dir))
