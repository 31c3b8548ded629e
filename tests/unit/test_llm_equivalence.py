"""Split LoRA fine-tuning of a causal LM over real node processes equals one-process peft training,
bit for bit in fp32 with the same micro-batches. The reference below uses transformers and peft only
(plus meshsl's batch sampler, to pick the same rows): none of meshsl's model, loss or runtime code."""
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("transformers")
pytest.importorskip("peft")

from support.llm_helpers import TARGETS, tiny_model, u_shaped  # noqa: E402


def peft_reference(document: dict, base_dir: Path) -> dict[str, torch.Tensor]:
    """Adapters after one-process peft training on the split run's batches and micro-batches."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from meshsl.config.loader import parse_spec
    from meshsl.data import batch_indices, load_dataset
    from meshsl.schedule.steps import sample_pools, training_steps
    from meshsl.topology.model import topology_from_spec

    topology = topology_from_spec(parse_spec(document), "<test>", base_dir)
    training = topology.spec.training
    tokens = torch.as_tensor(load_dataset(topology.data["tokens"].dataset, base_dir).labels)
    model = AutoModelForCausalLM.from_pretrained(document["segments"][0]["llm"]["model"], local_files_only=True)
    torch.manual_seed(0)  # LoraSpec.seed: adapters drawn for the whole model
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS + ["lm_head"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01, weight_decay=0.0)
    pool = sample_pools(topology).train[0]
    for info in training_steps(topology):
        batch = batch_indices(pool, training.batch_size, training.seed, info.epoch, info.step_in_epoch, 0)
        for rows in np.array_split(batch, training.micro_batches):
            ids = tokens[torch.as_tensor(rows)]
            (model(input_ids=ids, labels=ids).loss * (len(rows) / training.batch_size)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {k.removeprefix("base_model.model."): v.detach() for k, v in model.state_dict().items() if "lora_" in k}


@pytest.mark.slow
def test_split_lora_adapters_bit_identical_to_one_process_peft(tmp_path):
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from meshsl.cli import app

    model, corpus = tiny_model(tmp_path / "m")
    document = u_shaped(model, corpus, steps=3, micro_batches=4, targets=TARGETS + ["lm_head"])
    path = tmp_path / "lm.yaml"
    path.write_text(yaml.safe_dump(document))
    result = CliRunner().invoke(app, ["run", str(path), "--free-ports", "--no-progress", "--run-dir",
                                      str(tmp_path / "run"), "--weights-out", str(tmp_path / "w")])
    assert result.exit_code == 0, result.output
    split = {}
    for segment in ("bottom", "middle", "top"):
        for key, value in load_file(str(tmp_path / "w" / f"{segment}.safetensors")).items():
            assert "lora_" in key, f"{segment}: {key} is not an adapter (base weights must never be saved)"
            split[key.removeprefix("lm.")] = value
    reference = peft_reference(document, tmp_path)
    assert set(split) == set(reference) and len(reference) == 3 * 7 * 2 + 2
    moved = 0
    for key, value in reference.items():
        assert torch.equal(split[key], value), f"{key} differs by {(split[key] - value).abs().max():.3g}"
        moved += "lora_B" in key and bool(value.abs().sum() > 0)  # B starts at zero: training moved it
    assert moved == 3 * 7 + 1
