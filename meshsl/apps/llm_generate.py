"""Generation across the split (`meshsl predict` of a causal_lm task): each prompt is continued one token
per predict round. Every part keeps its own KV cache (meshsl.models.llm_parts), so a round sends one
token's hidden states over each cut; the node holding the text and the LM head (the client, U-shaped)
picks the next token and feeds it to its own embeddings: tokens never leave it.

- `read_prompts`: the prompt file (.txt: a prompt a line; .jsonl: {"text": ...}) tokenised with the text
  source's tokenizer, each after the end-of-text token (a prompt is never one token: a part tells the
  prompt from a new token by its length);
- `PromptFeed`: what the embeddings read each round: the prompt, then the last token picked;
- `Decoder`: on the head's node after each round, picks the next token (greedy or sampled) and writes
  `<task>.jsonl` when a prompt is done."""
from __future__ import annotations

from typing import Optional

import json
from pathlib import Path
import torch

from meshsl.models.llm_parts import CausalLMPart
from meshsl.config.specs import GenerateSpec
from meshsl.data.text import corpus_texts, tokenizer_files
from meshsl.errors import ConfigError


def settings(task) -> GenerateSpec:
    return task.generate or GenerateSpec()


class PromptFeed:
    """predict_inputs[source] of a text source: indexing with a row gives that row's prompt on its first
    round and the last picked token after (a [1, length] tensor of token ids, as float like all features)."""

    def __init__(self, prompts: list[list[int]]) -> None:
        self.prompts = prompts
        self.row: Optional[int] = None
        self.tokens: list[int] = []

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, rows) -> torch.Tensor:
        row = int(torch.as_tensor(rows).reshape(-1)[0])
        if row != self.row:
            self.row, self.tokens = row, []
            return torch.tensor([self.prompts[row]], dtype=torch.float32)
        return torch.tensor([[self.tokens[-1]]], dtype=torch.float32)

    def push(self, token: int) -> None:
        self.tokens.append(token)


def read_prompts(source, path: Path, base_dir: Path, where: str) -> PromptFeed:
    from tokenizers import Tokenizer

    options = source.dataset.options
    tokenizer_dir = Path(str(options.get("tokenizer", ""))).expanduser()
    tokenizer_dir = tokenizer_dir if tokenizer_dir.is_absolute() else Path(base_dir) / tokenizer_dir
    file, eos = tokenizer_files(tokenizer_dir, where)
    tokenizer = Tokenizer.from_file(str(file))
    texts = corpus_texts(path, options.get("field", "text"), where) if path.suffix == ".jsonl" else \
        [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()] if path.is_file() \
        else corpus_texts(path, where=where)  # the missing-file error
    start = tokenizer.token_to_id(eos)
    if start is None:
        raise ConfigError(f"the tokenizer has no {eos!r} token to start prompts with", where)
    prompts = [[start] + e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
    if not prompts:
        raise ConfigError(f"{path} holds no prompt", where)
    return PromptFeed(prompts)


def start_generating(worker) -> None:
    """Every LLM part of a predict run keeps a KV cache (a prompt starts it afresh)."""
    for module in worker.modules.values():
        if isinstance(module, CausalLMPart):
            module.generating = True


class Decoder:
    """The head's node: the next token of each round, and the finished prompts' lines in `<task>.jsonl`."""

    def __init__(self, worker, task, path: Path) -> None:
        sources = [d for d in worker.topology.spec.data if d.kind == "features" and d.dataset.name == "text"
                   and worker.node in worker.topology.placement[d.name]]
        feed = worker.data.predict_inputs.get(sources[0].name) if sources else None
        if not isinstance(feed, PromptFeed):
            raise ConfigError(f"generating with task {task.name!r} needs its LM head on the node that holds the "
                              f"prompts (U-shaped: tokens never leave the client); node {worker.node!r} has none",
                              f"tasks({task.name}).output")
        self.feed, self.task, self.path, self.spec = feed, task, path, settings(task)
        self.generator = torch.Generator().manual_seed(self.spec.seed)
        tokenizer_dir = Path(str(sources[0].dataset.options.get("tokenizer")))
        self.tokenizer_dir = tokenizer_dir if tokenizer_dir.is_absolute() else worker.topology.base_dir / tokenizer_dir

    def pick(self, logits: torch.Tensor) -> int:
        logits = logits.float()
        if self.spec.strategy == "greedy":
            return int(logits.argmax())
        logits = logits / self.spec.temperature
        if self.spec.top_k:
            cutoff = torch.topk(logits, min(self.spec.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < cutoff, float("-inf"))
        return int(torch.multinomial(logits.softmax(-1), 1, generator=self.generator))

    def step(self, logits: torch.Tensor) -> int:
        """After a round: pick and feed the next token; 1 when the prompt is done (its line written)."""
        self.feed.push(self.pick(logits.reshape(-1, logits.shape[-1])[-1]))
        if len(self.feed.tokens) < self.spec.max_new_tokens:
            return 0
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(tokenizer_files(self.tokenizer_dir, "generate")[0]))
        row = self.feed.row
        if row is None:
            raise RuntimeError("a token was picked before any prompt began")
        prompt = self.feed.prompts[row]
        line = {"row": self.feed.row, "prompt_ids": prompt, "ids": self.feed.tokens,
                "prompt": tokenizer.decode(prompt[1:]), "completion": tokenizer.decode(self.feed.tokens)}
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(line) + "\n")
        return 1


