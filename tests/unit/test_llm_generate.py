"""Generation across the split (every part with its own KV cache, the client picking each token) gives the
tokens of the assembled model: the base with the adapters merged, generating in one process with plain
transformers. Also: export + assemble of an LLM topology is one Hugging Face model directory."""
import json

import pytest
import torch
import yaml

pytest.importorskip("transformers")
pytest.importorskip("peft")

from support.llm_helpers import tiny_model, u_shaped  # noqa: E402


def _cli(*args):
    from typer.testing import CliRunner

    from meshsl.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.slow
def test_generation_across_the_split_equals_the_assembled_model(tmp_path):
    from transformers import AutoModelForCausalLM

    model, corpus = tiny_model(tmp_path / "m")
    document = u_shaped(model, corpus, steps=6, micro_batches=2)
    document["tasks"][0]["generate"] = {"max_new_tokens": 8}
    path = tmp_path / "lm.yaml"
    path.write_text(yaml.safe_dump(document))
    weights = tmp_path / "w"
    _cli("run", path, "--free-ports", "--no-progress", "--run-dir", tmp_path / "run", "--weights-out", weights)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The iris dataset\nReturn a new\n")
    _cli("predict", path, "--weights", weights, "--input", f"clinic={prompts}", "--output", tmp_path / "out",
         "--free-ports", "--run-dir", tmp_path / "prun")
    lines = [json.loads(line) for line in (tmp_path / "out" / "lm.jsonl").read_text().splitlines()]
    assert [line["row"] for line in lines] == [0, 1] and all(len(line["ids"]) == 8 for line in lines)

    for node in ("clinic", "cloud"):
        _cli("export", path, "--weights", weights, "--node", node, "--out", tmp_path / f"export-{node}")
    for export in (tmp_path / "export-clinic").glob("*.safetensors"):
        from safetensors import safe_open
        with safe_open(str(export), "pt") as handle:
            assert all("lora_" in k for k in handle.keys()) and handle.metadata()["base_model_sha256"]
    _cli("assemble", path, tmp_path / "export-clinic", tmp_path / "export-cloud", "--out", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), local_files_only=True).eval()
    base = AutoModelForCausalLM.from_pretrained(str(model), local_files_only=True).eval()
    changed = 0
    for line in lines:
        prompt = torch.tensor([line["prompt_ids"]])
        out = merged.generate(prompt, max_new_tokens=8, do_sample=False, min_new_tokens=8,
                              pad_token_id=0)[0, prompt.shape[1]:].tolist()
        assert out == line["ids"], (out, line["ids"])
        changed += out != base.generate(prompt, max_new_tokens=8, do_sample=False, min_new_tokens=8,
                                        pad_token_id=0)[0, prompt.shape[1]:].tolist()
    assert changed  # the adapters matter: the base model alone continues differently


def test_sampling_is_seeded_and_top_k_one_is_greedy():
    from meshsl.config.specs import GenerateSpec
    from meshsl.apps.llm_generate import Decoder

    def decoder(spec):
        d = Decoder.__new__(Decoder)  # only the picking: no worker, no files
        d.spec, d.generator = spec, torch.Generator().manual_seed(spec.seed)
        return d

    logits = torch.randn(50, generator=torch.Generator().manual_seed(1))
    assert decoder(GenerateSpec(strategy="sample", top_k=1)).pick(logits) == int(logits.argmax())
    a, b = decoder(GenerateSpec(strategy="sample", seed=4)), decoder(GenerateSpec(strategy="sample", seed=4))
    draws = [a.pick(logits) for _ in range(20)]
    assert draws == [b.pick(logits) for _ in range(20)] and len(set(draws)) > 1
    hot = decoder(GenerateSpec(strategy="sample", temperature=0.01, seed=4))
    assert all(hot.pick(logits) == int(logits.argmax()) for _ in range(10))
