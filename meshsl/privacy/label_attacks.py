"""Label-inference attacks on the gradients a label holder sends back across a cut.

What a party without labels sees in backward is one gradient row per sample, dLoss/d(its activation).
Li et al., "Label Leakage and Protection in Two-party Split Learning" (ICLR 2022), show two attacks
that recover binary labels from those rows alone:

* norm attack: for a logistic head the gradient is (p - y) * J^T w, and on imbalanced data the
  rarer class is fitted worse, so its rows have larger norms. Score = ||g||.
* direction (cosine) attack: (p - y) has the sign of the label, so rows of one class point one
  way and the other class the other way. Knowing the label of one positive example, score =
  cos(g, g_ref).

For multi-class heads the rows cluster by class (Liu & Lyu, "Clustering Label Inference Attack
against Practical Split Learning", 2022): k-means on L2-normalised rows, clusters matched to
classes at best (Hungarian), accuracy against the majority-class share (chance).

All functions are pure and take the gradients and the true labels (the auditor's view);
the attacker's own view is the gradients only, plus, for the cosine attack, one known label.
"""
from __future__ import annotations

import numpy as np
from torch import Tensor

from meshsl.errors import ConfigError


def _rows(grads: Tensor) -> np.ndarray:
    if grads.dim() == 0 or grads.shape[0] < 2:
        raise ConfigError("label attacks need a gradient row per sample and at least 2 samples")
    return grads.detach().reshape(grads.shape[0], -1).double().cpu().numpy()


def _binary(labels: Tensor) -> np.ndarray:
    y = labels.detach().reshape(-1).cpu().numpy()
    if y.dtype.kind == "f":
        y = (y > 0.5).astype(np.int64)
    return y.astype(np.int64)


def _auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC (the Mann-Whitney U statistic, ties counted half); 0.5 when one class is missing.

    In numpy rather than sklearn.metrics: the label holder computes it on its first step, and importing
    sklearn.metrics there cost seconds of that step."""
    positive = np.asarray(positive).astype(bool)
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return 0.5
    _, inverse, counts = np.unique(np.asarray(scores, dtype=np.float64), return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based; tied scores share their mean rank
    rank_sum = float(average_rank[inverse.reshape(-1)][positive].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def norm_attack_auc(grads: Tensor, labels: Tensor) -> float:
    """AUC of the per-sample gradient norm as a score for the label (binary labels 0/1).

    Reported as max(AUC, 1 - AUC): the attacker knows the class prior, so it knows which side of the
    norm split is the rarer class. 0.5 is chance, 1.0 full recovery."""
    norms = np.linalg.norm(_rows(grads), axis=1)
    auc = _auc(norms, _binary(labels))
    return max(auc, 1.0 - auc)


def cosine_attack_auc(grads: Tensor, labels: Tensor, references: int = 10, seed: int = 0) -> float:
    """Direction attack: AUC of cos(g_i, g_ref) for a reference row whose label (1) the attacker knows,
    averaged over up to `references` randomly chosen positive references (the reference row excluded)."""
    rows = _rows(grads)
    y = _binary(labels)
    positives = np.flatnonzero(y == 1)
    if len(positives) == 0 or len(positives) == len(y):
        return 0.5
    unit = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-30)
    rng = np.random.default_rng(seed)
    chosen = rng.choice(positives, size=min(references, len(positives)), replace=False)
    aucs = []
    for ref in chosen:
        keep = np.arange(len(y)) != ref
        aucs.append(_auc((unit[keep] @ unit[ref]), y[keep]))
    return float(np.mean(aucs))


def cluster_attack(grads: Tensor, labels: Tensor, num_classes: int, seed: int = 0) -> dict:
    """k-means (k = classes) on L2-normalised gradient rows, clusters matched to classes by the
    Hungarian method; accuracy against chance (the share of the most frequent class)."""
    from scipy.optimize import linear_sum_assignment  # scipy/sklearn: heavy, only for this attack
    from sklearn.cluster import KMeans
    rows = _rows(grads)
    y = labels.detach().reshape(-1).cpu().numpy().astype(np.int64)
    k = max(2, int(num_classes))
    unit = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-30)
    clusters = KMeans(n_clusters=min(k, len(y)), n_init=4, random_state=seed).fit_predict(unit)
    counts = np.zeros((clusters.max() + 1, max(k, int(y.max()) + 1)))
    np.add.at(counts, (clusters, y), 1)
    matched_rows, matched_cols = linear_sum_assignment(-counts)
    accuracy = float(counts[matched_rows, matched_cols].sum() / len(y))
    chance = float(np.bincount(y).max() / len(y))
    return {"accuracy": accuracy, "chance": chance}


def label_leakage_report(grads: Tensor, labels: Tensor, num_classes: int, seed: int = 0) -> dict:
    """All attacks that apply: norm and cosine AUC for binary labels, clustering for any number of classes."""
    report: dict = {"n_samples": int(grads.shape[0]), "classes": int(num_classes)}
    if num_classes <= 2:
        report["norm_auc"] = norm_attack_auc(grads, labels)
        report["cosine_auc"] = cosine_attack_auc(grads, labels, seed=seed)
    cluster = cluster_attack(grads, labels, num_classes, seed=seed)
    report["cluster_accuracy"] = cluster["accuracy"]
    report["chance_accuracy"] = cluster["chance"]
    return report
