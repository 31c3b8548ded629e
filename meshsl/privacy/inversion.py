"""Model-inversion probe: how well can an attacker who sees cut-layer activations (and some paired
inputs) reconstruct the inputs? A relative error near 1 means no better than guessing the mean."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from meshsl.errors import ConfigError
from meshsl.privacy.dcor import distance_correlation


class _Decoder(nn.Module):
    """One-hidden-layer MLP plus a linear skip, so purely linear leakage is found quickly."""

    def __init__(self, in_features: int, out_features: int, hidden: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, out_features))
        self.skip = nn.Linear(in_features, out_features)
        # Zero output layers: before any training the decoder predicts the (standardised) mean,
        # so early stopping can fall back to exactly the baseline when nothing is learnable.
        for layer in (self.mlp[-1], self.skip):
            assert isinstance(layer, nn.Linear)  # built just above
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, activation: Tensor) -> Tensor:
        return self.mlp(activation) + self.skip(activation)


class _Adam:
    """Minimal full-batch Adam. torch.optim's first use imports torch._dynamo (~2 s), which alone
    would break the probe's time budget."""

    def __init__(self, params: list[Tensor], lr: float, betas=(0.9, 0.999), eps: float = 1e-8) -> None:
        self.params, self.lr, self.betas, self.eps, self.steps = params, lr, betas, eps, 0
        self.first = [torch.zeros_like(p) for p in params]
        self.second = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        beta1, beta2 = self.betas
        step_size = self.lr * (1 - beta2 ** self.steps) ** 0.5 / (1 - beta1 ** self.steps)
        for param, first, second in zip(self.params, self.first, self.second):
            if param.grad is None:
                continue
            first.mul_(beta1).add_(param.grad, alpha=1 - beta1)
            second.mul_(beta2).addcmul_(param.grad, param.grad, value=1 - beta2)
            param.addcdiv_(first, second.sqrt().add_(self.eps), value=-step_size)
            param.grad = None


def _scale(std: Tensor) -> Tensor:
    """Columns (nearly) constant in the attacker's fit set keep unit scale: dividing by a clamped tiny
    std would blow a held-out row's small deviation (a pixel that is 0 in every fit image) up to 1e6."""
    return torch.where(std > 1e-6, std, torch.ones_like(std))


def _standardise(train: Tensor, *others: Tensor) -> tuple[Tensor, ...]:
    mean, std = train.mean(dim=0), _scale(train.std(dim=0))
    return tuple((t - mean) / std for t in (train, *others))


def inversion_probe(activations: Tensor, inputs: Tensor, *, epochs: int = 200, hidden: int = 128,
                    seed: int = 0, holdout_fraction: float = 0.3) -> dict:
    """Train a decoder activation -> input on part of the pairs; report MSE on the held-out rest.

    Returns {"mse", "baseline_mse" (predicting the training mean), "relative_error": mse / baseline}.
    The global torch RNG is left untouched.
    """
    if activations.dim() == 0 or inputs.dim() == 0 or activations.shape[0] != inputs.shape[0]:
        raise ConfigError("activations and inputs need the same leading sample dimension")
    if not 0.0 < holdout_fraction < 1.0:
        raise ConfigError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
    if epochs < 0 or hidden < 1:
        raise ConfigError(f"epochs must be >= 0 and hidden >= 1, got {epochs} and {hidden}")
    n = activations.shape[0]
    n_test = int(round(n * holdout_fraction))
    if n_test < 1 or n - n_test < 2:
        raise ConfigError(f"{n} samples are too few to hold out {holdout_fraction:.0%}")

    features = activations.detach().reshape(n, -1).float().cpu()
    targets = inputs.detach().reshape(n, -1).float().cpu()
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator)
    test_idx, train_idx = order[:n_test], order[n_test:]

    # The attacker's own pairs are split again: a validation part picks the stopping epoch, so an
    # over-fitted decoder does not report worse-than-baseline error on unlearnable activations.
    n_val = max(1, (n - n_test) // 5)
    val_idx, fit_idx = train_idx[:n_val], train_idx[n_val:]
    x_fit, x_val, x_test = _standardise(features[fit_idx], features[val_idx], features[test_idx])
    y_fit_raw, y_test_raw = targets[fit_idx], targets[test_idx]
    y_mean, y_std = y_fit_raw.mean(dim=0), _scale(y_fit_raw.std(dim=0))
    y_fit, y_val = (y_fit_raw - y_mean) / y_std, (targets[val_idx] - y_mean) / y_std

    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(seed)
        decoder = _Decoder(x_fit.shape[1], y_fit.shape[1], hidden)
        optimiser = _Adam(list(decoder.parameters()), lr=1e-2)
        best_loss, best_state = float("inf"), {k: v.clone() for k, v in decoder.state_dict().items()}
        for _ in range(epochs + 1):  # full batch: a few hundred samples fit in one step
            with torch.no_grad():
                val_loss = float(torch.mean((decoder(x_val) - y_val) ** 2))
            if val_loss < best_loss:
                best_loss = val_loss
                best_state = {k: v.clone() for k, v in decoder.state_dict().items()}
            loss = torch.mean((decoder(x_fit) - y_fit) ** 2)
            loss.backward()
            optimiser.step()
        decoder.load_state_dict(best_state)
    with torch.no_grad():
        reconstruction = decoder(x_test) * y_std + y_mean
        mse = float(torch.mean((reconstruction - y_test_raw) ** 2))
        baseline = float(torch.mean((y_mean - y_test_raw) ** 2))
    relative = mse / baseline if baseline > 0 else (0.0 if mse == 0 else float("inf"))
    return {"mse": mse, "baseline_mse": baseline, "relative_error": relative}


def leakage_report(inputs: Tensor, activations: Tensor, *, max_dcor_samples: int = 1024,
                   seed: int = 0, **probe_options) -> dict:
    """dCor(inputs, activations) and the inversion probe's figures, as one flat dict of floats.

    dCor needs n x n matrices, so it is computed on at most max_dcor_samples (a seeded subset).
    """
    n = inputs.shape[0]
    subset = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_dcor_samples]
    with torch.no_grad():
        dcor = float(distance_correlation(inputs.detach()[subset].cpu(), activations.detach()[subset].cpu()))
    probe = inversion_probe(activations, inputs, seed=seed, **probe_options)
    return {
        "n_samples": n,
        "dcor": dcor,
        "inversion_mse": probe["mse"],
        "inversion_baseline_mse": probe["baseline_mse"],
        "inversion_relative_error": probe["relative_error"],
    }
