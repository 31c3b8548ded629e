"""Text datasets for causal language models: local .jsonl or .txt, tokenised, packed to a fixed length.

`dataset: {name: text, options: {path: notes.jsonl, tokenizer: models/tiny, seq_len: 64}}`. Every
document is tokenised with the model's own tokenizer (`tokenizer.json` of a save_pretrained directory),
followed by the end-of-text token; the token stream is cut into rows of exactly `seq_len` tokens (the
tail that does not fill a row is dropped). No padding anywhere, so every part of a split model rebuilds
the positions and the causal mask from the sequence length alone (meshsl.models.llm_parts).

A row's features are its token ids (float32, exact below 2**24, like every meshsl feature); as labels the
same ids (int64, one class per vocabulary entry): the causal-LM loss shifts them by one."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from meshsl.data.registry import Table, register_dataset, resolve_path
from meshsl.errors import DataError

EOS_DEFAULT = "<|endoftext|>"


def corpus_texts(path: Path, field: str = "text", where: str = "corpus") -> list[str]:
    """A .jsonl file (one JSON object a line, its text under `field`) or a plain text file (one document)."""
    if not path.is_file():
        raise DataError(f"file not found: {path}", where)
    if path.suffix != ".jsonl":
        return [path.read_text(encoding="utf-8")]
    texts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise DataError(f"{path} line {number} is not JSON: {exc}", where) from None
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise DataError(f"{path} line {number} has no string field {field!r}", where)
        texts.append(record[field])
    return texts


def tokenizer_files(directory: Path, where: str) -> tuple[Path, str]:
    """`tokenizer.json` of a save_pretrained directory and its end-of-text token."""
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise DataError(f"no tokenizer.json in {directory} (a save_pretrained directory of the model)",
                        f"{where}.tokenizer")
    config = directory / "tokenizer_config.json"
    eos = json.loads(config.read_text()).get("eos_token") if config.is_file() else None
    return path, eos if isinstance(eos, str) else EOS_DEFAULT


def tokenize_packed(texts: list[str], tokenizer_dir: Path, seq_len: int, where: str) -> tuple[np.ndarray, int]:
    """[rows, seq_len] int64 token ids and the tokenizer's vocabulary size."""
    from tokenizers import Tokenizer  # the llm extra

    path, eos = tokenizer_files(tokenizer_dir, where)
    tokenizer = Tokenizer.from_file(str(path))
    eos_id = tokenizer.token_to_id(eos)
    stream: list[int] = []
    for encoding in tokenizer.encode_batch(texts, add_special_tokens=False):
        stream.extend(encoding.ids)
        if eos_id is not None:
            stream.append(eos_id)
    rows = len(stream) // seq_len
    if rows == 0:
        raise DataError(f"{len(stream)} tokens do not fill one row of seq_len {seq_len}", f"{where}.seq_len")
    ids = np.asarray(stream[:rows * seq_len], dtype=np.int64).reshape(rows, seq_len)
    return ids, tokenizer.get_vocab_size(with_added_tokens=True)


@register_dataset("text")
def load_text(base_dir: Path, path: str, tokenizer: str, seq_len: int, field: str = "text") -> Table:
    where = "dataset 'text'.options"
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise DataError(f"seq_len must be an integer >= 2, got {seq_len!r}", f"{where}.seq_len")
    file = resolve_path(base_dir, path, f"{where}.path")
    tokenizer_dir = Path(tokenizer).expanduser()
    tokenizer_dir = tokenizer_dir if tokenizer_dir.is_absolute() else base_dir / tokenizer_dir
    ids, vocab = tokenize_packed(corpus_texts(file, field, f"{where}.path"), tokenizer_dir, seq_len, where)
    return Table(features=ids.astype(np.float32), labels=ids, num_classes=vocab,
                 feature_names=tuple(f"t{i}" for i in range(seq_len)))
