"""The label holder's side of label leakage, on the compute thread: the gradient defence declared for
a cut edge (`privacy[].gradient`) is applied to the rows before they leave, and every
`leakage_every`-th step the rows that leave are attacked as the receiving party would attack them
(meshsl.privacy.trajectory_attacks), scored with the labels only this node holds. The live gauges hold,
over the last `window` sampled steps, the realistic figure (`meshsl_edge_label_leakage_auc`: the
stronger of the attacker's norm and direction attacks, sides chosen without labels) and the upper bound
(`meshsl_edge_label_leakage_auc_upper_bound`: sides chosen with the labels, labelled references).
"""
from __future__ import annotations

from collections import deque
from typing import Optional

import networkx as nx
import numpy as np
import torch

from meshsl.schedule.accounting import epsilon, gradient_noise, mechanisms, releases
from meshsl.privacy.label_defences import defend
from meshsl.privacy.trajectory_attacks import StepAttack, attack_step, phase_figures


class LabelGuard:
    leakage_every = 10  # the gauge samples every N-th training step ...
    max_samples = 512  # ... on at most this many gradient rows per edge
    window = 5  # ... and reports over the last this many sampled steps

    def __init__(self, topology, node: str, worker) -> None:
        self.topology = topology
        self.node = node
        self.worker = worker
        self.defences = {p.segment: p.gradient for p in topology.spec.privacy if p.gradient is not None}
        self.generator = torch.Generator().manual_seed(topology.spec.training.seed * 1_000_003 + 1717)
        self._tasks: dict[tuple[str, str], Optional[object]] = {}
        self._samples: dict[str, tuple[list, list]] = {}
        self._attacks: dict[str, deque[StepAttack]] = {}
        self._prior: dict[str, tuple[int, float]] = {}  # labels source -> (minority class, its share)
        self._spent_cache: dict[tuple, float] = {}

    def begin(self) -> None:
        self._samples.clear()

    def _task_for(self, producer: str, consumer: str):
        """The task whose labels this node holds and whose loss reaches the producer through `consumer`."""
        key = (producer, consumer)
        if key not in self._tasks:
            below = nx.descendants(self.topology.graph, consumer) | {consumer}
            mine = [t for t in self.topology.spec.tasks if t.output in below and t.loss != "mse"
                    and t.labels in self.worker.data.tensors
                    and self.topology.party_of(t.labels) != self.topology.party_of(producer)]
            self._tasks[key] = mine[0] if mine else None
        return self._tasks[key]

    def _labels(self, task, lane: int, micro_batch: int) -> torch.Tensor:
        rows = self.worker.batch_rows(lane, micro_batch)
        labels = self.worker.data.get(task.labels, rows, "train")
        if self.topology.spec.training.label_dp is not None:
            labels = self.worker.private_labels(task, labels, rows)
        return labels.reshape(-1).cpu()

    def outgoing(self, producer: str, consumer: str, lane: int, micro_batch: int, grad: torch.Tensor) -> torch.Tensor:
        """The gradient rows as they leave for the producer's party: defended, and sampled for the gauge."""
        if self.topology.party_of(producer, lane) == self.topology.party_of(consumer, lane):
            return grad
        spec = self.defences.get(producer)
        task = self._task_for(producer, consumer)
        # Marvell shapes its noise with the labels the loss used (randomized ones under label DP).
        labels = self._labels(task, lane, micro_batch) if task is not None and spec is not None \
            and spec.defence == "marvell" else None
        if spec is not None:
            context = self.worker.context
            scale = float(self.topology.spec.training.batch_size * len(context.lanes))
            grad = defend(grad, spec, self.generator, labels=labels, scale=scale,
                          noise_multiplier=gradient_noise(self.topology, f"{producer}->{consumer}")
                          if spec.defence == "dp" else None).to(grad.dtype)
        if task is not None and self.topology.num_classes.get(task.labels) == 2:
            self._record(f"{producer}->{consumer}", task, lane, micro_batch, grad)
        return grad

    def _record(self, edge: str, task, lane: int, micro_batch: int, grad: torch.Tensor) -> None:
        """The rows that leave on a sampled step, with the true labels of those rows (for scoring only)."""
        if self.worker.context.step % self.leakage_every != 0:
            return
        sampled, ys = self._samples.setdefault(edge, ([], []))
        if sum(len(n) for n in sampled) < self.max_samples:
            rows = torch.as_tensor(self.worker.batch_rows(lane, micro_batch))
            sampled.append(grad.detach().reshape(grad.shape[0], -1).float().cpu())
            ys.append((task.labels, self.worker.data.tensors[task.labels][rows].reshape(-1)))

    def _minority(self, source: str) -> tuple[int, float]:
        """The positive class of the attacks (the minority one) and its share of the training rows."""
        if source not in self._prior:
            labels = self.worker.data.tensors[source].reshape(-1)
            train = np.concatenate(list(self.worker.data.pools.train))
            counts = torch.bincount(labels[torch.as_tensor(train)].long(), minlength=2)[:2].double()
            minority = int(torch.argmin(counts))
            self._prior[source] = (minority, float(counts[minority] / counts.sum().clamp(min=1)))
        return self._prior[source]

    def gauge(self) -> dict[str, dict[str, float]]:
        """Over the last `window` sampled steps, per edge: {"label_leakage": {edge: realistic AUC},
        "label_leakage_upper_bound": {edge: upper bound}} ({} without a sample); empties the sample."""
        result: dict[str, dict[str, float]] = {}
        for edge, (rows, ys) in self._samples.items():
            source = ys[0][0]
            y = torch.cat([labels for _, labels in ys]).numpy()
            minority, prior = self._minority(source)
            positive = y == minority
            if len(y) < 4 or positive.all() or not positive.any():
                continue
            window = self._attacks.setdefault(edge, deque(maxlen=self.window))
            window.append(attack_step(torch.cat(rows).numpy(), positive, prior, step=self.worker.context.step))
            figures = phase_figures(list(window))
            result.setdefault("label_leakage", {})[edge] = max(figures["realistic"]["norm_auc"],
                                                               figures["realistic"]["direction_auc"])
            result.setdefault("label_leakage_upper_bound", {})[edge] = max(figures["upper_bound"].values())
        self._samples.clear()
        return result

    def privacy_spent(self, steps: int) -> dict[str, float]:
        """Epsilon spent so far by the DP mechanisms this node applies ("edge|mechanism" -> epsilon; label DP
        is reported under its labels source: "labels|label_dp")."""
        spent = {}
        label_dp = self.topology.spec.training.label_dp
        if label_dp is not None:  # randomized response, once per sample: the whole budget from the start
            for task in self.topology.spec.tasks:
                if task.loss != "mse" and task.labels in self.worker.data.tensors:
                    spent[f"{task.labels}|label_dp"] = label_dp.epsilon
        if not any(p.dp is not None or (p.gradient is not None and p.gradient.defence == "dp")
                   for p in self.topology.spec.privacy):
            return spent
        for m in mechanisms(self.topology):
            producer, consumer = m.edge.split("->")
            sender = producer if m.kind == "activation_dp" else consumer
            if sender not in self.worker.modules:
                continue
            rate, count = releases(self.topology, steps, m.amplification)
            key = (m.edge, m.kind, rate, count)
            if key not in self._spent_cache:
                self._spent_cache[key] = epsilon(m.noise, rate, count, m.delta)
            spent[f"{m.edge}|{m.kind}"] = self._spent_cache[key]
        return spent
