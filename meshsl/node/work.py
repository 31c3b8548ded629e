"""What a node's compute thread does with its SegmentWorker: build it, run the machine's compute actions,
encode outgoing tensors, finish steps (statistics, checkpoints) and summarise rounds for the coordinator."""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from meshsl.compute.staging import to_host
from meshsl.compute.weights import load_saved_weights
from meshsl.compute.worker import RoundContext, SegmentWorker
from meshsl.schedule.steps import edge_name
from meshsl.schedule.steps import StepInfo, epoch_steps, step_at
from meshsl.protocol.envelope import Kind
from meshsl.protocol.frames import encode_message
from meshsl.machines import node as m
from meshsl.machines.commit_book import CommitBook
from meshsl.node.checkpoints import NodeCheckpoints
from meshsl.node.wire import EdgeCodecs

log = logging.getLogger("meshsl.node")


class NodeWork:
    """The node's worker and the compute it runs (always on the compute thread). `envelope(kind, **fields)`
    builds this node's envelopes; `metrics` returns the node's metrics (None: none)."""

    def __init__(self, topology, node: str, machine, book: CommitBook, checkpoints: NodeCheckpoints,
                 codecs: EdgeCodecs, counters, envelope: Callable, metrics: Callable[[], Any],
                 weights_dir: Optional[Path] = None, inference=None) -> None:
        self.topology = topology
        self.node = node
        self.machine = machine
        self.book = book
        self.checkpoints = checkpoints
        self.codecs = codecs
        self.counters = counters
        self.envelope = envelope
        self._metrics = metrics
        self.weights_dir = weights_dir
        self.inference = inference
        self.staleness = topology.spec.training.staleness
        self.worker: Optional[SegmentWorker] = None
        self.one_epoch: list[StepInfo] = []  # the step schedule every node derives alike (set by build)

    @property
    def built(self) -> SegmentWorker:
        """The worker, once `build` ran on the compute thread (before the first round)."""
        if self.worker is None:
            raise RuntimeError("the segment worker is used before it was built")
        return self.worker

    def build(self) -> SegmentWorker:
        torch.set_num_threads(self.topology.nodes[self.node].threads)
        worker = SegmentWorker(self.topology, self.node, training=self.inference is None)
        if self.weights_dir is not None:
            load_saved_weights(worker, Path(self.weights_dir))
        if self.inference is not None:
            self.inference.attach(worker)
        self.one_epoch = epoch_steps(self.topology)
        return worker

    def run(self, action) -> None:
        """One compute action of the machine (Forward, Backward, ApplyOptimizer, Prepare)."""
        worker = self.built
        if self.staleness and not isinstance(action, m.Prepare):
            worker.use_round(action.round)  # several training rounds are in flight
        if isinstance(action, m.Forward):
            worker.forward(action.segment, action.lane, action.micro_batch)
        elif isinstance(action, m.Backward):
            worker.backward(action.segment, action.lane, action.micro_batch)
        elif isinstance(action, m.Prepare):
            info = step_at(self.one_epoch, action.step)
            worker.begin(RoundContext(round=action.round, phase="train", micro_batches=self.machine.micro_batches,
                                      lanes=action.lanes, epoch=info.epoch, step=info.step,
                                      step_in_epoch=info.step_in_epoch))
            self.book.step_prepared(info.step, action.lanes)
            metrics = self._metrics()
            if metrics:
                metrics.progress(info.step, info.epoch)
        else:
            worker.apply_optimizer(action.round)

    def tensor_message(self, action, phase: str) -> tuple:
        """(peer, frames, (edge, direction)) for a SendActivation/SendGradient."""
        forward = isinstance(action, m.SendActivation)
        edge = edge_name(action.producer, action.consumer)
        store = self.built.store
        if forward:
            tensor = store.outputs[(action.round, action.producer, action.lane, action.micro_batch)]
        else:
            tensor = store.outgoing_grads.pop((action.round, action.producer, action.consumer, action.lane,
                                               action.micro_batch))
        if tensor.device.type == "cuda":
            tensor = to_host(tensor)  # through pinned memory; CPU tensors never get here
        direction = "act" if forward else "grad"
        descriptor, parts = self.codecs.encode(edge, direction, tensor, (action.lane, action.micro_batch))
        envelope = self.envelope(Kind.ACTIVATION if forward else Kind.GRADIENT, phase=phase,
                                 step=action.round, lane=action.lane, micro_batch=action.micro_batch, edge=edge,
                                 tensors=(descriptor,))
        return action.peer, encode_message(envelope, [parts]), (edge, "forward" if forward else "backward")

    def step_applied(self, action: m.RoundDone) -> tuple:
        """Right after a self-driven step's optimizer step (before the next step's Prepare resets the
        statistics): its statistics, and its checkpoint when due."""
        if self.staleness:
            self.built.use_round(action.round)
        step = self.built.context.step
        summary = self.round_summary(action)
        due = self.book.checkpoint_after(step)
        if due is not None:
            self.checkpoints.timed_save(due, self.worker)
            summary["checkpoint"] = due
        self.book.step_applied(time.perf_counter())
        return summary, action.round

    def round_summary(self, action: m.RoundDone) -> dict:
        """What the coordinator learns about a finished round (no sample data)."""
        summary = self.built.round_summary()
        wall = time.perf_counter() - self.book.round_started
        compute = dict(self.built.compute_seconds)
        summary["compute_seconds"] = sum(compute.values())
        summary["wall_seconds"] = wall
        summary["bytes"] = {f"{e}|{d}": n for (e, d), n in list(self.counters.bytes.items())}
        summary["rejected"] = dict(self.counters.rejected)
        metrics = self._metrics()
        if metrics:
            self._observe_round(metrics, action.phase, summary, compute, wall)
        log.info("round done", extra={"node": self.node, "step": self.book.train_step, "round": action.round,
                                      "phase": action.phase, "seconds": round(wall, 4),
                                      "busy_seconds": round(summary["compute_seconds"], 4)})
        return summary

    def _observe_round(self, metrics, phase: str, summary: dict, compute: dict, wall: float) -> None:
        """Prometheus: bubbles, this node's samples and step time, the loss/metrics of each task it owns,
        and what privacy checks measured."""
        if phase == "train":
            for segment in self.built.segments:
                busy = compute.get((segment, "forward"), 0.0) + compute.get((segment, "backward"), 0.0)
                metrics.bubble(segment, max(0.0, 1.0 - busy / wall) if wall > 0 else 0.0)
            lanes = [lane for lane in self.book.lanes
                     if any(self.topology.node_of(s, lane) == self.node for s in self.built.segments)]
            samples = self.topology.spec.training.batch_size * len(lanes)
            if samples:
                metrics.step_done(wall, samples)
        self._observe_tasks(metrics, phase, summary)
        for edge, dcor in summary.get("leakage", {}).items():
            metrics.leakage(edge, dcor)
        upper = summary.get("label_leakage_upper_bound", {})
        for edge, auc in summary.get("label_leakage", {}).items():
            metrics.label_leakage(edge, auc, upper.get(edge, auc))
        for key, eps in summary.get("privacy_spent", {}).items():
            metrics.privacy_epsilon(*key.split("|"), eps)

    def _observe_tasks(self, metrics, phase: str, summary: dict) -> None:
        kinds = {t.name: t.loss for t in self.topology.spec.tasks}
        for task, stats in summary.get("tasks", {}).items():
            if phase == "train" and stats.get("count"):
                count = stats["count"]
                values = {} if kinds.get(task) == "mse" else {"accuracy": stats.get("correct", 0) / count}
                metrics.task(task, stats.get("loss_sum", 0.0) / count, values, "train")
            elif phase == "eval" and _finite(stats.get("loss")):
                values = {k: float(v) for k, v in stats.items() if k in ("accuracy", "f1", "auroc") and _finite(v)}
                metrics.task(task, float(stats["loss"]), values, "eval")


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
