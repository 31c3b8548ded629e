"""Train a topology's model unsplit, in one process, on the same batches: the equivalence baseline.

Split training with micro-batches must give the same weights as this (up to float rounding): the
same initial weights (seeded per segment), the same samples per step, one optimizer step per step."""
from __future__ import annotations

import numpy as np
import torch

from meshsl.compute.layers import merge_inputs
from meshsl.compute.node_data import NodeData
from meshsl.compute.tasks import task_loss
from meshsl.compute.worker import build_module, build_optimizer
from meshsl.plan.steps import training_steps


def train_reference(topology, steps: int | None = None) -> tuple[dict[str, dict[str, torch.Tensor]], list[float]]:
    if topology.lanes != 1:
        raise ValueError("the single-process reference covers single-client topologies")
    modules = {name: build_module(topology, name) for name in topology.segment_order}
    optimizers = {name: build_optimizer(topology.segments[name].optimizer or topology.spec.training.optimizer,
                                        modules[name].parameters()) for name in modules}
    data = {}
    for node in topology.nodes:
        node_data = NodeData(topology, node)
        data.update(node_data.tensors)
    rows_of = node_data  # any node's sampler: row ids depend only on the topology
    losses = []
    for info in training_steps(topology, steps):
        rows = rows_of.rows("train", 0, info.epoch, info.step_in_epoch, 0, 1)
        index = torch.as_tensor(np.asarray(rows))
        values = {name: tensor[index] for name, tensor in data.items()}
        total = None
        for name in topology.segment_order:
            spec = topology.segments[name]
            values[name] = modules[name](merge_inputs([values[i] for i in spec.inputs], spec.merge))
            for task in topology.tasks_of(name):
                term = task_loss(task.loss, values[name], values[task.labels]) * task.weight
                total = term if total is None else total + term
        total.backward()
        for optimizer in optimizers.values():
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(float(total.detach()))
    return {name: {k: v.detach().clone() for k, v in m.state_dict().items()} for name, m in modules.items()}, losses
