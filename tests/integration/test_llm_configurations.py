"""LLM parts in the configurations: SplitFed averages client adapters only, base weights never move, and
checkpoints hold adapters only (with their base model's hash)."""
import asyncio
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from support.llm_helpers import tiny_model, u_shaped  # noqa: E402

from meshsl.config.loader import parse_spec  # noqa: E402
from meshsl.topology.model import topology_from_spec  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("llm"))


def splitfed(model: Path, corpus: Path, mode: str = "splitfed") -> dict:
    document = u_shaped(model, corpus, steps=4, micro_batches=2)
    document["nodes"][0]["endpoint"] = "inproc://clinic"
    document["nodes"][1]["endpoint"] = "inproc://cloud"
    document["clients"] = {"count": 4, "replicate": ["clinic"], "mode": mode, "average_every": 2,
                           "partition": {"kind": "iid", "min_samples": 4}}
    return document


def test_splitfed_four_clients_average_adapters_only(tiny):
    from meshsl.models.llm_parts import load_causal_lm
    from meshsl.coordinator.runtime import RunOptions
    from meshsl.launch.simulate import simulate

    model, corpus = tiny
    topology = topology_from_spec(parse_spec(splitfed(model, corpus)), "<test>", Path("."))
    summary, runtimes = asyncio.run(simulate(topology, RunOptions(evaluate=False)))
    clients = [r.worker for name, r in runtimes.items() if name.startswith("clinic")]
    assert len(clients) == 4
    base = load_causal_lm(model).state_dict()
    for segment in ("bottom", "top"):
        states = [w.modules[segment].state_dict() for w in clients]
        assert states[0] and all("lora_" in key for key in states[0])  # what FedAvg and checkpoints see
        for state in states[1:]:  # averaged at step 4 (every 2 steps): every client holds the same adapters
            assert all(torch.equal(state[k], states[0][k]) for k in state)
        assert any(k.endswith("lora_B.default.weight") and states[0][k].abs().sum() > 0 for k in states[0])
        for name, value in clients[1].modules[segment].lm.state_dict().items():  # the frozen base is untouched
            if "lora_" not in name and name in base:
                assert torch.equal(value, base[name]), name
    weights = clients[0].weights("bottom")
    assert len(weights) == len(clients[0].modules["bottom"].state_dict())


def test_checkpoint_holds_adapters_only_with_base_hash(tiny, tmp_path):
    from meshsl.compute import checkpoint
    from meshsl.models.llm_parts import base_hash
    from meshsl.compute.worker import SegmentWorker
    from meshsl.errors import ConfigError

    model, corpus = tiny
    topology = topology_from_spec(parse_spec(u_shaped(model, corpus)), "<test>", Path("."))
    worker = SegmentWorker(topology, "clinic")
    path = checkpoint.save(tmp_path, "clinic", 0, worker.state())
    state = checkpoint.load(tmp_path, "clinic", 0)
    assert state["base_models"] == {"bottom": base_hash(model), "top": base_hash(model)}
    for segment, tensors in state["modules"].items():
        assert tensors and all("lora_" in k for k in tensors), segment
    adapters = sum(t.numel() * t.element_size() for ts in state["modules"].values() for t in ts.values())
    assert adapters < 0.2 * (model / "model.safetensors").stat().st_size
    assert path.stat().st_size < (model / "model.safetensors").stat().st_size
    state["base_models"]["bottom"] = "0" * 64  # adapters of another base model are refused
    with pytest.raises(ConfigError, match="base model"):
        worker.restore(state)


def _errors(document: dict) -> str:
    from meshsl.config.loader import ConfigErrors
    from meshsl.errors import ConfigError

    with pytest.raises((ConfigError, ConfigErrors)) as caught:
        topology_from_spec(parse_spec(document), "lm.yaml", Path("."))
    return str(caught.value)


def test_bad_input_is_a_clear_error_naming_segment_and_file(tiny, tmp_path):
    model, corpus = tiny
    missing = u_shaped(model, corpus)
    missing["segments"][1]["llm"]["model"] = str(tmp_path / "nowhere")
    text = _errors(missing)
    assert "lm.yaml: segments[1](middle).llm.model" in text and "no model at" in text

    outside = u_shaped(model, corpus)
    outside["segments"][1]["llm"]["blocks"] = [1, 7]
    assert "segments[1](middle).llm.blocks" in _errors(outside)

    other = tmp_path / "other"  # the cloud's copy of the base model differs
    shutil.copytree(model, other)
    weights = other / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    differ = u_shaped(model, corpus)
    differ["segments"][1]["llm"]["model"] = str(other)
    text = _errors(differ)
    assert "base models differ by hash" in text and "middle" in text and "lm.yaml" in text

    long = u_shaped(model, corpus)
    long["data"][0]["dataset"]["options"]["seq_len"] = 65
    assert "data[0](text).dataset.options.seq_len" in _errors(long) and "beyond the context" in _errors(long)

    foreign = tmp_path / "tok"  # a tokenizer that is not the model's
    foreign.mkdir()
    (foreign / "tokenizer.json").write_text((model / "tokenizer.json").read_text().replace('"<|pad|>"', '"<|pad2|>"'))
    wrong = u_shaped(model, corpus)
    wrong["data"][0]["dataset"]["options"]["tokenizer"] = str(foreign)
    assert "data[0](text).dataset.options.tokenizer" in _errors(wrong) and "not the one of the model" in _errors(wrong)


def test_token_recovery_attack_on_the_first_cut_with_and_without_dp(tiny):
    """`meshsl audit` of an LLM topology: the receiver reads most tokens back from one block's hidden states;
    activation DP on the cut takes that to chance."""
    from meshsl.apps.audit import audit

    model, corpus = tiny
    figures = {}
    for name, privacy in (("none", []), ("dp", [{"segment": "bottom",
                                                 "dp": {"clip_norm": 1.0, "noise_multiplier": 1.0}}])):
        document = u_shaped(model, corpus, steps=4, micro_batches=2)
        document["privacy"] = privacy
        report = audit(topology_from_spec(parse_spec(document), "<test>", Path(".")), steps=4)
        assert report["label_edges"] == {}  # U-shaped: no labels cross; a causal LM's labels are its tokens
        figures[name] = report["edges"]["bottom->middle"]["token_recovery"]
    clear, noisy = figures["none"], figures["dp"]
    assert clear["learned_inversion_recovered"] > 5 * clear["commonest_token_share"]
    assert clear["nearest_embedding_recovered"] > 0.2
    assert noisy["learned_inversion_recovered"] < clear["learned_inversion_recovered"] / 5
    assert noisy["nearest_embedding_recovered"] < clear["nearest_embedding_recovered"] / 5


@pytest.mark.parametrize("arch,targets", [("llama", ["q_proj", "v_proj", "down_proj"]), ("gpt2", ["c_attn", "c_fc"])])
def test_parts_chained_compute_what_the_whole_model_computes(tmp_path, arch, targets):
    """embed + blocks [0, 1) | blocks [1, 3) | norm + head, each rebuilding positions, mask (and rotary) from
    the sequence length: the same logits, bit for bit, as the whole peft model; adapters only in the state."""
    from peft import get_peft_model

    from meshsl.models.llm_parts import build_llm_part, load_causal_lm
    from meshsl.models.lora import lora_config
    from meshsl.config.specs import LLMPartSpec, LoraSpec

    model, _ = tiny_model(tmp_path, arch=arch, documents=20)
    lora = LoraSpec(targets=targets, r=2, alpha=4, seed=3)
    parts = [build_llm_part(LLMPartSpec(model=str(model), embed=True, blocks=[0, 1], lora=lora), "s0"),
             build_llm_part(LLMPartSpec(model=str(model), blocks=[1, 3], lora=lora), "s1"),
             build_llm_part(LLMPartSpec(model=str(model), blocks=[3, 3], head=True, lora=lora), "s2")]
    torch.manual_seed(3)
    whole = get_peft_model(load_causal_lm(model), lora_config(lora))
    with torch.no_grad():  # non-zero B so that the adapters take part
        for name, parameter in whole.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
    state = {k.removeprefix("base_model.model."): v for k, v in whole.state_dict().items() if "lora_" in k}
    for part in parts:
        assert all("lora_" in k for k in part.state_dict())
        assert part.state_dict() or part.stop == part.first  # the head part adapts no target here
        part.load_state_dict({k: state[k.removeprefix("lm.")] for k in part.state_dict()})
    ids = torch.randint(0, 390, (2, 12))
    hidden = ids.float()
    for part in parts:
        hidden = part(hidden)
    assert torch.equal(hidden, whole(input_ids=ids).logits)
