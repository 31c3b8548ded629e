"""The coordinator: starts rounds, waits until every node finished, commits steps, drives epochs,
evaluation, client averaging/hand-off and shutdown. Lives in the process of one node (the plan's
coordinator, by default the first task's label holder) and talks through that node's transport."""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from meshsl import checkpoint
from meshsl.errors import MeshslError, PeerFailed, PeerTimeout, ProtocolError
from meshsl.plan.steps import StepInfo, sample_pools, training_steps
from meshsl.protocol.envelope import Kind

log = logging.getLogger("meshsl.coordinator")


def privacy_budget_of(topology, steps: int) -> Optional[dict]:
    """(epsilon, delta) per edge and party for a run of `steps`; PrivacyBudgetError if over a declared budget."""
    if not topology.spec.privacy and topology.spec.training.label_dp is None:
        return None
    from meshsl.privacy.accounting import check_budget
    return check_budget(topology, steps)

ROUNDS_PER_INCARNATION = 1 << 24  # round numbers of a restarted coordinator are above any earlier ones


class NodesLost(MeshslError):
    """Nodes stopped answering (heartbeat timeout) or timed out mid-round; recovery may bring them back."""

    def __init__(self, nodes: set[str], why: str) -> None:
        self.nodes = set(nodes)
        super().__init__(f"lost node(s) {', '.join(sorted(nodes))}: {why}")


@dataclass
class RunOptions:
    steps: Optional[int] = None
    epochs: Optional[int] = None
    evaluate: bool = True
    progress: Optional[Callable[[dict], None]] = None  # called with every history row
    predict: Optional[object] = None  # meshsl.predict.PredictSettings: prediction rounds instead of training
    startup_timeout_s: Optional[float] = None  # overrides retry.startup_timeout_s (waiting for every node)


@dataclass
class Coordinator:
    node: object  # the hosting NodeRuntime
    options: RunOptions = field(default_factory=RunOptions)
    error: Optional[str] = None
    history: list = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    exception: Optional[BaseException] = None  # the typed error behind `error`

    def __post_init__(self) -> None:
        self.topology = self.node.topology
        self.nodes = list(self.topology.nodes)
        self.inbox: asyncio.Queue = asyncio.Queue(maxsize=max(256, 8 * len(self.nodes)))
        self.round = 0
        self.policy = self.topology.spec.retry
        self.node_stats: dict[str, dict] = {}
        self.committed: dict[str, int] = {}  # node -> last round whose optimizer step it applied
        self.last_train_round = 0
        # node -> when it was last heard from, oldest first (seen() moves a node to the end): the lost-node
        # check, done for every message collected, looks only at the head instead of at every node.
        self.last_seen: OrderedDict[str, float] = OrderedDict()
        self.checkpoints: dict[str, set[int]] = {}  # node -> checkpoint steps it reported
        self.endpoints: dict[str, str] = {}  # node -> endpoint it announced (standbys move nodes)
        self.predict_rows: dict[str, int] = {}  # node -> rows of its prediction input (predict runs)
        self.restarts: dict[str, int] = {}
        self.failovers = 0
        self.recovery_seconds: list[float] = []
        self.last_lanes: tuple[int, ...] = ()  # clients of the last training step (sequential: the live model)
        self.leakage: dict[str, float] = {}  # cut edge -> last sampled dCor(raw input, activation)
        self.leakage_edges = {f"{p}->{c}" for p, c in self.topology.cut_edges()}
        self.label_leakage: dict[str, float] = {}  # cut edge -> last norm-attack AUC at the label holder
        self.checkpoint_every = self.topology.spec.checkpoint.every
        self.checkpoint_dir = self.node.checkpoint_dir
        self.incarnation = 0
        if self.checkpoint_every > 0:
            self.incarnation = checkpoint.read_counter(self.checkpoint_dir, "coordinator") + 1
            checkpoint.write_counter(self.checkpoint_dir, "coordinator", self.incarnation)
        self.round = self.incarnation * ROUNDS_PER_INCARNATION

    def seen(self, node: str) -> None:
        self.last_seen[node] = time.monotonic()
        self.last_seen.move_to_end(node)

    def _lost_nodes(self) -> set[str]:
        """Nodes not heard from within the heartbeat timeout (never heard from: not lost)."""
        limit = time.monotonic() - self.policy.heartbeat_timeout_s
        lost = set()
        for name, when in self.last_seen.items():
            if when >= limit:
                break  # every later entry was seen later still
            if name != self.node.node and name in self._node_set:
                lost.add(name)
        return lost

    @property
    def _node_set(self) -> frozenset:
        if getattr(self, "_node_set_of", None) is not self.nodes:
            self._node_set_of, self._node_set_cache = self.nodes, frozenset(self.nodes)
        return self._node_set_cache

    async def _next_message(self, timeout: float) -> tuple:
        """The next inbox message (TimeoutError after `timeout`); no timer when one is already waiting."""
        try:
            return self.inbox.get_nowait()
        except asyncio.QueueEmpty:
            return await asyncio.wait_for(self.inbox.get(), timeout=timeout)

    def _note_hello(self, sender: str, meta: dict) -> None:
        steps = meta.get("checkpoints")
        if isinstance(steps, list):
            self.checkpoints[sender] = {s for s in steps if isinstance(s, int)}
        endpoint = meta.get("endpoint")
        if isinstance(endpoint, str) and endpoint and endpoint != self.node.transport.address_book.get(sender):
            if sender != self.node.node:
                self.node.reroute(sender, endpoint)  # it came back at a standby endpoint
        if isinstance(endpoint, str):
            self.endpoints[sender] = endpoint
        rows = meta.get("predict_rows")
        if isinstance(rows, int) and not isinstance(rows, bool):
            self.predict_rows[sender] = rows  # how many rows its own prediction input has (not the rows)

    # -- messages --------------------------------------------------------------------------------
    def deliver(self, sender: str, envelope, tensors) -> None:
        try:
            self.inbox.put_nowait((sender, envelope, tensors))
        except asyncio.QueueFull:
            raise ProtocolError("flood", "coordinator inbox is full", sender) from None
        self._observe_inbox()

    def _observe_inbox(self) -> None:
        if self.node.metrics:
            self.node.metrics.queue_depth("coordinator_inbox", self.inbox.qsize())

    async def _collect(self, kind: Kind, senders: set[str], round_: Optional[int], what: str,
                       timeout: Optional[float] = None) -> dict[str, tuple]:
        """Wait for one `kind` message from each of `senders` (for `round_`); FAILED aborts the run."""
        pending = set(senders)
        got: dict[str, tuple] = {}
        deadline = time.monotonic() + (timeout or self.policy.timeout_s)
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise NodesLost(pending, f"did not {what} within {timeout or self.policy.timeout_s:.1f}s")
            lost = self._lost_nodes()
            if lost:
                raise NodesLost(lost, f"no heartbeat for {self.policy.heartbeat_timeout_s:.1f}s")
            try:
                sender, envelope, tensors = await self._next_message(min(left, self.policy.heartbeat_interval_s))
            except TimeoutError:
                continue
            self._observe_inbox()
            if envelope.kind == Kind.FAILED:
                raise PeerFailed(sender, str(envelope.meta.get("error", ""))[:500])
            if envelope.kind == Kind.HELLO:
                self._note_hello(sender, envelope.meta)
                await self.node.send_control(sender, Kind.ACK, meta={"of": "hello"})
                if kind == Kind.HELLO and sender in pending:
                    pending.discard(sender)
                    got[sender] = (envelope, tensors)
                continue
            if envelope.kind == Kind.ACK and envelope.meta.get("of") == "commit":
                self.committed[sender] = max(self.committed.get(sender, 0), envelope.step)
                if isinstance(envelope.meta.get("checkpoint"), int):
                    self.checkpoints.setdefault(sender, set()).add(envelope.meta["checkpoint"])
                if kind == Kind.ACK and "commit" in what and envelope.step == round_:
                    pending.discard(sender)
                continue
            if envelope.kind != kind or sender not in pending or (round_ is not None and envelope.step != round_):
                continue  # late duplicates of earlier rounds
            pending.discard(sender)
            got[sender] = (envelope, tensors)
        return got

    async def _await_commits(self, round_: int) -> None:
        """Phase two of the step commit: every node confirmed it applied the optimizer step."""
        missing = {n for n in self.nodes if self.committed.get(n, 0) < round_}
        if round_ and missing:
            await self._collect(Kind.ACK, missing, round_, "confirm the commit")

    async def broadcast(self, kind: Kind, targets=None, **fields) -> None:
        for name in targets or self.nodes:
            await self.node.send_control(name, kind, **fields)

    async def broadcast_shutdown(self) -> None:
        await self.broadcast(Kind.SHUTDOWN)

    # -- the run ---------------------------------------------------------------------------------
    async def run(self) -> None:
        await self._wait_for_nodes()
        if self.options.predict is not None:
            from meshsl.predict import coordinate_prediction
            self.summary = await coordinate_prediction(self, self.options.predict)
            await self.broadcast_shutdown()
            return
        # steps=0: no training at all (evaluate saved weights); training_steps reads 0 as "not given"
        steps = [] if self.options.steps == 0 else training_steps(self.topology, self.options.steps, self.options.epochs)
        self.privacy_budget = privacy_budget_of(self.topology, len(steps))  # over budget: stops here, before step 0
        index = await self._restore_consistent() if self.checkpoint_every > 0 else 0
        started = time.perf_counter()
        train_seconds = 0.0
        samples = 0
        eval_every = self.topology.spec.training.eval_every
        epoch_len = len(training_steps(self.topology, epochs=1)) or 1
        while index < len(steps):
            info = steps[index]
            try:
                t0 = time.perf_counter()
                row = await self._train_step(info)
                train_seconds += time.perf_counter() - t0
                samples += self.topology.spec.training.batch_size * len(info.lanes)
                row["samples_per_s"] = samples / train_seconds if train_seconds else 0.0
                await self._sync_clients(info, steps)
                last = info.step == steps[-1].step
                due = (eval_every and (info.step + 1) % eval_every == 0) or \
                      (not eval_every and (info.step + 1) % epoch_len == 0)
                if self.options.evaluate and (due or last):
                    row["eval"] = await self._evaluate()
            except NodesLost as lost:
                index = await self._recover(lost)
                continue
            index += 1
            self.history.append(row)
            log.info("step committed", extra={
                "node": self.node.node, "step": row["step"], "epoch": row["epoch"],
                "samples_per_s": round(row["samples_per_s"], 1),
                **{f"{t}_loss": round(v["loss"], 5) for t, v in row["tasks"].items()}})
            for task, result in row.get("eval", {}).items():
                log.info("evaluated", extra={"node": self.node.node, "step": row["step"], "task": task, **{
                    k: round(v, 5) for k, v in result.items() if k in ("loss", "accuracy", "f1", "auroc")
                    and isinstance(v, float)}})
            if self.options.progress:
                self.options.progress(row)
        await self._await_commits(self.last_train_round)
        eval_only = await self._evaluate() if not steps and self.options.evaluate else None
        self.summary = self._summarise(steps, time.perf_counter() - started, train_seconds, samples)
        if eval_only is not None:
            for name, result in eval_only.items():
                self.summary["tasks"].setdefault(name, {"train": {}})["eval"] = result
        await self.broadcast_shutdown()

    async def _wait_for_nodes(self, nodes: Optional[set[str]] = None) -> None:
        pending = set(nodes or self.nodes)
        startup_timeout = self.options.startup_timeout_s or self.policy.startup_timeout_s
        deadline = time.monotonic() + startup_timeout
        while pending:
            left = deadline - time.monotonic()
            try:
                sender, envelope, _ = await self._next_message(max(left, 0.001))
            except TimeoutError:
                raise PeerTimeout(", ".join(sorted(pending)), startup_timeout, "start") from None
            if envelope.kind == Kind.HELLO:
                pending.discard(sender)
                self._note_hello(sender, envelope.meta)
                self.seen(sender)
                await self.node.send_control(sender, Kind.ACK, meta={"of": "hello"})

    # -- recovery --------------------------------------------------------------------------------
    def _common_checkpoint(self) -> int:
        common = set.intersection(*(self.checkpoints.get(n, set()) for n in self.nodes))
        if not common:
            raise PeerFailed(min(self.nodes, key=lambda n: len(self.checkpoints.get(n, ()))),
                             "no checkpoint step is shared by every node; cannot resume consistently")
        return max(common)

    async def _restore_consistent(self) -> int:
        """Every node loads the newest checkpoint they all have; returns the index of the next step."""
        step = self._common_checkpoint()
        self.round += 1
        await self.broadcast(Kind.RESTORE, step=self.round,
                             meta={"checkpoint": step, "round": self.round, "endpoints": self.endpoints})
        await self._collect_restore_acks(self.round)
        if step:
            log.warning("resumed every node from the checkpoint of step %d", step)
        return step

    async def _collect_restore_acks(self, round_: int) -> None:
        pending = set(self.nodes)
        deadline = time.monotonic() + self.policy.startup_timeout_s
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise PeerFailed(sorted(pending)[0], "did not restore its checkpoint")
            try:
                sender, envelope, _ = await asyncio.wait_for(self.inbox.get(), timeout=left)
            except TimeoutError:
                continue
            if envelope.kind == Kind.FAILED:
                raise PeerFailed(sender, str(envelope.meta.get("error", ""))[:500])
            if envelope.kind == Kind.HELLO:
                self._note_hello(sender, envelope.meta)
                await self.node.send_control(sender, Kind.ACK, meta={"of": "hello"})
            elif envelope.kind == Kind.ACK and envelope.meta.get("of") == "restore" and envelope.step == round_:
                pending.discard(sender)

    async def _recover(self, lost: NodesLost) -> int:
        """A node is gone: abort the round everywhere, wait for it to come back (restarted by the
        launcher or its operator, possibly at a standby endpoint), restore everyone to the newest
        common checkpoint and replay from there. Returns the index of the next step."""
        started = time.perf_counter()
        if self.checkpoint_every <= 0:
            raise PeerFailed(sorted(lost.nodes)[0], f"{lost}; recovery needs checkpoints (checkpoint.every > 0)")
        for name in lost.nodes:
            self.restarts[name] = self.restarts.get(name, 0) + 1
            if self.restarts[name] > self.policy.max_restarts:
                raise PeerFailed(name, f"{lost}; restart budget of {self.policy.max_restarts} spent")
        log.warning("%s; recovering", lost)
        if self.node.metrics:
            for name in lost.nodes:
                self.node.metrics.peer_up(name, False)
        if self.options.progress:
            self.options.progress({"event": "nodes_lost", "nodes": sorted(lost.nodes)})
        for name in lost.nodes:
            self.checkpoints.pop(name, None)
            self.last_seen.pop(name, None)
        live = [n for n in self.nodes if n not in lost.nodes]
        await self.broadcast(Kind.ABORT, targets=live, step=self.round)
        await self._wait_for_nodes(lost.nodes)
        index = await self._restore_consistent()
        self.failovers += 1
        self.recovery_seconds.append(time.perf_counter() - started)
        if self.node.metrics:
            for name in lost.nodes:
                self.node.metrics.failover("restart")
        if self.options.progress:
            self.options.progress({"event": "recovered", "nodes": sorted(lost.nodes), "checkpoint": index,
                                   "seconds": self.recovery_seconds[-1]})
        return index

    def _begin_meta(self, info: Optional[StepInfo], lanes, micro_batches: int) -> dict:
        meta = {"lanes": list(lanes), "micro_batches": micro_batches}
        if info is not None:
            meta.update(epoch=info.epoch, train_step=info.step, step_in_epoch=info.step_in_epoch)
        return meta

    async def _train_step(self, info: StepInfo) -> dict:
        self.round += 1
        micro_batches = self.topology.spec.training.micro_batches
        await self.broadcast(Kind.BEGIN, phase="train", step=self.round,
                             meta=self._begin_meta(info, info.lanes, micro_batches))
        done = await self._collect(Kind.DONE, set(self.nodes), self.round, "finish its step")
        commit_meta = {}
        if self.checkpoint_every > 0 and (info.step + 1) % self.checkpoint_every == 0:
            commit_meta["checkpoint"] = info.step + 1  # steps committed so far
        await self.broadcast(Kind.COMMIT, phase="train", step=self.round, meta=commit_meta)
        self.last_train_round = self.round
        self.last_lanes = tuple(info.lanes)
        tasks: dict[str, dict] = {}
        leakage: dict[str, float] = {}
        row_label_leakage: dict[str, float] = {}
        for sender, (envelope, _) in done.items():
            self.node_stats[sender] = envelope.meta
            for edge, dcor in (envelope.meta.get("leakage") or {}).items():  # worst client per edge
                if isinstance(dcor, (int, float)) and edge in self.leakage_edges:
                    leakage[edge] = max(float(dcor), leakage.get(edge, 0.0))
            for edge, auc in (envelope.meta.get("label_leakage") or {}).items():  # norm-attack AUC, worst client
                if isinstance(auc, (int, float)) and edge in self.leakage_edges:
                    row_label_leakage[edge] = max(float(auc), row_label_leakage.get(edge, 0.0))
                    self.label_leakage[edge] = row_label_leakage[edge]
            for name, stats in envelope.meta.get("tasks", {}).items():
                count = max(1, stats.get("count", 0))
                tasks[name] = {"loss": stats.get("loss_sum", 0.0) / count,
                               "accuracy": stats.get("correct", 0) / count}
        row = {"step": info.step, "epoch": info.epoch, "lanes": list(info.lanes), "tasks": tasks}
        if leakage:
            row["leakage"] = leakage
            self.leakage.update(leakage)
        if row_label_leakage:
            row["label_leakage"] = row_label_leakage
        return row

    async def _evaluate(self) -> dict:
        self.round += 1
        from meshsl.data import eval_batches
        pools = sample_pools(self.topology)
        batches = len(eval_batches(pools.test, self.topology.spec.training.eval_batch_size))
        lanes = list(range(self.topology.lanes))
        await self.broadcast(Kind.BEGIN, phase="eval", step=self.round, meta=self._begin_meta(None, lanes, batches))
        done = await self._collect(Kind.DONE, set(self.nodes), self.round, "finish evaluation")
        results: dict[str, dict] = {}
        for sender, (envelope, _) in done.items():
            for name, metrics in envelope.meta.get("tasks", {}).items():
                key = name if self.topology.lanes == 1 else f"{name}"
                entry = results.setdefault(key, {"by_client": {}})
                by_lane = metrics.pop("by_lane", None) if isinstance(metrics, dict) else None
                if self.topology.lanes > 1 and isinstance(by_lane, dict):
                    # A shared label holder evaluated every client's model: one entry per client node.
                    for lane, lane_metrics in by_lane.items():
                        entry["by_client"][self._client_node(int(lane))] = lane_metrics
                elif self.topology.lanes > 1:
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
                clients_spec = self.topology.spec.clients
                latest = self._client_node(self.last_lanes[0]) if self.last_lanes else None
                if clients_spec is not None and clients_spec.mode == "sequential" and latest in clients:
                    # Sequential SL: the model is the client that trained last (plus the server); the
                    # other clients' segments are stale until their next turn hands them the weights.
                    entry.update({k: v for k, v in clients[latest].items() if k != "confusion_matrix"})
                    entry["model"] = latest
        return results

    # -- many clients ----------------------------------------------------------------------------
    def _client_node(self, lane: int) -> str:
        """The node that is client `lane` (hosts the lane's replicated segment or data)."""
        names = self.__dict__.get("_client_names")
        if names is None:
            names = self._client_names = [n for n in [*self._replicated_segments(), *self.topology.data]
                                          if self.topology.is_replicated(n)]
        return self.topology.node_of(names[0], lane) if names else f"lane{lane}"

    def _replicated_segments(self) -> list[str]:
        return [s for s in self.topology.segment_order if self.topology.is_replicated(s)]

    async def _sync_clients(self, info: StepInfo, steps: list[StepInfo]) -> None:
        clients = self.topology.spec.clients
        if clients is None:
            return
        if clients.mode == "splitfed":
            if (info.step + 1) % clients.average_every == 0:
                await self._federated_average()
            return
        following = next((s for s in steps if s.step == info.step + 1), None)
        if following is not None and following.lanes != info.lanes:
            await self._hand_over(info.lanes[0], following.lanes[0])

    async def _pull(self, segment: str, lane: int) -> list[torch.Tensor]:
        return (await self._pull_many(segment, [lane]))[0]

    async def _pull_many(self, segment: str, lanes: list[int]) -> list[list[torch.Tensor]]:
        """The weights of `segment` from the node of each lane (distinct nodes), asked all at once."""
        nodes = [self.topology.node_of(segment, lane) for lane in lanes]
        for node in nodes:
            await self.node.send_control(node, Kind.WEIGHTS_PULL, meta={"segment": segment}, step=self.round)
        got = await self._collect(Kind.WEIGHTS, set(nodes), self.round, f"send weights of {segment}")
        return [[parts[0].reshape(d.shape).clone() for parts, d in zip(got[node][1], got[node][0].tensors)]
                for node in nodes]

    def _pull_batches(self, segment: str, lanes: range, size: int = 64) -> list[list[int]]:
        """Lanes in order, cut into batches of at most `size` lanes on distinct nodes (pulled together, so
        at most `size` clients' weights are held at once)."""
        batches: list[list[int]] = []
        current: list[int] = []
        nodes: set[str] = set()
        for lane in lanes:
            node = self.topology.node_of(segment, lane)
            if len(current) >= size or node in nodes:
                batches.append(current)
                current, nodes = [], set()
            current.append(lane)
            nodes.add(node)
        if current:
            batches.append(current)
        return batches

    async def _push(self, segment: str, lanes, weights: list[torch.Tensor]) -> None:
        from meshsl.runtime.node import _describe_all
        nodes = {self.topology.node_of(segment, lane) for lane in lanes}
        for node in nodes:
            await self.node.send_control(node, Kind.WEIGHTS, parts=[[w] for w in weights],
                                         tensors=tuple(_describe_all(weights)),
                                         meta={"segment": segment, "load": True}, step=self.round)
        await self._collect(Kind.ACK, nodes, self.round, f"load weights of {segment}")

    async def _federated_average(self) -> None:
        """FedAvg of every replicated (client) segment, weighted by each client's sample count."""
        pools = sample_pools(self.topology).train
        total = sum(len(p) for p in pools)
        for segment in self._replicated_segments():
            average = None
            for batch in self._pull_batches(segment, range(self.topology.lanes)):
                for lane, weights in zip(batch, await self._pull_many(segment, batch)):  # summed in lane order
                    share = len(pools[lane]) / total
                    scaled = [w.double() * share for w in weights]
                    average = scaled if average is None else [a + s for a, s in zip(average, scaled)]
            typed = [a.to(w.dtype) for a, w in zip(average, weights)]
            await self._push(segment, range(self.topology.lanes), typed)

    async def _hand_over(self, from_lane: int, to_lane: int) -> None:
        """Sequential split learning: the next client starts from the previous client's weights."""
        for segment in self._replicated_segments():
            weights = await self._pull(segment, from_lane)
            await self._push(segment, [to_lane], weights)

    # -- the summary -----------------------------------------------------------------------------
    def _summarise(self, steps, wall: float, train_seconds: float, samples: int) -> dict:
        edges: dict[str, dict] = {}
        for stats in self.node_stats.values():
            for key, n in stats.get("bytes", {}).items():
                edge, direction = key.split("|")
                if direction in ("forward", "backward"):  # count each transfer once, at the sender
                    edges.setdefault(edge, {"forward_bytes": 0, "backward_bytes": 0})[f"{direction}_bytes"] += n
        final_eval = next((row["eval"] for row in reversed(self.history) if "eval" in row), {})
        last_train = self.history[-1]["tasks"] if self.history else {}
        return {
            "topology": self.topology.spec.name,
            "topology_hash": self.topology.hash,
            "configurations": self.topology.recognised_configurations(),
            "steps": len(steps),
            "epochs": (steps[-1].epoch + 1) if steps else 0,
            "micro_batches": self.topology.spec.training.micro_batches,
            "schedule": self.topology.spec.training.schedule,
            "samples": samples,
            "samples_per_s": samples / train_seconds if train_seconds else 0.0,
            "wall_seconds": wall,
            "tasks": {name: {"train": last_train.get(name, {}), "eval": final_eval.get(name, {})}
                      for name in self.topology.tasks},
            "edges": edges,
            "bytes_per_sample": {e: (v["forward_bytes"] + v["backward_bytes"]) / max(samples, 1)
                                 for e, v in edges.items()},
            "rejected_messages": {n: s.get("rejected", {}) for n, s in self.node_stats.items() if s.get("rejected")},
            "failovers": self.failovers,
            "recovery_seconds": self.recovery_seconds,
            "privacy": [p.model_dump() for p in self.topology.spec.privacy],
            "label_dp": self.topology.spec.training.label_dp.model_dump() if self.topology.spec.training.label_dp else None,
            "leakage": dict(self.leakage),
            "label_leakage": dict(self.label_leakage),
            "privacy_budget": getattr(self, "privacy_budget", None),
            "hijack_check": {n: s["hijack_check"] for n, s in self.node_stats.items() if s.get("hijack_check")},
        }
