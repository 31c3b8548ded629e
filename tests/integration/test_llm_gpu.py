"""The `device: cuda` + bf16 path of LLM parts: the parts compute in bfloat16 on the GPU, cross cuts as
float32 (bf16 on the wire where the edge's codec says so), and train their adapters. Skips without CUDA."""
import asyncio
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

from support.llm_helpers import tiny_model, u_shaped  # noqa: E402


def test_bf16_parts_train_on_cuda(tmp_path):
    from meshsl.config.loader import parse_spec
    from meshsl.coordinator.runtime import RunOptions
    from meshsl.launch.simulate import simulate
    from meshsl.topology.model import topology_from_spec

    model, corpus = tiny_model(tmp_path)
    document = u_shaped(model, corpus, steps=3, micro_batches=2)
    for node in document["nodes"]:
        node["device"] = "cuda"
        node["endpoint"] = f"inproc://{node['name']}"
    for segment in document["segments"]:
        segment["llm"]["dtype"] = "bfloat16"
    document["privacy"] = [{"segment": s, "forward": {"codec": "bf16"}, "backward": {"codec": "bf16"}}
                           for s in ("bottom", "middle")]
    topology = topology_from_spec(parse_spec(document), "<test>", Path("."))
    summary, runtimes = asyncio.run(simulate(topology, RunOptions(evaluate=True)))
    assert summary["tasks"]["lm"]["eval"]["perplexity"] < 1e4
    adapters = runtimes["clinic"].worker.modules["bottom"].state_dict()
    assert all(v.is_cuda and v.dtype == torch.bfloat16 for v in adapters.values())
    assert any(k.endswith("lora_B.default.weight") and v.abs().sum() > 0 for k, v in adapters.items())
