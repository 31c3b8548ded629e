"""Warnings about near-total leakage, for the console where a user looks (`meshsl plan`, the end of
`meshsl run`, `meshsl audit`, the Python API): each names the edge, the figure, the threshold and what to do.

Thresholds (module constants, documented in docs/privacy.md):

* dCor(raw input, activation) >= 0.95: the activation is close to a similarity transform of the inputs
  (one Linear layer before the cut measures 0.97-0.99; the shipped two-layer encoders 0.86-0.91);
* model-inversion relative error <= 0.1: a decoder rebuilds the inputs to within 10 % of their variance;
* a label-inference attack AUC >= 0.9 on the gradients sent back (0.5 is chance).
"""
from __future__ import annotations

DCOR_WARN = 0.95
INVERSION_WARN = 0.1
LABEL_AUC_WARN = 0.9

_INPUT_ADVICE = ("add trainable layers before the cut, or protect the edge (`privacy: [{segment: ..., nopeek: 0.5}]` "
                 "or `dp:`); measure the result with `meshsl audit`")
_LABEL_ADVICE = ("add a gradient defence on the edge (`privacy: [{segment: ..., gradient: {defence: max_norm}}]`, "
                 "`marvell` or `dp`) or label DP (`training.label_dp`)")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def dcor_warning(edge: str, dcor, when: str) -> list[str]:
    if not _number(dcor) or dcor < DCOR_WARN:
        return []
    return [f"edge {edge}: dCor {dcor:.5g} ({when}) >= {DCOR_WARN}: what crosses the cut is nearly the raw "
            f"input, anyone receiving it can reconstruct it; {_INPUT_ADVICE}"]


def inversion_warning(edge: str, error) -> list[str]:
    if not _number(error) or error > INVERSION_WARN:
        return []
    return [f"edge {edge}: model-inversion error {error:.3g} <= {INVERSION_WARN}: a decoder rebuilds the raw "
            f"inputs from the activations; {_INPUT_ADVICE}"]


def label_warning(edge: str, auc, attack: str) -> list[str]:
    if not _number(auc) or auc < LABEL_AUC_WARN:
        return []
    return [f"edge {edge}: {attack} AUC {auc:.3f} >= {LABEL_AUC_WARN}: the gradients sent back reveal the "
            f"labels; {_LABEL_ADVICE}"]


def run_warnings(summary: dict) -> list[str]:
    """From a run summary: the last sampled live dCor and label-attack AUC (realistic) per cut edge."""
    found: list[str] = []
    for edge, dcor in (summary.get("leakage") or {}).items():
        found += dcor_warning(edge, dcor, "live reading at the end of training")
    for edge, auc in (summary.get("label_leakage") or {}).items():
        found += label_warning(edge, auc, "label-attack")
    return found


def plan_warnings(candidates: list[dict]) -> list[str]:
    """From `privacy_cuts.cut_candidates` rows: the cut as declared (`current`), at initialisation and,
    when measured (`plan --cuts`), after a short training."""
    found: list[str] = []
    for c in candidates:
        if not c.get("current") or not c.get("crosses_to"):
            continue
        edge = f"{c['segment']}->{c['crosses_to']}"
        trained = c.get("trained_steps")
        dcor, when = (c["dcor"], f"after {trained} training steps") if trained else (c.get("dcor_init"), "untrained")
        found += dcor_warning(edge, dcor, when)
    return found


def audit_warnings(document: dict) -> list[str]:
    """From a `meshsl audit` document: dCor and inversion error per edge, label attacks per task."""
    found: list[str] = []
    for edge, e in (document.get("edges") or {}).items():
        found += dcor_warning(edge, e.get("dcor"), "audit, held-out rows")
        found += inversion_warning(edge, e.get("inversion_relative_error"))
    for edge, e in (document.get("label_edges") or {}).items():
        for result in (e.get("tasks") or {}).values():
            found += label_warning(edge, result.get("norm_auc"), "norm-attack")
            found += label_warning(edge, result.get("cosine_auc"), "cosine-attack")
    return found
