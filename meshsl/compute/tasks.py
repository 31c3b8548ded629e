"""Loss heads and their metrics."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def causal_lm_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over a micro-batch of packed sequences: position t predicts token t+1.
    The same operations, in the same order, as transformers' ForCausalLMLoss (so results are bit-identical)."""
    shifted = F.pad(tokens.long(), (0, 1), value=-100)[..., 1:].contiguous()
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), shifted.view(-1), ignore_index=-100)


def task_loss(kind: str, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean loss over the micro-batch."""
    if kind == "causal_lm":
        return causal_lm_loss(output, labels)
    if kind == "cross_entropy":
        return F.cross_entropy(output, labels.long())
    if kind == "bce_with_logits":
        return F.binary_cross_entropy_with_logits(output.reshape(-1), labels.reshape(-1).float())
    return F.mse_loss(output.reshape(labels.shape[0], -1), labels.reshape(labels.shape[0], -1).float())


def predictions(kind: str, output: torch.Tensor) -> torch.Tensor:
    if kind == "causal_lm":  # the next token at every position but the last
        return output[:, :-1].argmax(dim=-1)
    if kind == "cross_entropy":
        return output.argmax(dim=1)
    if kind == "bce_with_logits":
        return (output.reshape(-1) > 0).long()
    return output


def scores(kind: str, output: torch.Tensor) -> np.ndarray:
    """Per-sample scores for AUROC: P(class 1) for binary problems."""
    if kind == "cross_entropy":
        probs = output.softmax(dim=1)
        return probs[:, 1].numpy() if probs.shape[1] == 2 else probs.numpy()
    return torch.sigmoid(output.reshape(-1)).numpy()


def correct_count(kind: str, output: torch.Tensor, labels: torch.Tensor) -> int:
    if kind == "mse":
        return 0
    if kind == "causal_lm":  # next tokens predicted right (accuracy: of tokens, not sequences)
        return int((predictions(kind, output) == labels[:, 1:].long()).sum())
    return int((predictions(kind, output) == labels.reshape(-1).long()).sum())


def record_step(stats: dict, kind: str, mean_loss: torch.Tensor, output: torch.Tensor, labels: torch.Tensor,
                n: int) -> None:
    """Add a training micro-batch of `n` samples to a task's running loss and accuracy (a language model's
    units are its next tokens, not its sequences)."""
    units = labels[:, 1:].numel() if kind == "causal_lm" else n
    stats["loss_sum"] += float(mean_loss.detach()) * units
    stats["correct"] += correct_count(kind, output.detach(), labels)
    stats["count"] += units


def summarise(kind: str, metrics: list[str], outputs: list[torch.Tensor], labels: list[torch.Tensor]) -> dict:
    """Held-out metrics of a task from all of its evaluation outputs (computed on the label holder)."""
    from sklearn.metrics import confusion_matrix, f1_score, roc_auc_score  # pulls scipy: seconds, paid at evaluation only

    out = torch.cat(outputs) if outputs else torch.empty(0)
    y = torch.cat(labels) if labels else torch.empty(0)
    result: dict = {"samples": int(y.shape[0]), "loss": float(task_loss(kind, out, y)) if len(y) else float("nan")}
    if kind == "causal_lm":
        return language_model_metrics(metrics, out, y, result)
    if kind == "mse" or not len(y):
        return result
    pred = predictions(kind, out).numpy()
    truth = y.reshape(-1).long().numpy()
    if "accuracy" in metrics:
        result["accuracy"] = float((pred == truth).mean())
    if "f1" in metrics:
        binary = len(np.unique(truth)) <= 2 and pred.max(initial=0) <= 1
        result["f1"] = float(f1_score(truth, pred, average="binary" if binary else "macro", zero_division=0))
    if "auroc" in metrics:
        try:
            s = scores(kind, out)
            result["auroc"] = float(roc_auc_score(truth, s, multi_class="ovr") if s.ndim == 2 else roc_auc_score(truth, s))
        except ValueError:
            result["auroc"] = float("nan")  # one class only in the held-out set
    result["confusion_matrix"] = confusion_matrix(truth, pred).tolist()
    return result


def language_model_metrics(metrics: list[str], logits: torch.Tensor, tokens: torch.Tensor, result: dict) -> dict:
    """Held-out next-token metrics: perplexity exp(mean loss per token), accuracy of the next token."""
    result["tokens"] = int(tokens[:, 1:].numel())
    if "perplexity" in metrics:
        result["perplexity"] = float(np.exp(result["loss"]))
    if "accuracy" in metrics and len(tokens):
        result["accuracy"] = correct_count("causal_lm", logits, tokens) / max(1, result["tokens"])
    return result
