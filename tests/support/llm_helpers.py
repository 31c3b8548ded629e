"""A tiny causal LM (3 Llama blocks, width 64, a 400-token BPE vocabulary) and topologies over it, for the
LLM tests. Imported as `support.llm_helpers` (tests/ is on the path: [tool.pytest] pythonpath)."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "topologies" / "data" / "llm_corpus.jsonl"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_model(directory: Path, arch: str = "llama", documents: int = 60) -> tuple[Path, Path]:
    """(model directory, corpus file): the model built by meshsl's recipe from the first `documents` of the
    example corpus."""
    from meshsl.models.llm_recipe import create_model
    from meshsl.config.specs import ModelRecipeSpec

    directory.mkdir(parents=True, exist_ok=True)
    corpus = directory / "corpus.jsonl"
    corpus.write_text("\n".join(CORPUS.read_text().splitlines()[:documents]) + "\n")
    recipe = ModelRecipeSpec(arch=arch, layers=3, width=64, heads=2, vocab=400, context=64, corpus=corpus.name)
    return create_model(recipe, directory / "model", directory), corpus


def lora(targets=None, r: int = 4) -> dict:
    return {"targets": list(targets or TARGETS), "r": r, "alpha": 8}


def u_shaped(model: Path, corpus: Path, steps: int = 4, micro_batches: int = 4, cut: int = 1,
             targets=None, optimizer: str = "adamw", **training) -> dict:
    """Clinic: embeddings + blocks [0, cut) and norm + head + loss; cloud: blocks [cut, 3)."""
    dataset = {"name": "text", "test_fraction": 0.2, "options": {"path": str(corpus), "tokenizer": str(model),
                                                                "seq_len": 16}}
    head_lora = lora(targets=["lm_head"]) if targets is None else lora(targets)
    return {
        "name": "tiny-lm",
        "nodes": [{"name": "clinic", "endpoint": "tcp://127.0.0.1:6301", "party": "clinic"},
                  {"name": "cloud", "endpoint": "tcp://127.0.0.1:6302", "party": "cloud"}],
        "data": [{"name": "text", "node": "clinic", "dataset": dataset},
                 {"name": "tokens", "node": "clinic", "kind": "labels", "dataset": dataset}],
        "segments": [
            {"name": "bottom", "node": "clinic", "inputs": ["text"],
             "llm": {"model": str(model), "embed": True, "blocks": [0, cut], "lora": lora(targets)}},
            {"name": "middle", "node": "cloud", "inputs": ["bottom"],
             "llm": {"model": str(model), "blocks": [cut, 3], "lora": lora(targets)}},
            {"name": "top", "node": "clinic", "inputs": ["middle"],
             "llm": {"model": str(model), "blocks": [3, 3], "head": True, "lora": head_lora}}],
        "tasks": [{"name": "lm", "output": "top", "labels": "tokens", "loss": "causal_lm",
                   "metrics": ["perplexity", "accuracy"]}],
        "training": {"steps": steps, "batch_size": 8, "micro_batches": micro_batches, "schedule": "1f1b",
                     "optimizer": {"name": optimizer, "lr": 0.01}, "seed": 2, "eval_batch_size": 64, **training},
    }
