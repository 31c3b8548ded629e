"""Privacy building blocks, all pure and I/O-free: distance correlation, NoPeek, DP mechanisms and
a model-inversion probe that measures what a cut layer leaks."""
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
from meshsl.privacy.inversion import inversion_probe, leakage_report
from meshsl.privacy.nopeek import NoPeekSpec, nopeek_loss

__all__ = [
    "ActivationDPSpec",
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
