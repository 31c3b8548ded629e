"""Defences against label leakage through the gradients a label holder sends back across a cut.

Applied by the gradient's sender (the consumer of a cut edge) to the per-sample gradient rows of
one micro-batch, before the backward codec. Three kinds, declared per cut segment in the YAML
(`privacy[].gradient`):

* max_norm (Li et al., ICLR 2022, heuristic): Gaussian noise per row so that every row's expected
  squared norm equals the largest one in the batch, which removes the norm signal.
* marvell (Li et al., ICLR 2022): class-dependent Gaussian noise, with the covariance chosen to
  minimise the symmetrised KL divergence between the two classes' noisy gradient distributions
  (a bound on any attacker's AUC) under a noise power budget of `strength * ||mean_1 - mean_0||^2`.
  As in the paper, covariances are restricted to "along the class-mean difference" plus
  "isotropic in the rest", which leaves four scalars to optimise. Binary labels only; the sender
  must hold them.
* dp: per-sample clipping to `clip_norm`, then Gaussian noise of std `noise_multiplier * clip_norm`
  (the Gaussian mechanism on the gradient rows; its epsilon is accounted like activation DP).

Rows are handled in "per-sample loss" units: the runtime's gradient rows are scaled by
1 / (batch size x lanes) (the loss is a mean over the step), so the caller passes `scale` and
clip norms mean the same thing whatever the batch size.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from meshsl.config.specs import GradientDefenceSpec  # re-exported
from meshsl.errors import ConfigError
from meshsl.privacy.dp import ActivationDPSpec, clip_and_noise


def _flat(grads: Tensor) -> Tensor:
    if grads.dim() == 0:
        raise ConfigError("gradient defences need a sample dimension, got a scalar")
    return grads.reshape(grads.shape[0], -1)


def _normal(shape, generator: torch.Generator, like: Tensor) -> Tensor:
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device=like.device, dtype=like.dtype)


# The floor's default per defence (`privacy[].gradient.floor`), set from the per-phase trajectory audit of
# breast cancer (docs/privacy.md): without it max_norm leaks the labels' direction in the first steps.
DEFAULT_FLOOR = {"max_norm": 32.0, "marvell": 16.0}


def floor_of(spec: GradientDefenceSpec) -> float:
    return spec.floor if spec.floor is not None else DEFAULT_FLOOR.get(spec.defence, 0.0)


def isotropic_floor(flat: Tensor, floor: float, generator: torch.Generator) -> Tensor:
    """Isotropic noise of expected power `floor` x the largest squared row norm on every row."""
    if floor <= 0.0:
        return flat
    power = (flat.float() ** 2).sum(dim=1).max()
    std = (floor * power / flat.shape[1]).sqrt().to(flat.dtype)
    return flat + _normal(flat.shape, generator, flat) * std


def max_norm_noise(grads: Tensor, generator: torch.Generator, floor: float = 0.0) -> Tensor:
    """Row j gets N(0, s_j^2 I) with d * s_j^2 = (1 + floor) max_i ||g_i||^2 - ||g_j||^2 (equal expected
    norms; with a floor, noise on every row even where the norms are alike, as at initialisation)."""
    flat = _flat(grads)
    squared = (flat.float() ** 2).sum(dim=1)
    std = (((1.0 + floor) * squared.max() - squared).clamp_min(0.0) / flat.shape[1]).sqrt()
    noise = _normal(flat.shape, generator, flat) * std.to(flat.dtype)[:, None]
    return (flat + noise).reshape(grads.shape)


def _sym_kl(params: np.ndarray, u: tuple, v: tuple, gap2: float, d: int) -> float:
    """Symmetrised KL between N(m1, S1) and N(m0, S0), both with eigenbasis (difference direction, rest)."""
    l1u, l1v, l0u, l0v = params
    a1, a0 = u[1] + l1u, u[0] + l0u  # variance along the mean difference, class 1 and 0
    b1, b0 = v[1] + l1v, v[0] + l0v  # variance of each other direction
    return 0.5 * ((a1 / a0 + a0 / a1 - 2.0) + (d - 1) * (b1 / b0 + b0 / b1 - 2.0) + gap2 * (1.0 / a0 + 1.0 / a1))


def marvell_covariances(flat: np.ndarray, labels: np.ndarray, strength: float) -> Optional[dict]:
    """The four noise variances (class 1/0 x along/orthogonal to the mean difference) minimising the
    symmetrised KL under p * tr(S1) + (1 - p) * tr(S0) <= strength * ||m1 - m0||^2."""
    from scipy.optimize import minimize  # scipy: heavy, only for the Marvell defence
    ones, zeros = flat[labels == 1], flat[labels == 0]
    if len(ones) < 2 or len(zeros) < 2:
        return None
    d = flat.shape[1]
    diff = ones.mean(axis=0) - zeros.mean(axis=0)
    gap2 = float(diff @ diff)
    if gap2 <= 1e-30:
        return None
    direction = diff / math.sqrt(gap2)
    eps = 1e-12 * (gap2 + 1e-30)

    def spread(rows):  # variance along the direction, mean variance of the other d - 1 directions
        centred = rows - rows.mean(axis=0)
        along = float(np.mean((centred @ direction) ** 2))
        total = float(np.mean((centred ** 2).sum(axis=1)))
        return along + eps, max(total - along, 0.0) / max(d - 1, 1) + eps

    (u1, v1), (u0, v0) = spread(ones), spread(zeros)
    p = len(ones) / len(flat)
    power = strength * gap2
    budget = {"type": "ineq", "fun": lambda x: power - p * (x[0] + (d - 1) * x[1]) - (1 - p) * (x[2] + (d - 1) * x[3])}
    start = np.array([power / 2, 0.0, power / 2, 0.0])
    result = minimize(_sym_kl, start, args=((u0, u1), (v0, v1), gap2, d), method="SLSQP",
                      bounds=[(0.0, power)] * 4, constraints=[budget], options={"maxiter": 200})
    l1u, l1v, l0u, l0v = (max(float(x), 0.0) for x in result.x)
    return {"direction": direction, "class1": (l1u, l1v), "class0": (l0u, l0v)}


def marvell_noise(grads: Tensor, labels: Tensor, strength: float, generator: torch.Generator,
                  floor: float = 0.0) -> Tensor:
    """Class-dependent Gaussian noise with Marvell's optimised covariances (binary labels 0/1)."""
    flat = _flat(grads)
    y = labels.detach().reshape(-1).cpu().numpy()
    y = (y > 0.5).astype(np.int64) if y.dtype.kind == "f" else y.astype(np.int64)
    if y.max(initial=0) > 1:
        raise ConfigError("the marvell defence needs binary labels (0/1)")
    found = marvell_covariances(flat.detach().double().cpu().numpy(), y, strength)
    if found is None:  # one class missing from the micro-batch: fall back to equalising norms
        return max_norm_noise(grads, generator, floor)
    direction = torch.as_tensor(found["direction"], dtype=torch.float32)
    along_var = torch.tensor([found["class0"][0], found["class1"][0]], dtype=torch.float32)[torch.as_tensor(y)]
    other_var = torch.tensor([found["class0"][1], found["class1"][1]], dtype=torch.float32)[torch.as_tensor(y)]
    n, d = flat.shape
    isotropic = torch.randn((n, d), generator=generator) * other_var.sqrt()[:, None]
    # Replace the isotropic part along the direction by the chosen variance there.
    isotropic -= (isotropic @ direction)[:, None] * direction[None, :]
    along = torch.randn((n,), generator=generator) * along_var.sqrt()
    noise = isotropic + along[:, None] * direction[None, :]
    return isotropic_floor(flat + noise.to(device=flat.device, dtype=flat.dtype), floor, generator).reshape(grads.shape)


def defend(grads: Tensor, spec: GradientDefenceSpec, generator: torch.Generator, *,
           labels: Optional[Tensor] = None, scale: float = 1.0, noise_multiplier: Optional[float] = None) -> Tensor:
    """Apply one defence to a micro-batch's gradient rows. `scale` turns rows into per-sample-loss units
    (and back); `noise_multiplier` is the calibrated value for a dp defence declared by target epsilon."""
    rows = grads.detach() * scale
    if spec.defence == "max_norm":
        out = max_norm_noise(rows, generator, floor_of(spec))
    elif spec.defence == "marvell":
        if labels is None:
            raise ConfigError("the marvell defence needs the labels of the micro-batch")
        out = marvell_noise(rows, labels, spec.strength, generator, floor_of(spec))
    else:
        sigma = noise_multiplier if noise_multiplier is not None else spec.noise_multiplier
        if sigma is None:
            raise ConfigError("gradient DP: noise_multiplier was not calibrated")
        out = clip_and_noise(rows, ActivationDPSpec(clip_norm=spec.clip_norm, noise_multiplier=sigma), generator)
    return out / scale
