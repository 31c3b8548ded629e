"""A small causal LM built from a recipe, with a byte-level BPE tokenizer trained locally on a corpus.

For trying split fine-tuning out without downloading anything: `meshsl llm prepare TOPOLOGY` builds every
`segments[].llm.create` model whose directory is missing. Deterministic: the same recipe and corpus give
the same tokenizer and the same weights (seeded)."""
from __future__ import annotations

from pathlib import Path

import torch

from meshsl.models.llm_parts import offline
from meshsl.data.text import corpus_texts

SPECIAL = ["<|endoftext|>", "<|pad|>"]


def train_tokenizer(texts: list[str], vocab: int):
    """Byte-level BPE (GPT-2 style) trained on `texts`, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=SPECIAL[0], bos_token=SPECIAL[0],
                                   pad_token=SPECIAL[1])


def model_config(recipe, vocab: int, eos: int):
    from transformers import GPT2Config, LlamaConfig

    if recipe.arch == "gpt2":
        return GPT2Config(vocab_size=vocab, n_positions=recipe.context, n_embd=recipe.width, n_layer=recipe.layers,
                          n_head=recipe.heads, bos_token_id=eos, eos_token_id=eos, tie_word_embeddings=False,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return LlamaConfig(vocab_size=vocab, hidden_size=recipe.width, intermediate_size=recipe.width * 8 // 3 // 8 * 8,
                       num_hidden_layers=recipe.layers, num_attention_heads=recipe.heads,
                       num_key_value_heads=recipe.heads, max_position_embeddings=recipe.context,
                       bos_token_id=eos, eos_token_id=eos, pad_token_id=eos + 1, tie_word_embeddings=False)


def create_model(recipe, out: Path, base_dir: Path) -> Path:
    """Build the recipe's model and tokenizer into `out` (save_pretrained layout)."""
    offline()
    from transformers import AutoModelForCausalLM

    tokenizer = train_tokenizer(corpus_texts((base_dir / recipe.corpus)), recipe.vocab)
    config = model_config(recipe, len(tokenizer), tokenizer.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out
