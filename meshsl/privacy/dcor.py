"""Sample distance correlation (Székely, Rizzo & Bakirov 2007), differentiable for use as a loss.

dCor is 0 iff the two samples are independent (in the population limit) and 1 when one is a
similarity transform of the other, which is why NoPeek minimises it between raw inputs and
cut-layer activations.
"""
from __future__ import annotations

import torch
from torch import Tensor

from meshsl.errors import ConfigError

# Below this the variance of a sample is treated as zero (a constant sample has dCor 0 with anything).
_TINY = 1e-12


def _safe_sqrt(value: Tensor) -> Tensor:
    """sqrt with a finite (zero) gradient at 0: the plain sqrt has an infinite derivative there."""
    positive = value > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, value, torch.ones_like(value))),
                       torch.zeros_like(value))


def _centred_distances(sample: Tensor) -> Tensor:
    """Double-centred matrix of pairwise Euclidean distances between the rows of `sample`."""
    squared_norms = (sample * sample).sum(dim=1)
    # Gram form needs O(n^2) memory instead of the O(n^2 d) of explicit differences.
    squared = squared_norms[:, None] + squared_norms[None, :] - 2.0 * (sample @ sample.T)
    off_diagonal = ~torch.eye(sample.shape[0], dtype=torch.bool, device=sample.device)
    # Cancellation can leave tiny negatives, and the diagonal is exactly zero by definition.
    squared = torch.where(off_diagonal, squared.clamp_min(0.0), torch.zeros_like(squared))
    distances = _safe_sqrt(squared)
    return (distances - distances.mean(dim=0, keepdim=True) - distances.mean(dim=1, keepdim=True)
            + distances.mean())


def _as_samples(tensor: Tensor, name: str) -> Tensor:
    if not isinstance(tensor, Tensor):
        raise ConfigError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() == 0:
        raise ConfigError(f"{name} must have a sample dimension, got a scalar")
    flat = tensor.reshape(tensor.shape[0], -1)
    # Half precision loses too much in the Gram form; float64 inputs keep their precision.
    return flat if flat.dtype == torch.float64 else flat.float()


def distance_correlation(x: Tensor, z: Tensor) -> Tensor:
    """Sample distance correlation between x [n, ...] and z [n, ...], each flattened per sample.

    Returns a scalar tensor in [0, 1] that is differentiable with respect to both inputs.
    """
    x_flat, z_flat = _as_samples(x, "x"), _as_samples(z, "z")
    if x_flat.shape[0] != z_flat.shape[0]:
        raise ConfigError(f"x and z need the same number of samples, got {x_flat.shape[0]} and {z_flat.shape[0]}")
    if x_flat.shape[0] < 2:
        raise ConfigError(f"distance correlation needs at least 2 samples, got {x_flat.shape[0]}")
    if x_flat.dtype != z_flat.dtype:
        x_flat, z_flat = x_flat.double(), z_flat.double()

    a, b = _centred_distances(x_flat), _centred_distances(z_flat)
    covariance = (a * b).mean().clamp_min(0.0)
    variance_product = (a * a).mean() * (b * b).mean()
    degenerate = variance_product <= _TINY
    denominator = _safe_sqrt(torch.where(degenerate, torch.ones_like(variance_product), variance_product))
    squared = torch.where(degenerate, torch.zeros_like(covariance), covariance / denominator)
    return _safe_sqrt(squared.clamp(0.0, 1.0))


def distance_correlation_np(x, z) -> float:
    """distance_correlation for array-likes (NumPy, lists, tensors), returned as a plain float."""
    x_tensor = torch.as_tensor(x, dtype=torch.float64)
    z_tensor = torch.as_tensor(z, dtype=torch.float64)
    with torch.no_grad():
        return float(distance_correlation(x_tensor, z_tensor))
