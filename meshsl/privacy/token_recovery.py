"""Token recovery from the hidden states crossing an LLM cut: what fraction of the client's tokens the
receiving party reads back from what it is sent.

Two attacks by a server that runs the middle blocks (so it holds the same public base model):
* nearest embedding: each position's hidden state against every row of the base model's input embedding
  matrix, by cosine similarity (exact right after the embeddings; the residual stream keeps much of the
  token's direction through the first blocks);
* learned inversion: a linear read-out hidden state -> token (softmax regression) trained on half of the
  held-out sequences with their tokens (an attacker with auxiliary paired text), scored on the other half.

Reported against chance: the share of the commonest token among the scored positions."""
from __future__ import annotations

import torch
from torch import Tensor


def nearest_embedding(hidden: Tensor, embedding: Tensor, chunk: int = 4096) -> Tensor:
    """[positions] token ids whose embeddings point closest to each hidden state."""
    keys = torch.nn.functional.normalize(embedding.float(), dim=-1)
    flat = torch.nn.functional.normalize(hidden.reshape(-1, hidden.shape[-1]).float(), dim=-1)
    return torch.cat([(flat[i:i + chunk] @ keys.T).argmax(-1) for i in range(0, len(flat), chunk)])


def learned_inversion(hidden: Tensor, tokens: Tensor, vocab: int, *, epochs: int = 60, lr: float = 0.05,
                      seed: int = 0) -> tuple[Tensor, Tensor]:
    """(predicted, true) tokens of the scored half: a linear read-out trained on the first half of sequences."""
    generator = torch.Generator().manual_seed(seed)
    half = max(1, len(hidden) // 2)
    width = hidden.shape[-1]
    train_x, test_x = hidden[:half].reshape(-1, width).float(), hidden[half:].reshape(-1, width).float()
    train_y, test_y = tokens[:half].reshape(-1).long(), tokens[half:].reshape(-1).long()
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    readout = torch.nn.Linear(width, vocab)
    with torch.no_grad():
        bound = 1 / width ** 0.5
        readout.weight.uniform_(-bound, bound, generator=generator)
        readout.bias.zero_()
    optimizer = torch.optim.Adam(readout.parameters(), lr=lr)
    with torch.enable_grad():
        for _ in range(epochs):  # full batch: a few thousand positions
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(readout(train_x), train_y).backward()
            optimizer.step()
    with torch.no_grad():
        return readout(test_x).argmax(-1), test_y


def token_recovery_report(hidden: Tensor, tokens: Tensor, embedding: Tensor, *, seed: int = 0) -> dict:
    """Fractions of tokens recovered by both attacks from `hidden` [sequences, tokens, width]."""
    nearest = nearest_embedding(hidden, embedding)
    truth = tokens.reshape(-1).long()
    predicted, scored = learned_inversion(hidden, tokens, embedding.shape[0], seed=seed)
    chance = float(torch.bincount(scored).max()) / max(1, len(scored))
    return {"positions": int(truth.numel()),
            "nearest_embedding_recovered": round(float((nearest == truth).float().mean()), 4),
            "learned_inversion_recovered": round(float((predicted == scored).float().mean()), 4),
            "learned_inversion_positions": int(scored.numel()), "commonest_token_share": round(chance, 4)}
