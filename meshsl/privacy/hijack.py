"""Training-hijacking detection on the client side, in the spirit of SplitGuard (Erdogan, Küpçü and
Çiçek, WPES 2022).

A malicious server can stop training the task and instead send the client gradients that pull the
client's feature space towards one the server can invert (FSHA, Pasquini et al., CCS 2021). Such
gradients do not depend on the labels. SplitGuard's probe: now and then the client sends a *fake*
batch whose labels are drawn at random, and compares the gradients it gets back for fake batches
with those for regular batches. Under honest training, random labels produce gradients unlike the
regular ones (large, pointing elsewhere); under hijacking the server ignores the labels, and fake and
regular gradients are alike, as alike as two regular batches are to each other.

Score, from the client's gradient vectors (its parameters' gradients per batch):

    distance term  (d(F, R) - d(R, R)) / (d(F, R) + d(R, R))     d = mean L2 distance between batch gradients
    angle term     (a(F, R) - a(R, R)) / pi                      a = mean angle between batch gradients
    score          mean of the two, in [-1, 1]; about 0 when labels do not matter (hijacked)

F is one probe's gradient, R the `window` regular batches around it (half before, half after); the
run's score is the mean over probes.

The client flags hijacking when the score stays below `threshold` once `min_fake` probes are in.
Fake batches are not used for the client's own update (their gradients are discarded).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from meshsl.config.specs import HijackCheckSpec  # re-exported


@dataclass
class SplitGuard:
    probe_probability: float = 0.2  # share of batches (after warm-up) that are fake probes
    warmup: int = 10  # regular batches before the first probe (the very first gradients say little)
    threshold: float = 0.1
    min_fake: int = 5
    window: int = 10  # regular batches just before a probe that it is compared with
    seed: int = 0
    fake: list = field(default_factory=list)  # score of each probe
    regular: list = field(default_factory=list)  # the last `window` regular gradient vectors
    batches: int = 0

    def __post_init__(self) -> None:
        self._generator = torch.Generator().manual_seed(self.seed)
        self._pending: list[tuple[Tensor, list, list]] = []  # probes waiting for the batches after them

    def next_is_fake(self) -> bool:
        """Decide (secretly, at random) whether the next batch is a probe."""
        self.batches += 1
        if self.batches <= self.warmup:
            return False
        return bool(torch.rand((), generator=self._generator) < self.probe_probability)

    def fake_labels(self, labels: Tensor, num_classes: int) -> Tensor:
        """Labels drawn uniformly at random: the probe the server cannot tell from a regular batch."""
        return torch.randint(0, num_classes, labels.shape, generator=self._generator).to(labels.device, labels.dtype)

    def observe(self, gradient: Tensor, fake: bool) -> None:
        """Record the client's gradient vector for one batch (flattened parameter gradients). A probe is
        scored against the regular batches around it (half before, half after): gradients drift as
        training goes on, so a probe compared only with earlier batches would look different anyway."""
        vector = gradient.detach().reshape(-1).double().cpu()
        half = self.window // 2
        if fake:
            if len(self.regular) >= half:
                self._pending.append((vector, list(self.regular[-half:]), []))
            return
        self.regular.append(vector)
        del self.regular[:-self.window]
        still = []
        for probe, before, after in self._pending:
            after.append(vector)
            if len(after) < half:
                still.append((probe, before, after))
                continue
            around = before + after
            d_fr, a_fr = self._pairwise([probe], around, same=False)
            d_rr, a_rr = self._pairwise(around, around, same=True)
            distance = (d_fr - d_rr) / (d_fr + d_rr) if d_fr + d_rr > 0 else 0.0
            self.fake.append(0.5 * (distance + (a_fr - a_rr) / math.pi))
        self._pending = still

    @staticmethod
    def _pairwise(a: list[Tensor], b: list[Tensor], same: bool) -> tuple[float, float]:
        distances, angles = [], []
        for i, x in enumerate(a):
            for j, y in enumerate(b):
                if same and j <= i:
                    continue
                distances.append(float(torch.linalg.vector_norm(x - y)))
                cosine = float(x @ y / (torch.linalg.vector_norm(x) * torch.linalg.vector_norm(y)).clamp_min(1e-30))
                angles.append(math.acos(max(-1.0, min(1.0, cosine))))
        return sum(distances) / len(distances), sum(angles) / len(angles)

    def score(self) -> float | None:
        """Mean of the per-probe scores; None before the first probe."""
        return sum(self.fake) / len(self.fake) if self.fake else None

    def verdict(self) -> dict:
        """{"score", "fake_batches", "regular_batches", "decided", "hijacked"}."""
        score = self.score()
        decided = score is not None and len(self.fake) >= self.min_fake
        return {"score": score, "fake_batches": len(self.fake), "regular_batches": len(self.regular),
                "decided": decided, "hijacked": decided and score is not None and score < self.threshold}


def guard_of(spec: HijackCheckSpec, stream: int = 0) -> SplitGuard:
    """The detector a `privacy[].hijack_check` block asks for; `stream` keeps nodes' probes independent."""
    return SplitGuard(probe_probability=spec.probe_probability, warmup=spec.warmup, threshold=spec.threshold,
                      min_fake=spec.min_probes, seed=spec.seed * 1_000_003 + stream)
