"""Privacy building blocks: distance correlation, NoPeek, DP mechanisms and the inversion probe."""
from __future__ import annotations

import math
import time

import pytest
import torch
from pydantic import ValidationError

from meshsl.errors import ConfigError, DataError
from meshsl.privacy import (
    ActivationDPSpec,
    LabelDPSpec,
    NoPeekSpec,
    clip_and_noise,
    distance_correlation,
    distance_correlation_np,
    dp_generator,
    inversion_probe,
    keep_probability,
    leakage_report,
    noise_std,
    nopeek_loss,
    randomized_response,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- distance correlation -------------------------------------------------------------------

def test_dcor_of_independent_samples_is_small():
    g = _gen(1)
    x, z = torch.randn(500, 3, generator=g), torch.randn(500, 3, generator=g)
    assert float(distance_correlation(x, z)) < 0.2


def test_dcor_of_similarity_transform_is_one():
    g = _gen(2)
    x = torch.randn(300, 6, generator=g, dtype=torch.float64)
    rotation, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    assert float(distance_correlation(x, 3.0 * x @ rotation + 5.0)) == pytest.approx(1.0, abs=1e-6)
    line = torch.randn(200, 1, generator=g)
    assert float(distance_correlation(line, -2.0 * line + 1.0)) == pytest.approx(1.0, abs=1e-4)


def test_dcor_invariant_to_scaling_and_flattens_samples():
    g = _gen(3)
    x, z = torch.randn(100, 2, 4, generator=g), torch.randn(100, 8, generator=g)
    z = z + x.reshape(100, 8)  # dependent, so the value is not trivially ~0
    base = float(distance_correlation(x, z))
    assert 0.0 < base < 1.0
    assert float(distance_correlation(10 * x, 0.01 * z)) == pytest.approx(base, rel=1e-4)
    assert distance_correlation_np(x.numpy(), z.numpy()) == pytest.approx(base, rel=1e-4)


def test_dcor_gradient_is_finite_even_with_duplicates_and_constants():
    x = torch.tensor([[1.0, 2.0], [1.0, 2.0], [0.0, 1.0]], requires_grad=True)
    z = torch.tensor([[3.0], [3.0], [1.0]], requires_grad=True)
    distance_correlation(x, z).backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(z.grad).all()
    constant = torch.ones(4, 3, requires_grad=True)
    value = distance_correlation(torch.randn(4, 2), constant)
    value.backward()
    assert float(value.detach()) == 0.0 and torch.isfinite(constant.grad).all()


def test_dcor_rejects_bad_sample_counts():
    with pytest.raises(ConfigError):
        distance_correlation(torch.randn(1, 3), torch.randn(1, 3))
    with pytest.raises(ConfigError):
        distance_correlation(torch.randn(4, 3), torch.randn(5, 3))


# --- NoPeek ----------------------------------------------------------------------------------

def _train_encoder(nopeek_weight: float, steps: int = 60) -> float:
    g = _gen(4)
    raw = torch.randn(256, 10, generator=g)
    target = raw[:, :1] + 0.5 * raw[:, 1:2]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        encoder, head = torch.nn.Linear(10, 8), torch.nn.Linear(8, 1)
    params = list(encoder.parameters()) + list(head.parameters())
    for _ in range(steps):  # plain SGD by hand: torch.optim's first use costs seconds of imports
        activation = torch.tanh(encoder(raw))
        loss = torch.mean((head(activation) - target) ** 2) + nopeek_loss(raw, activation, nopeek_weight)
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for param, grad in zip(params, grads):
                param -= 0.1 * grad
    with torch.no_grad():
        return float(distance_correlation(raw, torch.tanh(encoder(raw))))


def test_nopeek_training_lowers_distance_correlation():
    without, with_nopeek = _train_encoder(0.0), _train_encoder(2.0)
    assert with_nopeek < without - 0.1


def test_nopeek_loss_scales_dcor_and_spec_validates():
    g = _gen(5)
    raw, act = torch.randn(50, 4, generator=g), torch.randn(50, 3, generator=g)
    assert float(nopeek_loss(raw, act, 0.5)) == pytest.approx(0.5 * float(distance_correlation(raw, act)))
    assert float(nopeek_loss(raw, act, 0.0)) == 0.0
    with pytest.raises(ConfigError):
        nopeek_loss(raw, act, -1.0)
    assert NoPeekSpec(weight=0.1).weight == 0.1
    with pytest.raises(ValidationError):
        NoPeekSpec(weight=-0.1)
    with pytest.raises(ValidationError):
        NoPeekSpec(weight=0.1, extra=1)


# --- differential privacy --------------------------------------------------------------------

def test_clipping_bounds_per_sample_norms_and_passes_gradient():
    spec = ActivationDPSpec(clip_norm=1.5, noise_multiplier=0.0)
    act = (torch.randn(64, 4, 5, generator=_gen(6)) * torch.linspace(0.01, 3, 64)[:, None, None])
    act.requires_grad_(True)
    out = clip_and_noise(act, spec, _gen(0))
    norms = out.detach().reshape(64, -1).norm(dim=1)
    assert float(norms.max()) <= 1.5 + 1e-5
    small = act.detach().reshape(64, -1).norm(dim=1) <= 1.5
    assert torch.allclose(out.detach()[small], act.detach()[small])  # only clipping, no noise
    out.sum().backward()
    assert torch.isfinite(act.grad).all() and act.grad.abs().sum() > 0


def test_noise_std_matches_declaration():
    spec = ActivationDPSpec(clip_norm=2.0, noise_multiplier=0.75, seed=3)
    assert noise_std(spec) == 1.5
    zeros = torch.zeros(200, 500)
    noisy = clip_and_noise(zeros, spec, dp_generator(spec))
    assert float(noisy.std()) == pytest.approx(1.5, rel=0.05)
    again = clip_and_noise(zeros, spec, dp_generator(spec))
    assert torch.equal(noisy, again)  # same seed, same noise


def test_dp_specs_validate():
    with pytest.raises(ValidationError):
        ActivationDPSpec(clip_norm=0.0, noise_multiplier=1.0)
    with pytest.raises(ValidationError):
        ActivationDPSpec(clip_norm=1.0, noise_multiplier=-1.0)
    with pytest.raises(ValidationError):
        ActivationDPSpec(clip_norm=1.0, noise_multiplier=1.0, sigma=2)
    with pytest.raises(ValidationError):
        LabelDPSpec(epsilon=0.0)
    assert LabelDPSpec(epsilon=1.0).epsilon == 1.0


@pytest.mark.parametrize("num_classes, epsilon", [(2, 1.0), (10, 2.0), (10, 0.1)])
def test_randomized_response_flip_rate_matches_theory(num_classes, epsilon):
    labels = torch.randint(0, num_classes, (100_000,), generator=_gen(7))
    noisy = randomized_response(labels, num_classes, epsilon, _gen(8))
    flipped = noisy != labels
    expected = 1.0 - math.exp(epsilon) / (math.exp(epsilon) + num_classes - 1)
    assert keep_probability(num_classes, epsilon) == pytest.approx(1.0 - expected)
    assert float(flipped.float().mean()) == pytest.approx(expected, abs=0.01)
    assert int(noisy.min()) >= 0 and int(noisy.max()) < num_classes
    if num_classes > 2:  # flips land uniformly on the other classes
        offsets = (noisy[flipped] - labels[flipped]) % num_classes
        counts = torch.bincount(offsets, minlength=num_classes).float()
        assert counts[0] == 0
        assert float(counts[1:].std() / counts[1:].mean()) < 0.1


def test_randomized_response_rejects_bad_labels():
    with pytest.raises(DataError):
        randomized_response(torch.tensor([0, 5]), 3, 1.0, _gen())
    with pytest.raises(ConfigError):
        randomized_response(torch.tensor([0, 1]), 3, 0.0, _gen())


# --- inversion probe ------------------------------------------------------------------------

def test_inversion_probe_finds_identity_like_leakage_quickly():
    g = _gen(9)
    inputs = torch.randn(500, 64, generator=g)
    rotation, _ = torch.linalg.qr(torch.randn(64, 64, generator=g))
    activations = 0.1 * inputs @ rotation + 0.01 * torch.randn(500, 64, generator=g)
    # CPU time, not wall time: the budget is about the work, not about a busy shared test machine.
    started = time.process_time()
    result = inversion_probe(activations, inputs)
    assert time.process_time() - started < 2.0
    assert result["relative_error"] < 0.2
    assert result["relative_error"] == pytest.approx(result["mse"] / result["baseline_mse"])


def test_inversion_probe_learns_nothing_from_noise():
    g = _gen(10)
    inputs, noise = torch.randn(500, 64, generator=g), torch.randn(500, 32, generator=g)
    result = inversion_probe(noise, inputs, epochs=100)
    assert 0.9 < result["relative_error"] < 1.2


def test_inversion_probe_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    inversion_probe(torch.randn(40, 4, generator=_gen()), torch.randn(40, 4, generator=_gen(1)), epochs=5)
    assert torch.equal(torch.rand(3), expected)


def test_leakage_report_combines_dcor_and_inversion():
    g = _gen(11)
    inputs = torch.randn(300, 16, generator=g)
    report = leakage_report(inputs, torch.tanh(inputs[:, :8]), epochs=50)
    assert set(report) == {"n_samples", "dcor", "inversion_mse", "inversion_baseline_mse",
                           "inversion_relative_error"}
    assert report["n_samples"] == 300 and 0.5 < report["dcor"] <= 1.0
    assert report["inversion_relative_error"] < 1.0
