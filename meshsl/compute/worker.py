"""The compute side of a node: its segments' modules and optimizers, and forward/backward per micro-batch.

Runs on the node's compute thread only. Tensors cross from the event loop through `TensorStore`,
whose entries the state machine hands over one at a time (an entry is read only after its arrival
event was handled), so no locks are needed beyond list.append being atomic.
"""
from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional

import torch

from meshsl.compute.eager_optim import eager
from meshsl.compute.hijack_guard import HijackGuard
from meshsl.compute.label_guard import LabelGuard
from meshsl.models.layers import build_segment_module, merge_inputs, with_preprocess
from meshsl.compute.leakage_gauge import LeakageGauge, raw_upstream
from meshsl.models.llm_parts import base_models, check_base
from meshsl.compute.node_data import NodeData
from meshsl.compute.preprocessing import fit_preprocessing, preprocess_layer
from meshsl.compute.staging import to_device
from meshsl.compute.tasks import record_step, summarise, task_loss
from meshsl.compute.trajectory_recorder import TrajectoryRecorder
from meshsl.compute.weight_versions import WeightVersions
from meshsl.schedule.accounting import effective_dp
from meshsl.privacy.dp import clip_and_noise, randomized_response
from meshsl.privacy.nopeek import nopeek_loss


def segment_seed(topology, segment: str) -> int:
    """Initial weights depend only on (seed, segment), so the single-process reference can rebuild them."""
    index = [s.name for s in topology.spec.segments].index(segment)
    return topology.spec.training.seed * 1_000_003 + index


_INIT_LOCK = threading.Lock()  # torch's global RNG: nodes simulated in one process must not interleave


def build_module(topology, segment: str) -> torch.nn.Module:
    """The segment's module, with its inputs' fitted preprocessing first (identity until fitted)."""
    with _INIT_LOCK:
        torch.manual_seed(segment_seed(topology, segment))
        module = build_segment_module(topology.segments[segment], f"segments({segment})")
    return with_preprocess(module, preprocess_layer(topology, segment))


def build_optimizer(spec, params) -> torch.optim.Optimizer:
    """`eager`: no torch._dynamo import on the critical path (see compute/eager_optim.py)."""
    if spec.name == "sgd":
        return eager(torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay))
    if spec.name == "adamw":
        return eager(torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay))
    return eager(torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay))


def build_segments(topology, segments: list[str], device: torch.device
                   ) -> tuple[dict[str, torch.nn.Module], dict[str, torch.optim.Optimizer]]:
    """Each segment's module (on `device`) and its optimizer (the segment's own, else training's)."""
    modules: dict[str, torch.nn.Module] = {}
    optimizers: dict[str, torch.optim.Optimizer] = {}
    for name in segments:
        module = modules[name] = build_module(topology, name).to(device)
        spec = topology.segments[name].optimizer or topology.spec.training.optimizer
        optimizers[name] = build_optimizer(spec, module.parameters())
    return modules, optimizers


@dataclass
class RoundContext:
    round: int
    phase: str
    micro_batches: int
    lanes: tuple[int, ...]
    epoch: int = 0
    step: int = 0
    step_in_epoch: int = 0
    offset: int = 0  # predict: first input row of the round
    count: int = 0  # predict: input rows in the round


@dataclass
class TensorStore:
    """Tensors of the current and next round, keyed with the round number."""

    inputs: dict = field(default_factory=dict)  # (round, consumer, producer, lane, mb) -> activation
    grads: dict = field(default_factory=lambda: defaultdict(list))  # (round, producer, lane, mb) -> [(consumer, grad)]
    outgoing_grads: dict = field(default_factory=dict)  # (round, producer, consumer, lane, mb) -> grad
    outputs: dict = field(default_factory=dict)  # (round, segment, lane, mb) -> output

    def drop_before(self, round_: int) -> None:
        for table in (self.inputs, self.grads, self.outgoing_grads, self.outputs):
            for key in [k for k in table if k[0] < round_]:
                del table[key]


@dataclass
class _Stash:
    leaves: dict[str, torch.Tensor]
    output: torch.Tensor
    loss: Optional[torch.Tensor]


def _new_stats(tasks) -> dict:
    return {t.name: {"loss_sum": 0.0, "correct": 0, "count": 0} for t in tasks}


def eval_summary(topology, tasks, eval_outputs: dict, eval_lanes: dict) -> dict:
    """An evaluation round's metrics per task (and per lane, one model per client, where lanes differ)."""
    by_task = {}
    for task in tasks:
        outs, ys = eval_outputs[task.name]
        by_task[task.name] = summarise(task.loss, task.metrics, outs, ys)
        lanes = eval_lanes.get(task.name, [])
        if topology.lanes > 1 and len(set(lanes)) > 1:  # per-client metrics (one model per lane)
            by_task[task.name]["by_lane"] = {
                str(lane): summarise(task.loss, task.metrics, [o for o, l in zip(outs, lanes) if l == lane],
                                     [y for y, l in zip(ys, lanes) if l == lane])
                for lane in sorted(set(lanes))}
    return {"tasks": by_task}


def noisy_label_table(topology, name: str, clean: torch.Tensor) -> torch.Tensor:
    """Label DP: one randomized response per sample of labels `name`, seeded by the topology."""
    classes = topology.num_classes.get(name) or int(clean.max()) + 1
    generator = torch.Generator().manual_seed(topology.spec.training.seed * 1_000_003 + 4242)
    return randomized_response(clean.long(), classes, topology.spec.training.label_dp.epsilon, generator)


class SegmentWorker:
    leakage_every = 10  # live leakage gauge: every N-th training step ...
    leakage_max_samples = 256  # ... on at most this many samples of one lane

    def __init__(self, topology, node: str, training: bool = True) -> None:
        """`training` False (a prediction run): the training tables are not loaded, nothing is fitted."""
        self.topology = topology
        self.node = node
        self.device = torch.device(topology.nodes[node].device)
        self.segments = [s for s in topology.segment_order if node in topology.placement[s]]
        self.modules, self.optimizers = build_segments(topology, self.segments, self.device)
        self.data = NodeData(topology, node, eager=training)
        if training:  # restored checkpoints and saved weights hold the same values
            fit_preprocessing(topology, node, self.modules, self.data)
        # Latency hiding: step s runs on weight version W_{s-k} (meshsl.compute.weight_versions).
        self.staleness = topology.spec.training.staleness
        self._stale = WeightVersions(self.staleness)
        self.store = TensorStore()
        self.stash: dict[tuple, _Stash] = {}
        self.context = RoundContext(-1, "train", 1, (0,))
        self.privacy = {p.segment: p for p in topology.spec.privacy}
        self.dp_generator = torch.Generator().manual_seed(topology.spec.training.seed + 17)
        self.stats: dict = {}
        self.eval_outputs: dict[str, tuple[list, list]] = {}
        self.compute_seconds: dict[tuple[str, str], float] = defaultdict(float)
        self.predictions: dict[str, dict[tuple[int, int], torch.Tensor]] = {}  # task -> (lane, mb) -> output
        self._noisy_labels: dict[str, torch.Tensor] = {}  # label DP: one randomized response per sample
        self._gauge = LeakageGauge(topology, self.modules, self.leakage_max_samples)
        self._label_guard = LabelGuard(topology, node, self)
        self._hijack_guard = HijackGuard(topology, node, self)
        self.recorder = TrajectoryRecorder(topology, node)  # privacy[].record: what this party received

    @property
    def versions(self) -> dict[int, dict[str, dict[str, torch.Tensor]]]:
        """Staleness > 0: the stashed weight versions (version -> segment -> name -> tensor)."""
        return self._stale.versions

    # -- rounds ----------------------------------------------------------------------------------
    def begin(self, context: RoundContext) -> None:
        if self.staleness and context.phase == "train":
            return self._begin_stale(context)
        self.context = context
        self.store.drop_before(context.round)
        self.stash.clear()
        self._stale.rounds.clear()
        self.stats = _new_stats(self.my_tasks())
        self.eval_outputs = {t.name: ([], []) for t in self.my_tasks()}
        self.eval_lanes: dict[str, list[int]] = {t.name: [] for t in self.my_tasks()}  # lane of each eval output
        self.predictions = {t.name: {} for t in self.my_tasks()}
        self.compute_seconds.clear()
        self._gauge.samples.clear()
        self._label_guard.begin()
        self._hijack_guard.begin(context)
        for module in self.modules.values():
            module.train(context.phase == "train")

    def _begin_stale(self, context: RoundContext) -> None:
        """Round r (step s) begins once step s-k-1 is applied here: every round before r-k is over."""
        oldest = context.round - self.staleness
        self.store.drop_before(oldest)
        for key in [k for k in self.stash if k[0] < oldest]:
            del self.stash[key]
        self._stale.drop_rounds_before(oldest)
        state = self._stale.begin(context, _new_stats(self.my_tasks()), self.modules)
        self.context, self.stats = context, state.stats
        self.compute_seconds.clear()
        self._gauge.samples.clear()
        self._label_guard.begin()
        self._hijack_guard.begin(context)
        for module in self.modules.values():
            module.train(True)

    def use_round(self, round_: int) -> None:
        """Staleness > 0: the next compute action or summary is for training round `round_`."""
        state = self._stale.rounds.get(round_)
        if state is not None:
            self.context, self.stats = state.context, state.stats

    def _call(self, segment: str, x: torch.Tensor) -> torch.Tensor:
        state = self._stale.rounds.get(self.context.round) if self.staleness else None
        if state is None or self.context.phase != "train":
            return self.modules[segment](x)
        return torch.func.functional_call(self.modules[segment], state.params[segment], (x,))

    def my_tasks(self):
        return [t for t in self.topology.spec.tasks if t.output in self.modules]

    def batch_rows(self, lane: int, micro_batch: int):
        c = self.context
        return self.data.rows(c.phase, lane, c.epoch, c.step_in_epoch, micro_batch, c.micro_batches,
                              offset=c.offset, count=c.count)

    def _input(self, segment: str, source: str, lane: int, micro_batch: int, rows) -> torch.Tensor:
        r = self.context.round
        if source in self.topology.data:
            return self.data.get(source, rows, self.context.phase).to(self.device)
        local = self.store.outputs.get((r, source, lane, micro_batch))
        value = local if local is not None else self.store.inputs.pop((r, segment, source, lane, micro_batch))
        if local is None and self.recorder.active:
            self.recorder.received(f"{source}->{segment}", "activation", self.context, lane, micro_batch, rows, value)
        value = to_device(value.detach(), self.device)  # pinned + non_blocking for CUDA; CPU: unchanged
        return value.requires_grad_(True) if self.context.phase == "train" else value

    # -- compute actions -------------------------------------------------------------------------
    def forward(self, segment: str, lane: int, micro_batch: int) -> None:
        start = time.perf_counter()
        c = self.context
        spec = self.topology.segments[segment]
        rows = self.batch_rows(lane, micro_batch)
        training = c.phase == "train"
        with torch.set_grad_enabled(training):
            leaves = {src: self._input(segment, src, lane, micro_batch, rows) for src in spec.inputs}
            output = self._call(segment, merge_inputs(list(leaves.values()), spec.merge))
            loss = self._privacy_terms(segment, leaves, output, rows) if training else None
            output = self._activation_dp(segment, output)
            for task in self.topology.tasks_of(segment):
                labels = self.data.get(task.labels, rows, c.phase) if c.phase != "predict" else None
                loss = self._task(task, output, labels, len(rows), loss, rows, lane=lane, micro_batch=micro_batch)
        if training and segment in self._gauge.gauged and c.step % self.leakage_every == 0:
            self._sample_leakage(segment, lane, rows, output)
        self.store.outputs[(c.round, segment, lane, micro_batch)] = output
        if training:
            self.stash[(c.round, segment, lane, micro_batch)] = _Stash(
                {k: v for k, v in leaves.items() if k in self.topology.segments}, output, loss)
        self.compute_seconds[(segment, "forward")] += time.perf_counter() - start

    def _task(self, task, output, labels, n: int, loss, rows=None, lane: int = 0, micro_batch: int = 0):
        c = self.context
        if c.phase == "predict":  # stays on this node, the task output's owner (meshsl.apps.predict writes it)
            self.predictions[task.name][(lane, micro_batch)] = output.detach().cpu()
            return loss
        labels = labels.to(self.device)
        if c.phase == "eval":
            outs, ys = self.eval_outputs[task.name]
            outs.append(output.detach().cpu())
            ys.append(labels.cpu())
            self.eval_lanes.setdefault(task.name, []).append(lane)
            return loss
        if self.topology.spec.training.label_dp is not None and task.loss != "mse":
            labels = self.private_labels(task, labels, rows)
        if self._hijack_guard.probe and task.loss != "mse":
            labels = self._hijack_guard.labels(task, labels)
        mean_loss = task_loss(task.loss, output, labels)
        record_step(self.stats[task.name], task.loss, mean_loss, output, labels, n)
        # Scale so that the sum over micro-batches and lanes is the mean over the whole step's samples.
        scaled = mean_loss * (n * task.weight / (self.topology.spec.training.batch_size * len(c.lanes)))
        return scaled if loss is None else loss + scaled

    def private_labels(self, task, labels: torch.Tensor, rows=None) -> torch.Tensor:
        """Randomized response drawn ONCE per sample (fixed for the whole run, seeded by the topology):
        fresh draws every epoch would let repeated releases average the noise away (epsilon per epoch)."""
        table = self._noisy_labels.get(task.labels)
        if table is None:
            table = self._noisy_labels[task.labels] = noisy_label_table(self.topology, task.labels,
                                                                        self.data.tensors[task.labels])
        if rows is None:
            raise RuntimeError("label DP needs the sample ids of the micro-batch")
        return table[torch.as_tensor(rows)].to(labels.device)

    def _raw_upstream(self, segment: str, leaves: dict, rows) -> list[torch.Tensor]:
        return raw_upstream(self.topology, self.data, self.context.phase, self.device, segment, leaves, rows)

    def _sample_leakage(self, segment: str, lane: int, rows, output: torch.Tensor) -> None:
        """Live leakage gauge: keep (raw, activation) of the first lane's micro-batches of a sampled step."""
        if lane != min(self.topology.lanes_of(segment, self.node)):
            return
        raw = self._raw_upstream(segment, {}, rows)
        if raw:
            self._gauge.add(segment, raw, output)

    def leakage(self) -> dict[str, float]:
        """dCor(raw input, what leaves) per cut edge from the sampled step; empties the sample."""
        return self._gauge.measure()

    def _privacy_terms(self, segment: str, leaves: dict, output: torch.Tensor, rows=None) -> Optional[torch.Tensor]:
        edge = self.privacy.get(segment)
        if edge is None or edge.nopeek <= 0:
            return None
        raw = self._raw_upstream(segment, leaves, rows)
        if not raw:
            return None
        raw_flat = torch.cat([r.reshape(r.shape[0], -1) for r in raw], dim=1)
        n = output.shape[0]
        scale = n / (self.topology.spec.training.batch_size * len(self.context.lanes))
        return nopeek_loss(raw_flat, output, edge.nopeek) * scale

    def _activation_dp(self, segment: str, output: torch.Tensor) -> torch.Tensor:
        """Clip and noise in every phase: evaluation and prediction inputs cross the boundary too,
        and a model evaluated without the noise would report an accuracy it cannot have in use."""
        edge = self.privacy.get(segment)
        if edge is None or edge.dp is None:
            return output
        return clip_and_noise(output, effective_dp(self.topology, segment), self.dp_generator)

    def backward(self, segment: str, lane: int, micro_batch: int) -> None:
        start = time.perf_counter()
        r = self.context.round
        stash = self.stash.pop((r, segment, lane, micro_batch))
        grads = self.store.grads.pop((r, segment, lane, micro_batch), [])
        tensors, grad_tensors = [], []
        if grads and self.recorder.active:
            self.recorder.gradients(segment, self.context, lane, micro_batch, self.batch_rows(lane, micro_batch), grads)
        if grads:
            # Summed in consumer order, not arrival order, so the result does not depend on timing.
            ordered = [g.to(self.device) for _, g in sorted(grads, key=lambda item: item[0])]
            total = ordered[0] if len(ordered) == 1 else sum(ordered[1:], ordered[0])
            tensors.append(stash.output)
            grad_tensors.append(total.reshape(stash.output.shape))
        if stash.loss is not None:
            tensors.append(stash.loss)
            grad_tensors.append(torch.ones_like(stash.loss))
        if tensors:
            torch.autograd.backward(tensors, grad_tensors)
        for source, leaf in stash.leaves.items():
            grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
            if self.topology.node_of(source, lane) == self.node:
                self.store.grads[(r, source, lane, micro_batch)].append((segment, grad))
            else:
                grad = self._label_guard.outgoing(source, segment, lane, micro_batch, grad.detach())
                self.store.outgoing_grads[(r, source, segment, lane, micro_batch)] = grad
        self.store.outputs.pop((r, segment, lane, micro_batch), None)
        self.compute_seconds[(segment, "backward")] += time.perf_counter() - start

    def apply_optimizer(self, round_: Optional[int] = None) -> None:
        self._hijack_guard.before_optimizer()
        state = self._stale.take_gradients(round_, self.modules) if self.staleness else None
        for _name, optimizer in self.optimizers.items():
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if state is not None:
            self._stale.applied(state, self.modules)

    # -- checkpoints -----------------------------------------------------------------------------
    def state(self) -> dict:
        """Everything a replayed step depends on: weights, optimizer state, random generators."""
        return {
            "modules": {n: {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}
                        for n, m in self.modules.items()},
            "optimizers": {n: o.state_dict() for n, o in self.optimizers.items()},
            "dp_generator": self.dp_generator.get_state(),
            "label_guard_generator": self._label_guard.generator.get_state(),  # gradient-defence noise
            "torch_rng": torch.get_rng_state(),
            "base_models": base_models(self.modules),  # LLM parts: the base model their adapters belong to
            # staleness > 0: the stashed versions the next k steps run on (W_{s-k} .. W_s at step s)
            **({"stale_versions": self._stale.checkpoint()} if self.staleness else {}),
        }

    def restore(self, state: dict) -> None:
        for name, module in self.modules.items():
            check_base(name, (state.get("base_models") or {}).get(name), module, "the checkpoint")
            module.load_state_dict(state["modules"][name])
            self.optimizers[name].load_state_dict(state["optimizers"][name])
            self.optimizers[name].zero_grad(set_to_none=True)
        self.dp_generator.set_state(state["dp_generator"])
        if "label_guard_generator" in state:  # absent in checkpoints of older versions
            self._label_guard.generator.set_state(state["label_guard_generator"])
        torch.set_rng_state(state["torch_rng"])
        self.stash.clear()
        self._stale.rounds.clear()
        if self.staleness:  # empty at step 0: W_0 is taken at the first step
            self._stale.restore(state.get("stale_versions") or {}, self.device)

    def discard_gradients(self) -> None:
        """Abort: forget the round's partial gradients (the step will be replayed)."""
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        self.stash.clear()
        self._stale.rounds.clear()

    # -- results ---------------------------------------------------------------------------------
    def round_summary(self) -> dict:
        if self.context.phase == "eval":
            return eval_summary(self.topology, self.my_tasks(), self.eval_outputs, self.eval_lanes)
        summary = {"tasks": self.stats}
        if self._gauge.samples:
            summary["leakage"] = self.leakage()
        summary.update(self._label_guard.gauge())  # label_leakage (realistic) and its upper bound, if sampled
        verdict = self._hijack_guard.verdict()
        if verdict is not None:
            summary["hijack_check"] = verdict
        spent = self._label_guard.privacy_spent(self.context.step + 1)
        if spent:
            summary["privacy_spent"] = spent
        return summary

    # -- weights (SplitFed averaging, sequential hand-off, checkpoints) --------------------------
    def weights(self, segment: str) -> list[torch.Tensor]:
        return [t.detach().cpu() for t in self.modules[segment].state_dict().values()]

    def reset_optimizer(self, segment: str) -> None:
        """A readmitted client starts its optimizer afresh (its state from before the drop is stale)."""
        spec = self.topology.segments[segment].optimizer or self.topology.spec.training.optimizer
        self.optimizers[segment] = build_optimizer(spec, self.modules[segment].parameters())

    def load_weights(self, segment: str, tensors: list[torch.Tensor]) -> None:
        module = self.modules[segment]
        keys = list(module.state_dict().keys())
        module.load_state_dict({k: t.clone() for k, t in zip(keys, tensors)})
