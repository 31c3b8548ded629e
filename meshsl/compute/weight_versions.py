"""Weight stashing under `training.staleness` k > 0 (latency hiding, docs/wan.md).

Step s runs on weight version W_{s-k}, the weights after the updates of steps 0 .. s-k-1. Versions are
detached copies, never updated in place, so a graph of a step still waiting for its backward is never
touched by the optimizer steps applied meanwhile.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch


def parameters_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


@dataclass
class StaleRound:
    """One training round in flight under `training.staleness`."""
    context: Any  # the worker's RoundContext (compute.worker: above this module)
    stats: dict
    params: dict[str, dict[str, torch.Tensor]]  # segment -> parameter name -> leaf on weight version W_{step-k}


class WeightVersions:
    """The stashed versions (version -> segment -> name -> tensor) and the rounds in flight on them."""

    def __init__(self, staleness: int) -> None:
        self.staleness = staleness
        self.versions: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
        self.rounds: dict[int, StaleRound] = {}

    def drop_rounds_before(self, oldest: int) -> None:
        for round_ in [r for r in self.rounds if r < oldest]:
            del self.rounds[round_]

    def begin(self, context, stats: dict, modules: dict[str, torch.nn.Module]) -> StaleRound:
        """Round `context.round` (step s) starts on leaves of W_{s-k}; raises when that is not stashed."""
        if not self.versions and context.step == 0:  # W_0: the weights as built, loaded or restored at step 0
            self.versions[0] = {name: parameters_of(module) for name, module in modules.items()}
        wanted = max(0, context.step - self.staleness)
        version = self.versions.get(wanted)
        if version is None:
            raise RuntimeError(f"weight version {wanted} for step {context.step} "
                               f"is not stashed (have {sorted(self.versions)})")
        params = {seg: {n: t.detach().requires_grad_(True) for n, t in tensors.items()}
                  for seg, tensors in version.items()}
        state = self.rounds[context.round] = StaleRound(context, stats, params)
        return state

    def take_gradients(self, round_: Optional[int], modules: dict[str, torch.nn.Module]) -> Optional[StaleRound]:
        """Before the optimizer step: the step's gradients were taken on its stashed version; onto the
        live weights they go. None when `round_` is no stale round in flight."""
        state = self.rounds.get(round_) if round_ is not None else None
        if state is not None:
            for name, module in modules.items():
                leaves = state.params[name]
                for pname, param in module.named_parameters():
                    param.grad = leaves[pname].grad
        return state

    def applied(self, state: StaleRound, modules: dict[str, torch.nn.Module]) -> None:
        """After the optimizer step of `state`'s round: stash the live weights as W_{step+1}."""
        state.params = {}
        applied = state.context.step + 1  # live weights are now W_{step+1}
        self.versions[applied] = {name: parameters_of(module) for name, module in modules.items()}
        for version in [v for v in self.versions if v < applied - self.staleness]:
            del self.versions[version]  # no later step uses it (step s uses W_{s-k})

    def checkpoint(self) -> dict:
        """The stashed versions the next k steps run on (W_{s-k} .. W_s at step s), on the CPU."""
        return {v: {n: {k: t.cpu().clone() for k, t in ts.items()} for n, ts in seg.items()}
                for v, seg in self.versions.items()}

    def restore(self, versions: dict, device: torch.device) -> None:
        self.versions = {int(v): {n: {k: t.to(device) for k, t in ts.items()} for n, ts in seg.items()}
                         for v, seg in versions.items()}
