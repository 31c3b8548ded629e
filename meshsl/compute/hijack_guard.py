"""The client side of the hijacking probe inside the runtime (`privacy[].hijack_check`, see
meshsl/privacy/hijack.py). On a probe step the label holder trains its heads on random labels, records
the gradient its checked segment gets, and then drops that step's update of its own segments (the
server still learns from the fake batch, as in SplitGuard; it cannot tell probes from regular steps).
"""
from __future__ import annotations

import logging

import torch

from meshsl.privacy.hijack import guard_of

log = logging.getLogger("meshsl.privacy")


class HijackGuard:
    def __init__(self, topology, node: str, worker) -> None:
        self.worker = worker
        self.topology = topology
        self.segments = [p.segment for p in topology.spec.privacy
                         if p.hijack_check is not None and p.segment in worker.modules]
        spec = next((p.hijack_check for p in topology.spec.privacy if p.segment in self.segments), None)
        self.guard = guard_of(spec, stream=sorted(topology.nodes).index(node)) if spec is not None else None
        self.probe = False
        self.node = node
        self._warned = False

    @property
    def active(self) -> bool:
        return self.guard is not None

    def begin(self, context) -> None:
        self.probe = self.guard is not None and context.phase == "train" and self.guard.next_is_fake()

    def labels(self, task, labels: torch.Tensor) -> torch.Tensor:
        """Random labels for the whole step on a probe step, the true ones otherwise."""
        if not self.probe or self.guard is None:
            return labels
        classes = self.topology.num_classes.get(task.labels) or int(labels.max()) + 1
        return self.guard.fake_labels(labels, classes)

    def before_optimizer(self) -> None:
        """Record the checked segments' gradient; on a probe step, forget this node's gradients."""
        if self.guard is None or self.worker.context.phase != "train":
            return
        grads = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=p.device)
                 for s in self.segments for p in self.worker.modules[s].parameters()]
        self.guard.observe(torch.cat(grads).cpu(), self.probe)
        if self.probe:
            for optimizer in self.worker.optimizers.values():
                optimizer.zero_grad(set_to_none=True)

    def verdict(self) -> dict | None:
        if self.guard is None:
            return None
        verdict = dict(self.guard.verdict(), segments=list(self.segments))
        if verdict["hijacked"] and not self._warned:
            self._warned = True
            log.warning("%s: the gradients for %s do not react to fake-label probes (score %.3f after %d probes): "
                        "the server may be hijacking training", self.node, ", ".join(self.segments),
                        verdict["score"], verdict["fake_batches"])
        return verdict
