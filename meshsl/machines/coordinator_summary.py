"""What a run reports, free of I/O: the history row of each committed step, the merged evaluation
results, and the run summary, built from the nodes' DONE statistics."""
from __future__ import annotations

import math

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

from meshsl.schedule.steps import StepInfo


THROUGHPUT_WINDOW = 10  # steps: a history row's samples_per_s is their rate (samples_per_s_mean: since the start)


@dataclass
class RunRecord:
    """The statistics of a run so far. `leakage_edges`: the cut edges ("producer->consumer") whose
    leakage measurements count."""

    leakage_edges: set[str]
    regression_tasks: frozenset[str] = frozenset()  # tasks with loss: mse (their rows carry no accuracy)
    history: list[Any] = field(default_factory=list)
    node_stats: dict[str, Any] = field(default_factory=dict)  # node -> its last training control.Done
    leakage: dict[str, Any] = field(default_factory=dict)  # cut edge -> last sampled dCor(raw input, activation)
    label_leakage: dict[str, Any] = field(default_factory=dict)  # cut edge -> last realistic label-attack AUC (label holder)
    label_leakage_upper_bound: dict[str, Any] = field(default_factory=dict)  # cut edge -> its last upper bound
    failovers: int = 0
    recovery_seconds: list[Any] = field(default_factory=list)
    failover_events: list[Any] = field(default_factory=list)  # node, cause, detected (unix time), recovery_seconds
    client_events: list[Any] = field(default_factory=list)  # drops and rejoins: node, lanes, step, cause, time
    train_seconds: float = 0.0
    samples: int = 0
    recent: list[Any] = field(default_factory=list)  # (seconds, samples) of the last THROUGHPUT_WINDOW steps

    def step_row(self, info: StepInfo, done: dict[str, Any]) -> dict[str, Any]:
        """The history row of a committed step, from every node's DONE statistics."""
        tasks: dict[str, dict[str, Any]] = {}
        leakage: dict[str, float] = {}
        labels: dict[str, dict[str, float]] = {"label_leakage": {}, "label_leakage_upper_bound": {}}
        for sender, received in done.items():
            message = self.node_stats[sender] = received.message  # control.Done: checked when parsed
            for edge, dcor in message.leakage.items():  # worst client per edge
                if edge in self.leakage_edges:
                    leakage[edge] = max(float(dcor), leakage.get(edge, 0.0))
            for key, worst in labels.items():  # label-attack AUCs (realistic, upper bound), worst client per edge
                for edge, auc in getattr(message, key).items():
                    if edge in self.leakage_edges:
                        worst[edge] = max(float(auc), worst.get(edge, 0.0))
            for name, stats in message.tasks.items():
                count = max(1, stats.get("count", 0))
                tasks[name] = {"loss": stats.get("loss_sum", 0.0) / count}
                if name not in self.regression_tasks:  # mse: no classes, no accuracy
                    tasks[name]["accuracy"] = stats.get("correct", 0) / count
        row = {"step": info.step, "epoch": info.epoch, "lanes": list(info.lanes), "tasks": tasks}
        if leakage:
            row["leakage"] = leakage
            self.leakage.update(leakage)
        self.label_leakage.update(labels["label_leakage"])
        self.label_leakage_upper_bound.update(labels["label_leakage_upper_bound"])
        row.update({key: worst for key, worst in labels.items() if worst})
        return row

    def commit_step(self, info: StepInfo, done: dict[str, Any], seconds: float, batch_size: int) -> dict[str, Any]:
        """Count a committed step (`seconds` it took) and append its history row."""
        self.train_seconds += seconds
        self.samples += batch_size * len(info.lanes)
        row = self.step_row(info, done)
        self.recent = [*self.recent, (seconds, batch_size * len(info.lanes))][-THROUGHPUT_WINDOW:]
        window = sum(s for s, _ in self.recent)
        # The rate of the last few steps, not since the start: start-up and warm-up do not drag it down.
        row["samples_per_s"] = sum(n for _, n in self.recent) / window if window else 0.0
        row["samples_per_s_mean"] = self.samples / self.train_seconds if self.train_seconds else 0.0
        self.history.append(row)
        return row

    def failover(self, nodes: Iterable[str], cause: str, why: str, detected: float, seconds: float, checkpoint_step: int) -> None:
        self.failovers += 1
        self.recovery_seconds.append(seconds)
        self.failover_events.append({"nodes": sorted(nodes), "cause": cause, "reason": why, "detected": detected,
                                     "recovery_seconds": seconds, "checkpoint": checkpoint_step})

    def summarise(self, topology: Any, steps: Sequence[Any], wall: float, privacy_budget: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        edges: dict[str, dict[str, Any]] = {}
        for stats in self.node_stats.values():
            for key, n in stats.bytes.items():
                edge, direction = key.split("|")
                if direction in ("forward", "backward"):  # count each transfer once, at the sender
                    edges.setdefault(edge, {"forward_bytes": 0, "backward_bytes": 0})[f"{direction}_bytes"] += n
        final_eval: dict[str, Any] = next((row["eval"] for row in reversed(self.history) if "eval" in row), {})
        last_train = self.history[-1]["tasks"] if self.history else {}
        samples, train_seconds = self.samples, self.train_seconds
        training = topology.spec.training
        return {
            "topology": topology.spec.name,
            "topology_hash": topology.hash,
            "configurations": topology.recognised_configurations(),
            "steps": len(steps),
            "epochs": (steps[-1].epoch + 1) if steps else 0,
            "micro_batches": training.micro_batches,
            "schedule": training.schedule,
            "samples": samples,
            "samples_per_s": samples / train_seconds if train_seconds else 0.0,
            "wall_seconds": wall,
            "tasks": {name: {"train": last_train.get(name, {}), "eval": final_eval.get(name, {})}
                      for name in topology.tasks},
            "edges": edges,
            "bytes_per_sample": {e: (v["forward_bytes"] + v["backward_bytes"]) / max(samples, 1)
                                 for e, v in edges.items()},
            "rejected_messages": {n: s.rejected for n, s in self.node_stats.items() if s.rejected},
            "failovers": self.failovers,
            "recovery_seconds": self.recovery_seconds,
            "failover_events": list(self.failover_events),
            "privacy": [p.model_dump() for p in topology.spec.privacy],
            "label_dp": training.label_dp.model_dump() if training.label_dp else None,
            "leakage": dict(self.leakage),
            "label_leakage": dict(self.label_leakage),
            "label_leakage_upper_bound": dict(self.label_leakage_upper_bound),
            "privacy_budget": privacy_budget,
            "hijack_check": {n: s.hijack_check for n, s in self.node_stats.items() if s.hijack_check},
        }


def merge_evaluation(done: dict[str, Any], lanes: int, client_node: Callable[[int], str],
                     sequential_model: Optional[str] = None) -> dict[str, Any]:
    """Every node's evaluation DONE merged per task. Many clients: an entry per client node
    (`by_client`) and their sample-weighted means; sequential SL (`sequential_model`: the client that
    trained last) reports that client's model."""
    results: dict[str, dict[str, Any]] = {}
    for sender, received in done.items():
        for name, metrics in received.message.tasks.items():
            entry = results.setdefault(name, {"by_client": {}})
            by_lane = metrics.pop("by_lane", None) if isinstance(metrics, dict) else None
            if lanes > 1 and isinstance(by_lane, dict):
                # A shared label holder evaluated every client's model: one entry per client node.
                for lane, lane_metrics in by_lane.items():
                    entry["by_client"][client_node(int(lane))] = lane_metrics
            elif lanes > 1:
                entry["by_client"][sender] = metrics
            else:
                entry.update(metrics)
    for entry in results.values():
        clients = entry.pop("by_client") if "by_client" in entry else {}
        if clients:
            entry["by_client"] = clients
            total = sum(c.get("samples", 0) for c in clients.values()) or 1
            for metric in ("accuracy", "loss", "f1", "auroc"):
                values = [(c[metric], c.get("samples", 0)) for c in clients.values() if metric in c]
                if values:
                    entry[metric] = sum(v * n for v, n in values) / total
            if any("perplexity" in c for c in clients.values()):  # a language model: of the mean loss per token
                entry["perplexity"] = math.exp(entry["loss"])
            if sequential_model is not None and sequential_model in clients:
                # Sequential SL: the model is the client that trained last (plus the server); the
                # other clients' segments are stale until their next turn hands them the weights.
                entry.update({k: v for k, v in clients[sequential_model].items() if k != "confusion_matrix"})
                entry["model"] = sequential_model
    return results
