"""Label-inference attacks on one training step's gradient rows, as the party that received them sees them.

Li et al. (ICLR 2022) attack the rows of one batch at a time; the model changes every step, so the rows of
different steps are not compared. Per step (binary labels, positives = the minority class):

Realistic attacker (what the receiving party knows: its rows and the class prior, nothing else):

* direction: the rows' unit vectors, centred, projected on their leading principal direction; (p - y) has
  the sign of the label, so the rows split in two along it. Which side is positive is chosen without
  labels: the side whose count is nearer the prior's share of the step's rows (positives are the minority;
  a tie goes to the orientation whose largest component is positive).
* norm: score +-||g||; the side is the one agreeing with the direction split above (the AUC of the norm
  against the predicted labels is >= 0.5). The paper's fixed side (larger norm = positive) is kept apart as
  `norm_raw`: it is wrong where the positives are fitted best (0.24 undefended on breast cancer).

Upper-bound attacker (labels used to help the attack; not a realistic figure):

* norm: ||g|| with the side chosen with the labels (per phase, `phase_figures`);
* direction: the paper's cosine attack with labelled positive references in every step (each positive of the
  step in turn, itself excluded), averaged; side chosen with the labels per phase.
* Either upper bound is at least the realistic figure and its mirror (max over all of them).

Phase figures average the per-step AUCs of the phase's steps (an AUC per step, not a pooled one).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from meshsl.privacy.label_attacks import _auc


@dataclass(frozen=True)
class StepAttack:
    step: int
    epoch: int
    rows: int
    norm: float  # realistic: side from the direction split
    norm_raw: float  # the paper's side: larger norm = positive
    direction: float  # realistic: principal direction, side from the prior
    cosine_reference: float  # labelled positive references of this step (upper-bound attacker)


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-30)


def direction_scores(rows: np.ndarray, prior: float) -> np.ndarray:
    """Projection of the centred unit rows on their leading principal direction, oriented by the prior."""
    centred = _unit(rows) - _unit(rows).mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    axis = vt[0] * (1.0 if vt[0][np.argmax(np.abs(vt[0]))] >= 0 else -1.0)
    score = centred @ axis
    expected = prior * len(rows)
    above = int((score > 0).sum())
    if abs((len(rows) - above) - expected) < abs(above - expected):
        score = -score
    return score


def cosine_reference_auc(rows: np.ndarray, positive: np.ndarray) -> float:
    """Li et al.'s cosine attack with each positive of the step as the known reference in turn (itself
    excluded), averaged; 0.5 when the step lacks a class or has a single positive."""
    refs = np.flatnonzero(positive)
    if len(refs) < 2 or len(refs) == len(positive):
        return 0.5
    unit = _unit(rows)
    aucs = []
    for ref in refs:
        keep = np.arange(len(positive)) != ref
        aucs.append(_auc(unit[keep] @ unit[ref], positive[keep]))
    return float(np.mean(aucs))


def attack_step(rows: np.ndarray, positive: np.ndarray, prior: float, step: int = 0, epoch: int = 0) -> StepAttack:
    """All per-step attacks on one step's rows; `positive` (the truth) is used for scoring only, and by the
    upper-bound attacker's labelled references."""
    rows = np.asarray(rows, dtype=np.float64).reshape(len(rows), -1)
    positive = np.asarray(positive, dtype=bool)
    norms = np.linalg.norm(rows, axis=1)
    direction = direction_scores(rows, prior)
    predicted = direction > 0
    side = 1.0 if _auc(norms, predicted) >= 0.5 else -1.0
    return StepAttack(step=step, epoch=epoch, rows=len(rows), norm=_auc(side * norms, positive),
                      norm_raw=_auc(norms, positive), direction=_auc(direction, positive),
                      cosine_reference=cosine_reference_auc(rows, positive))


def phase_figures(steps: list[StepAttack]) -> dict:
    """One phase: the realistic figures (mean per-step AUC, the attacker's sides) and the upper bounds
    (mean per-step AUC with the side chosen with the labels; and the best single step, either side)."""
    if not steps:
        return {"steps": 0}

    def mean(name: str) -> float:
        return float(np.mean([getattr(s, name) for s in steps]))

    def best_step(name: str) -> float:
        return float(max(max(getattr(s, name), 1.0 - getattr(s, name)) for s in steps))

    norm, direction = mean("norm"), mean("direction")
    norm_raw, cosine = mean("norm_raw"), mean("cosine_reference")
    return {"steps": len(steps), "first_step": steps[0].step, "last_step": steps[-1].step,
            "rows": int(sum(s.rows for s in steps)),
            "realistic": {"norm_auc": norm, "direction_auc": direction, "norm_auc_paper_side": norm_raw},
            "upper_bound": {"norm_auc": max(norm_raw, 1.0 - norm_raw, norm, 1.0 - norm),
                            "direction_auc": max(cosine, 1.0 - cosine, direction, 1.0 - direction)},
            "best_single_step": {"norm_auc": best_step("norm_raw"), "direction_auc": best_step("cosine_reference")}}
