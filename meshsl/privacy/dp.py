"""Differential-privacy building blocks: Gaussian mechanism on activations, randomized response
on labels. Pure functions; the caller owns the torch.Generator so noise is reproducible per node."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from meshsl.config.specs import ActivationDPSpec, LabelDPSpec  # noqa: F401  (LabelDPSpec re-exported)
from meshsl.errors import ConfigError, DataError


def noise_std(spec: ActivationDPSpec) -> float:
    """Standard deviation of the Gaussian noise added to every activation element."""
    if spec.noise_multiplier is None:
        raise ConfigError("the noise multiplier was not calibrated from target_epsilon "
                          "(use meshsl.schedule.accounting.activation_noise)")
    return spec.noise_multiplier * spec.clip_norm


def dp_generator(spec: ActivationDPSpec, stream: int = 0) -> torch.Generator:
    """A CPU generator seeded from the spec; `stream` separates nodes sharing one spec."""
    generator = torch.Generator()
    generator.manual_seed(spec.seed * 1_000_003 + stream)
    return generator


def clip_per_sample(activation: Tensor, clip_norm: float) -> Tensor:
    """Scale each sample (first dimension) down so its L2 norm is at most clip_norm."""
    if activation.dim() == 0:
        raise ConfigError("activation needs a sample dimension, got a scalar")
    flat = activation.reshape(activation.shape[0], -1)
    norms = torch.linalg.vector_norm(flat, dim=1, keepdim=True)
    # Samples already inside the ball keep factor 1; the gradient flows through the scaling.
    factor = torch.clamp(clip_norm / norms.clamp_min(1e-12), max=1.0)
    return (flat * factor).reshape(activation.shape)


def clip_and_noise(activation: Tensor, spec: ActivationDPSpec, generator: torch.Generator) -> Tensor:
    """Per-sample clipping then additive Gaussian noise; the noise is detached (gradient is identity)."""
    clipped = clip_per_sample(activation, spec.clip_norm)
    std = noise_std(spec)
    if std == 0.0:
        return clipped
    noise_dtype = activation.dtype if activation.dtype in (torch.float32, torch.float64) else torch.float32
    noise = torch.randn(activation.shape, generator=generator, dtype=noise_dtype,
                        device=generator.device).to(device=activation.device, dtype=activation.dtype)
    return clipped + noise.mul_(std)


def keep_probability(num_classes: int, epsilon: float) -> float:
    """P(report the true label) = e^eps / (e^eps + K - 1), written to avoid overflow for large eps."""
    return 1.0 / (1.0 + (num_classes - 1) * math.exp(-epsilon))


def randomized_response(labels: Tensor, num_classes: int, epsilon: float,
                        generator: torch.Generator) -> Tensor:
    """Keep each label with keep_probability, else replace it by a uniform choice among the others."""
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
    if not epsilon > 0.0 or math.isinf(epsilon):
        raise ConfigError(f"epsilon must be a finite number > 0, got {epsilon!r}")
    if labels.dtype != torch.long:
        raise DataError(f"labels must be an int64 tensor, got {labels.dtype}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise DataError(f"labels must lie in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]")
    if num_classes == 1 or labels.numel() == 0:
        return labels.clone()
    device = generator.device
    keep = torch.rand(labels.shape, generator=generator, device=device) < keep_probability(num_classes, epsilon)
    # Draw from K-1 classes and shift past the true label: uniform over the other classes.
    other = torch.randint(0, num_classes - 1, labels.shape, generator=generator, device=device)
    labels_there = labels.to(device)
    other = other + (other >= labels_there).long()
    return torch.where(keep, labels_there, other).to(labels.device)
