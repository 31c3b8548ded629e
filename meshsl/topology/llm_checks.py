"""Checks of the LLM parts of a topology, before any process starts: each a ConfigError naming the segment
(or data source) and the topology file. A missing model directory, a block range outside the model, parties
whose base models differ (by hash), parts that do not join up, a tokenizer that does not match the model,
and a sequence length beyond the model's context."""
from __future__ import annotations

import hashlib
from pathlib import Path

from meshsl.errors import ConfigError, TopologyError


def resolve_model_dirs(spec, base_dir):
    """Relative `segments[].llm.model` directories resolved against the topology file's directory."""
    segments, changed = [], False
    for seg in spec.segments:
        if seg.llm is not None and not Path(seg.llm.model).expanduser().is_absolute():
            llm = seg.llm.model_copy(update={"model": str((Path(base_dir) / seg.llm.model).resolve())})
            seg, changed = seg.model_copy(update={"llm": llm}), True
        segments.append(seg)
    return spec.model_copy(update={"segments": segments}) if changed else spec


def _where(topology, name: str) -> str:
    index = [s.name for s in topology.spec.segments].index(name)
    return f"{topology.source}: segments[{index}]({name})"


def llm_problems(topology) -> list[ConfigError]:
    parts = {s.name: s.llm for s in topology.spec.segments if s.llm is not None}
    if not parts:
        return []
    from meshsl.models.llm_parts import base_hash, layer_count, load_config

    problems: list[ConfigError] = []
    configs, hashes = {}, {}
    for name, llm in parts.items():
        where = _where(topology, name)
        if not (Path(llm.model) / "config.json").is_file():
            hint = "; create it with `meshsl llm prepare TOPOLOGY`" if llm.create else ""
            problems.append(ConfigError(f"no model at {llm.model} (a save_pretrained directory with config.json)"
                                        f"{hint}", f"{where}.llm.model"))
            continue
        configs[name], hashes[name] = load_config(llm.model), base_hash(llm.model)
        layers = layer_count(configs[name])
        if llm.blocks[1] > layers:
            problems.append(ConfigError(f"blocks {llm.blocks} lie outside the {layers} decoder blocks of the model "
                                        f"in {llm.model}", f"{where}.llm.blocks"))
    if len(set(hashes.values())) > 1:
        listed = "; ".join(f"{n} (node {topology.spec.segments[[s.name for s in topology.spec.segments].index(n)].node}"
                           f", {parts[n].model}): {h[:12]}" for n, h in hashes.items())
        problems.append(TopologyError(f"the parts' base models differ by hash: {listed}; every party needs the same "
                                      f"base model", f"{topology.source}: segments"))
    problems += _joins(topology, parts)
    problems += _text_sources(topology, parts, configs)
    return problems


def _joins(topology, parts) -> list[ConfigError]:
    """A part takes token ids (embed) from data, or the hidden states of the part just before it."""
    problems: list[ConfigError] = []
    for name, llm in parts.items():
        where = _where(topology, name)
        inputs = topology.segments[name].inputs
        before = parts.get(inputs[0])
        if len(inputs) != 1:
            problems.append(TopologyError("an llm part takes exactly one input", f"{where}.inputs"))
        elif llm.embed and inputs[0] not in topology.data:
            problems.append(TopologyError(f"a part with embed: true takes token ids from a text data source, not "
                                          f"{inputs[0]!r}", f"{where}.inputs"))
        elif not llm.embed and (before is None or before.head or before.blocks[1] != llm.blocks[0]):
            problems.append(TopologyError(
                f"takes hidden states before block {llm.blocks[0]}: its input must be the llm part ending there "
                f"(blocks [.., {llm.blocks[0]}], no head), got {inputs[0]!r}", f"{where}.inputs"))
    return problems


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _text_sources(topology, parts, configs) -> list[ConfigError]:
    """Text data read with the models' tokenizer, in rows no longer than their context."""
    from meshsl.models.llm_parts import context_length

    problems = []
    for i, data in enumerate(topology.spec.data):
        if data.dataset.name != "text":
            continue
        where = f"{topology.source}: data[{i}]({data.name}).dataset.options"
        options = data.dataset.options
        tokenizer = Path(str(options.get("tokenizer", ""))).expanduser()
        tokenizer = tokenizer if tokenizer.is_absolute() else topology.base_dir / tokenizer
        for name, config in configs.items():
            model_dir = Path(parts[name].model)
            seq_len = options.get("seq_len")
            if isinstance(seq_len, int) and seq_len > context_length(config):
                problems.append(ConfigError(f"seq_len {seq_len} is beyond the context of the model of segment "
                                            f"{name!r} ({context_length(config)} tokens, {model_dir})",
                                            f"{where}.seq_len"))
            problems += _tokenizer_problems(tokenizer, model_dir, config, name, where)
            break  # every part has the same base model (checked above)
    return problems


def _tokenizer_problems(tokenizer: Path, model_dir: Path, config, segment: str, where: str) -> list[ConfigError]:
    file = tokenizer / "tokenizer.json"
    if not file.is_file():
        return [ConfigError(f"no tokenizer.json in {tokenizer}", f"{where}.tokenizer")]
    own = model_dir / "tokenizer.json"
    if own.is_file() and _file_hash(own) != _file_hash(file):
        return [ConfigError(f"the tokenizer in {tokenizer} is not the one of the model of segment {segment!r} "
                            f"({own} differs)", f"{where}.tokenizer")]
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(file)).get_vocab_size(with_added_tokens=True)
    if vocab > config.vocab_size:
        return [ConfigError(f"the tokenizer in {tokenizer} has {vocab} tokens, more than the {config.vocab_size} "
                            f"embeddings of the model of segment {segment!r}", f"{where}.tokenizer")]
    return []
