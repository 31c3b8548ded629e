"""Privacy building blocks, all pure and I/O-free: distance correlation, NoPeek, DP mechanisms, a
model-inversion probe, label-inference attacks and defences on the gradients, the privacy accountant
(meshsl.schedule.accounting, Opacus) and a training-hijacking probe."""
from meshsl.privacy.dcor import distance_correlation, distance_correlation_np
from meshsl.privacy.dp import (
    ActivationDPSpec,
    LabelDPSpec,
    clip_and_noise,
    clip_per_sample,
    dp_generator,
    keep_probability,
    noise_std,
    randomized_response,
)
from meshsl.privacy.hijack import HijackCheckSpec, SplitGuard
from meshsl.privacy.inversion import inversion_probe, leakage_report
from meshsl.privacy.label_attacks import cluster_attack, cosine_attack_auc, label_leakage_report, norm_attack_auc
from meshsl.privacy.label_defences import GradientDefenceSpec, defend
from meshsl.privacy.nopeek import NoPeekSpec, nopeek_loss

__all__ = [
    "ActivationDPSpec",
    "GradientDefenceSpec",
    "HijackCheckSpec",
    "SplitGuard",
    "cluster_attack",
    "cosine_attack_auc",
    "defend",
    "label_leakage_report",
    "norm_attack_auc",
    "LabelDPSpec",
    "NoPeekSpec",
    "clip_and_noise",
    "clip_per_sample",
    "distance_correlation",
    "distance_correlation_np",
    "dp_generator",
    "inversion_probe",
    "keep_probability",
    "leakage_report",
    "noise_std",
    "nopeek_loss",
    "randomized_response",
]
