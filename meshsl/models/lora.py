"""LoRA adapters (peft) on a Hugging Face model: injected, the base frozen, and the adapters' own state.

Adapters are drawn for the WHOLE model with `torch.manual_seed(lora.seed)` before a part keeps its own
layers, so every party draws exactly the values one-process `get_peft_model` draws after the same seed."""
from __future__ import annotations

import torch
from torch import nn

ADAPTER_MARK = "lora_"


def lora_config(spec):
    from peft import LoraConfig  # the llm extra: only LLM segments import it

    return LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=list(spec.targets),
                      bias="none")


def inject_lora(model: nn.Module, spec) -> nn.Module:
    """Adapters on every module named in `spec.targets`; everything else frozen. ValueError if none matched."""
    from peft import inject_adapter_in_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = inject_adapter_in_model(lora_config(spec), model)
    freeze_base(model)
    return model


def freeze_base(model: nn.Module) -> None:
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(is_adapter(name))


def is_adapter(key: str) -> bool:
    return ADAPTER_MARK in key


def adapter_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors, keyed as in the module's full state dict."""
    return {k: v for k, v in module.state_dict().items() if is_adapter(k)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W + B A * alpha / r) and drop the adapter modules."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    return model
