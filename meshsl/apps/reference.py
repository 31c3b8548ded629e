"""Train a topology's model unsplit, in one process, on the same batches: the equivalence baseline.

Split training with micro-batches must give the same weights as this (up to float rounding): the
same initial weights (seeded per segment), the same samples per step, one optimizer step per step.
With `training.staleness: k`, step s takes its gradient on the weights after step s-k-1 (W_{s-k}, W_0 at
first) and applies it to the live weights, the weight-stashing rule of docs/wan.md."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from meshsl.models.layers import merge_inputs
from meshsl.compute.node_data import NodeData
from meshsl.compute.preprocessing import fit_preprocessing
from meshsl.compute.tasks import task_loss
from meshsl.compute.worker import build_module, build_optimizer
from meshsl.schedule.steps import training_steps


def train_reference(topology, steps: int | None = None) -> tuple[dict[str, dict[str, torch.Tensor]], list[float]]:
    if topology.lanes != 1:
        raise ValueError("the single-process reference covers single-client topologies")
    modules = {name: build_module(topology, name) for name in topology.segment_order}
    optimizers = {name: build_optimizer(topology.segments[name].optimizer or topology.spec.training.optimizer,
                                        modules[name].parameters()) for name in modules}
    data: dict[str, torch.Tensor] = {}
    for node in topology.nodes:
        node_data = NodeData(topology, node)
        data.update(node_data.tensors)
        fit_preprocessing(topology, node, {n: modules[n] for n in topology.segment_order
                                           if node in topology.placement[n]}, node_data)
    rows_of = node_data  # any node's sampler: row ids depend only on the topology
    losses = []
    k = topology.spec.training.staleness
    versions = {0: {name: {n: p.detach().clone() for n, p in m.named_parameters()} for name, m in modules.items()}}
    for info in training_steps(topology, steps):
        stashed = {name: {n: t.detach().requires_grad_(True) for n, t in ps.items()}
                   for name, ps in versions[max(0, info.step - k)].items()} if k else {}
        rows = rows_of.rows("train", 0, info.epoch, info.step_in_epoch, 0, 1)
        index = torch.as_tensor(np.asarray(rows))
        values = {name: tensor[index] for name, tensor in data.items()}
        total: Optional[torch.Tensor] = None
        for name in topology.segment_order:
            spec = topology.segments[name]
            merged = merge_inputs([values[i] for i in spec.inputs], spec.merge)
            values[name] = torch.func.functional_call(modules[name], stashed[name], (merged,)) if k \
                else modules[name](merged)
            for task in topology.tasks_of(name):
                term = task_loss(task.loss, values[name], values[task.labels]) * task.weight
                total = term if total is None else total + term
        if total is None:
            raise ValueError("the topology declares no task: nothing to train")
        total.backward()
        if k:
            for name, module in modules.items():
                for n, p in module.named_parameters():
                    p.grad = stashed[name][n].grad
        for optimizer in optimizers.values():
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if k:
            versions[info.step + 1] = {name: {n: p.detach().clone() for n, p in m.named_parameters()}
                                       for name, m in modules.items()}
            versions.pop(info.step + 1 - k - 1, None)
        losses.append(float(total.detach()))
    return {name: {k: v.detach().clone() for k, v in m.state_dict().items()} for name, m in modules.items()}, losses
