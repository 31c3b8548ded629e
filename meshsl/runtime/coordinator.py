"""The coordinator: hands the nodes runs of training steps, confirms (commits) each step once every node
reported it, drives evaluation, client averaging/hand-off, recovery and shutdown. Lives in the process of
one node (the plan's coordinator, by default the first task's label holder) and talks through that
node's transport.

Training steps are self-driven (docs/wan.md): the coordinator sends one Run per stretch of steps between
barriers (evaluation, FedAvg, sequential hand-off, the end); the nodes begin each step themselves and
report DONE after applying it; COMMIT travels behind the data. No control round trip stands between two
steps of a run."""
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
from meshsl.data import eval_batches
from meshsl.errors import ConfigError, MeshslError, NodesLost, PeerFailed, PeerTimeout, ProtocolError
from meshsl.plan.steps import StepInfo, sample_pools, training_steps
from meshsl.privacy.accounting import check_budget
from meshsl.protocol import control
from meshsl.protocol.envelope import Kind
from meshsl.protocol.frames import describe_all as _describe_all
from meshsl.runtime.policies import ClientRoster, FedAvg, planned_changes
from meshsl.runtime.prediction import coordinate_prediction

log = logging.getLogger("meshsl.coordinator")


def privacy_budget_of(topology, steps: int) -> Optional[dict]:
    """(epsilon, delta) per edge and party for a run of `steps`; PrivacyBudgetError if over a declared budget."""
    if not topology.spec.privacy and topology.spec.training.label_dp is None:
        return None
    return check_budget(topology, steps)

ROUNDS_PER_INCARNATION = 1 << 24  # round numbers of a restarted coordinator are above any earlier ones


@dataclass
class RunOptions:
    steps: Optional[int] = None
    epochs: Optional[int] = None
    evaluate: bool = True
    progress: Optional[Callable[[dict], None]] = None  # called with every history row
    predict: Optional[object] = None  # meshsl.predict.PredictSettings: prediction rounds instead of training
    startup_timeout_s: Optional[float] = None  # overrides retry.startup_timeout_s (waiting for every node)
    # Replay a run's client drops and rejoins (its summary's `client_events`) at the same steps, without
    # faults: the reference a run with drop-outs is checked against (docs/failover.md).
    client_schedule: Optional[list] = None


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
        self.heard: dict[str, float] = {}  # node -> when it was last heard from (never reset)
        self.checkpoints: dict[str, set[int]] = {}  # node -> checkpoint steps it reported
        self.endpoints: dict[str, str] = {}  # node -> endpoint it announced (standbys move nodes)
        self.predict_rows: dict[str, int] = {}  # node -> rows of its prediction input (predict runs)
        self.restarts: dict[str, int] = {}
        self.failovers = 0
        self.recovery_seconds: list[float] = []
        self._ahead: dict[tuple[Kind, int], dict[str, tuple]] = {}  # messages of rounds not collected yet
        self._deferred_checkpoint: Optional[int] = None  # written by the next Run (after FedAvg/hand-off)
        self._train_seconds, self._samples = 0.0, 0
        self.failover_events: list[dict] = []  # node, cause, detected (unix time), recovery_seconds
        self.incarnations: dict[str, str] = {}  # node -> the process token of its last HELLO
        self._last_liveness_check = time.monotonic()
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
        self.roster = ClientRoster.from_topology(self.topology)  # who takes part (clients.on_loss: drop)
        self.client_events: list[dict] = []  # drops and rejoins: node, lanes, step, cause, time
        self._planned = planned_changes(self.options.client_schedule)
        self._handed_over_for: Optional[int] = None  # sequential: the step the last hand-off prepared

    def seen(self, node: str) -> None:
        self.last_seen[node] = self.heard[node] = time.monotonic()
        self.last_seen.move_to_end(node)

    def _lost_nodes(self) -> set[str]:
        """Nodes not heard from within the heartbeat timeout (never heard from: not lost)."""
        now = time.monotonic()
        if now - self._last_liveness_check > self.policy.heartbeat_timeout_s / 2:
            # We ourselves did not run (process paused, loop starved): the silence is ours, and the
            # peers' heartbeats may still sit unread in the socket. Start their clocks afresh (a busy
            # machine starves everyone alike: lenient here; `heard` keeps the true times, see _silent).
            for name in self.last_seen:
                self.last_seen[name] = now
        self._last_liveness_check = now
        limit = now - self.policy.heartbeat_timeout_s
        lost = set()
        for name, when in self.last_seen.items():
            if when >= limit:
                break  # every later entry was seen later still
            if name != self.node.node and name in self._node_set:
                lost.add(name)
        return lost

    def _silent(self, nodes: set[str]) -> set[str]:
        """Those of `nodes` not heard from within the heartbeat timeout (never heard from: silent)."""
        limit = time.monotonic() - self.policy.heartbeat_timeout_s
        return {n for n in nodes if n != self.node.node and self.heard.get(n, 0.0) < limit}

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

    def _note_hello(self, sender: str, meta: dict) -> bool:
        """Record what a HELLO says; True when it comes from a new process of a node seen before."""
        token = meta.get("incarnation")
        restarted = False
        if isinstance(token, str):
            previous = self.incarnations.get(sender)
            self.incarnations[sender] = token
            restarted = previous is not None and previous != token
        steps = meta.get("checkpoints")
        if isinstance(steps, list):
            self.checkpoints[sender] = {s for s in steps if isinstance(s, int)}
        endpoint = meta.get("endpoint")
        if isinstance(endpoint, str) and endpoint and endpoint != self.node.endpoint_of(sender):
            if sender != self.node.node:
                self.node.reroute(sender, endpoint)  # it came back at a standby endpoint
        if isinstance(endpoint, str):
            self.endpoints[sender] = endpoint
        rows = meta.get("predict_rows")
        if isinstance(rows, int) and not isinstance(rows, bool):
            self.predict_rows[sender] = rows  # how many rows its own prediction input has (not the rows)
        if self._planned is None and self.roster.note_return(sender):
            log.warning("dropped client node %s is back; it rejoins at the next barrier", sender)
        return restarted

    # -- messages --------------------------------------------------------------------------------
    def deliver(self, sender: str, envelope, tensors) -> None:
        control.parse(envelope)  # malformed meta: ProtocolError, counted by the node, never reaches the run
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
        if round_ is not None:
            for sender, message in self._ahead.pop((kind, round_), {}).items():
                if sender in pending:
                    pending.discard(sender)
                    got[sender] = message
        deadline = time.monotonic() + (timeout or self.policy.timeout_s)
        extended = False
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                # Nodes that still heartbeat are waiting on the others (a chain behind a frozen hop): name
                # only the silent ones when there are any, so healthy processes are not replaced.
                silent = self._silent(pending)
                if not silent and not extended:  # everyone is alive, the machine is slow: once more
                    extended, deadline = True, time.monotonic() + (timeout or self.policy.timeout_s)
                    log.warning("every node is alive but %s did not %s in time; waiting once more",
                                ", ".join(sorted(pending)), what)
                    continue
                others = pending - {self.node.node}  # our own node is not replaced by our own recovery
                raise NodesLost(silent or others or pending, f"did not {what} within "
                                f"{timeout or self.policy.timeout_s:.1f}s" + (" (no heartbeat either)" if silent else ""))
            lost = self._lost_nodes()
            if lost:
                raise NodesLost(lost, f"no heartbeat for {self.policy.heartbeat_timeout_s:.1f}s", cause="heartbeat")
            try:
                sender, envelope, tensors = await self._next_message(min(left, self.policy.heartbeat_interval_s))
            except TimeoutError:
                continue
            self._observe_inbox()
            if envelope.kind == Kind.FAILED:
                raise PeerFailed(sender, str(envelope.meta.get("error", ""))[:500])
            if envelope.kind == Kind.HELLO:
                restarted = self._note_hello(sender, envelope.meta)
                await self.node.send_control(sender, Kind.ACK, meta={"of": "hello"})
                if restarted and sender != self.node.node and sender in self._node_set:  # dropped: a return
                    raise self._restarted(sender, envelope.meta)
                if kind == Kind.HELLO and sender in pending:
                    pending.discard(sender)
                    got[sender] = (envelope, tensors)
                continue
            if envelope.kind == Kind.ACK and envelope.meta.get("of") == "checkpoint":
                if isinstance(envelope.meta.get("checkpoint"), int):
                    self.checkpoints.setdefault(sender, set()).add(envelope.meta["checkpoint"])
                continue
            if envelope.kind == Kind.DONE and envelope.phase == "train":
                self.committed[sender] = max(self.committed.get(sender, 0), envelope.step)  # applied there
                if isinstance(envelope.meta.get("checkpoint"), int):
                    self.checkpoints.setdefault(sender, set()).add(envelope.meta["checkpoint"])
            if round_ is not None and envelope.step > round_ and envelope.step <= self.round \
                    and envelope.kind == kind == Kind.DONE:
                # A node already finished a later self-driven step: keep it for that step's collection.
                self._ahead.setdefault((kind, envelope.step), {})[sender] = (envelope, tensors)
                continue
            if envelope.kind != kind or sender not in pending or (round_ is not None and envelope.step != round_):
                continue  # late duplicates of earlier rounds
            pending.discard(sender)
            got[sender] = (envelope, tensors)
        return got

    async def _await_commits(self, round_: int) -> None:
        """Every node reported (DONE) that it applied the optimizer step of `round_`."""
        missing = {n for n in self.nodes if self.committed.get(n, 0) < round_}
        if round_ and missing:
            await self._collect(Kind.DONE, missing, round_, "finish its step")

    async def forward_round(self, phase: str, begin: control.Begin, what: str) -> dict[str, tuple]:
        """One coordinator-driven round (evaluation, prediction): BEGIN to every node, then every node's
        DONE as {node: (envelope, tensors)}. The public way for an application (meshsl.predict) to drive
        rounds; the round number is the coordinator's business."""
        self.round += 1
        await self.broadcast(Kind.BEGIN, phase=phase, step=self.round, meta=begin.to_meta())
        return await self._collect(Kind.DONE, set(self.nodes), self.round, what)

    async def broadcast(self, kind: Kind, targets=None, **fields) -> None:
        for name in targets or self.nodes:
            await self.node.send_control(name, kind, **fields)

    async def broadcast_shutdown(self) -> None:
        await self.broadcast(Kind.SHUTDOWN)

    async def broadcast_abort(self, reason: str) -> None:
        """The run failed: every other node stops with this reason, writes no final weights, exits non-zero."""
        others = [n for n in self.topology.nodes if n != self.node.node]  # dropped clients too
        await self.broadcast(Kind.SHUTDOWN, targets=others, meta={"abort": reason[:500]})

    def _restarted(self, node: str, hello: dict) -> "NodesLost":
        """A new process of `node` said hello mid-round: its old one is gone with the round's state."""
        return NodesLost({node}, "restarted (a new process announced itself)", cause="restarted",
                         rejoined={node: hello})

    # -- the run ---------------------------------------------------------------------------------
    async def run_to_end(self) -> None:
        """Run; any error is recorded in `error`/`exception` and aborts the run on every node."""
        try:
            await self.run()
        except Exception as exc:  # noqa: BLE001 - any coordinator error aborts the run on every node
            if not isinstance(exc, MeshslError):
                log.exception("%s: coordinator crashed", self.node.node)
            log.error("%s: coordinator stopped: %s", self.node.node, exc)
            self.error = str(exc) or type(exc).__name__
            self.exception = exc
            await self.broadcast_abort(self.error)

    async def run(self) -> None:
        unknown = {n for kind in (self._planned or {}).values() for groups in kind.values() for nodes in groups
                   for n in nodes if n not in self.roster.lane_of_node}
        if unknown:  # a replayed schedule of another topology: stop before anything trains
            raise ConfigError(f"not client nodes of this topology: {', '.join(sorted(unknown))} (clients: "
                              f"{', '.join(self.roster.lane_of_node) or 'none'})", "client_schedule")
        await self._wait_for_nodes()
        if self.options.predict is not None:
            self.summary = await coordinate_prediction(self, self.options.predict)
            await self.broadcast_shutdown()
            return
        # steps=0: no training at all (evaluate saved weights); training_steps reads 0 as "not given"
        steps = [] if self.options.steps == 0 else training_steps(self.topology, self.options.steps, self.options.epochs)
        self.privacy_budget = privacy_budget_of(self.topology, len(steps))  # over budget: stops here, before step 0
        index = await self._restore_consistent() if self.checkpoint_every > 0 else 0
        started = time.perf_counter()
        self._step_lanes = [info.lanes for info in steps]
        while index < len(steps):
            index = self._next_training_step(index)  # sequential: the turns of dropped clients are skipped
            if index is None:
                break
            end = self._barrier_after(steps, index) + 1
            try:
                await self._hand_over_past_dropped(steps, index)
                await self._run_steps(steps, index, end)
                info = steps[end - 1]
                row = self.history[-1]
                if await self._sync_clients(info, steps) and self.checkpoint_every > 0 \
                        and end % self.checkpoint_every == 0:
                    self._deferred_checkpoint = end  # written by the next Run, after the averaging/hand-off
                if self.options.evaluate and self._eval_due(info, steps):
                    row["eval"] = await self._evaluate()
                    for task, result in row["eval"].items():
                        log.info("evaluated", extra={"node": self.node.node, "step": row["step"], "task": task, **{
                            k: round(v, 5) for k, v in result.items() if k in ("loss", "accuracy", "f1", "auroc")
                            and isinstance(v, float)}})
            except NodesLost as lost:
                index = await self._recover(lost)
                continue
            if self.options.progress:
                self.options.progress(row)
            index = end
        await self._await_commits(self.last_train_round)
        eval_only = await self._evaluate() if not steps and self.options.evaluate else None
        self.summary = self._summarise(steps, time.perf_counter() - started, self._train_seconds, self._samples)
        if eval_only is not None:
            for name, result in eval_only.items():
                self.summary["tasks"].setdefault(name, {"train": {}})["eval"] = result
        self.summary["client_events"] = list(self.client_events)
        await self.broadcast_shutdown()
        await self._release_dropped()

    # -- self-driven training steps --------------------------------------------------------------
    def _eval_due(self, info: StepInfo, steps: list[StepInfo]) -> bool:
        eval_every = self.topology.spec.training.eval_every
        if eval_every:
            due = (info.step + 1) % eval_every == 0
        else:
            due = (info.step + 1) % self._epoch_length() == 0
        return due or info.step == steps[-1].step

    def _epoch_length(self) -> int:
        if getattr(self, "_epoch_len", None) is None:
            self._epoch_len = len(training_steps(self.topology, epochs=1)) or 1
        return self._epoch_len

    def _sync_due(self, info: StepInfo, steps: list[StepInfo]) -> bool:
        """After this step the coordinator changes weights (FedAvg, sequential hand-off)."""
        clients = self.topology.spec.clients
        if clients is None:
            return False
        if clients.mode == "splitfed":
            return (info.step + 1) % clients.average_every == 0
        following = self.roster.next_active(self._step_lanes, info.step + 1) if self.roster.dropped \
            else (info.step + 1 if info.step + 1 < len(steps) else None)  # the hand-off skips dropped clients
        return following is not None and steps[following].lanes != info.lanes

    def _barrier_after(self, steps: list[StepInfo], index: int) -> int:
        """The first step from `index` after which the nodes wait for the coordinator: evaluation,
        weight synchronisation, a change of the clients taking part, or the last step."""
        for i in range(index, len(steps)):
            info = steps[i]
            if self._sync_due(info, steps) or (self.options.evaluate and self._eval_due(info, steps)):
                return i
            if i + 1 < len(steps) and ((self.roster.dropped and not self.roster.active_lanes(steps[i + 1].lanes))
                                       or (self._planned and i + 1 in self._planned["drop"])):
                return i
        return len(steps) - 1

    def _next_training_step(self, index: int) -> Optional[int]:
        """The next step to train from `index`: replayed drops that take effect by then are applied, and
        steps no client taking part trains (sequential turns of dropped clients) are skipped."""
        while True:
            if self._planned:
                for step in sorted(s for s in self._planned["drop"] if s <= index):
                    for nodes in self._planned["drop"].pop(step):
                        self._note_change(self.roster.drop(nodes, step, "replayed"))
                self.nodes = self.roster.active_nodes(self.topology.nodes)
            following = self.roster.next_active(self._step_lanes, index)
            if following is None or following == index:
                return following
            index = following

    async def _run_steps(self, steps: list[StepInfo], index: int, end: int) -> None:
        """Steps [index, end) run self-driven: one Run out, then a DONE per node and step back, each
        answered by a COMMIT (the nodes stay within `lag` steps of the last commit)."""
        base = self.round
        self.round = base + (end - index)  # rounds base+1 .. base+count are this run's steps
        hold = self._sync_due(steps[end - 1], steps)
        run = control.Run(first_step=index, count=end - index, micro_batches=self.topology.spec.training.micro_batches,
                          checkpoint=self._deferred_checkpoint, hold_checkpoint=hold,
                          dropped_lanes=self.roster.dropped_lanes())
        await self.broadcast(Kind.RUN, step=base, meta=run.to_meta())
        self._deferred_checkpoint = None
        mark = time.perf_counter()
        for i in range(index, end):
            info, round_ = steps[i], base + 1 + (i - index)
            if self.roster.dropped:  # the step as trained: over the clients taking part
                info = StepInfo(info.step, info.epoch, info.step_in_epoch, self.roster.active_lanes(info.lanes))
            done = await self._collect(Kind.DONE, set(self.nodes), round_, "finish its step")
            await self.broadcast(Kind.COMMIT, phase="train", step=round_)
            now = time.perf_counter()
            self._train_seconds += now - mark
            mark = now
            self._samples += self.topology.spec.training.batch_size * len(info.lanes)
            self.last_train_round = round_
            self.last_lanes = tuple(info.lanes)
            row = self._step_row(info, done)
            row["samples_per_s"] = self._samples / self._train_seconds if self._train_seconds else 0.0
            self.history.append(row)
            log.info("step committed", extra={
                "node": self.node.node, "step": row["step"], "epoch": row["epoch"],
                "samples_per_s": round(row["samples_per_s"], 1),
                **{f"{t}_loss": round(v["loss"], 5) for t, v in row["tasks"].items()}})
            if self.options.progress and i < end - 1:
                self.options.progress(row)  # the run's last row goes out after its evaluation

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
    def _common_checkpoint(self, nodes: Optional[list[str]] = None) -> int:
        nodes = nodes or self.nodes
        common = set.intersection(*(self.checkpoints.get(n, set()) for n in nodes))
        if not common:
            raise PeerFailed(min(nodes, key=lambda n: len(self.checkpoints.get(n, ()))),
                             "no checkpoint step is shared by every node; cannot resume consistently")
        return max(common)

    async def _restore_consistent(self) -> int:
        """Every node loads the newest checkpoint they all have; returns the index of the next step."""
        step = self._common_checkpoint()
        if self.roster.rewind(step):  # readmissions after that step are replayed at their barrier again
            self.nodes = self.roster.active_nodes(self.topology.nodes)
        self._ahead.clear()
        self._deferred_checkpoint = None  # the restored checkpoint is where the run resumes
        self.round += 1
        restore_meta = {"checkpoint": step, "round": self.round, "endpoints": self.endpoints}
        await self.broadcast(Kind.RESTORE, step=self.round, meta=restore_meta)
        await self._collect_restore_acks(self.round, restore_meta)
        if step:
            log.warning("resumed every node from the checkpoint of step %d", step)
        return step

    async def _collect_restore_acks(self, round_: int, restore_meta: Optional[dict] = None) -> None:
        """Every node acknowledges the RESTORE of `round_`. The exchange is idempotent and retried: a
        node that has not answered within the heartbeat timeout, or that announces itself again (a
        lost message, a new process), is sent the same RESTORE again."""
        pending = set(self.nodes)
        deadline = time.monotonic() + self.policy.startup_timeout_s
        retry_every = self.policy.heartbeat_timeout_s
        next_retry = time.monotonic() + retry_every
        while pending:
            now = time.monotonic()
            left = deadline - now
            if left <= 0:
                raise PeerFailed(sorted(pending)[0], f"did not restore its checkpoint within "
                                                     f"{self.policy.startup_timeout_s:.1f}s")
            if restore_meta is not None and now >= next_retry:
                await self.broadcast(Kind.RESTORE, targets=sorted(pending), step=round_, meta=restore_meta)
                next_retry = now + retry_every
            try:
                sender, envelope, _ = await asyncio.wait_for(self.inbox.get(),
                                                             timeout=max(0.001, min(left, next_retry - now)))
            except TimeoutError:
                continue
            if envelope.kind == Kind.FAILED:
                raise PeerFailed(sender, str(envelope.meta.get("error", ""))[:500])
            if envelope.kind == Kind.HELLO:
                self._note_hello(sender, envelope.meta)
                await self.node.send_control(sender, Kind.ACK, meta={"of": "hello"})
                if restore_meta is not None and sender in self._node_set:
                    pending.add(sender)  # restarted after its ack, or its RESTORE got lost: again
                    await self.node.send_control(sender, Kind.RESTORE, step=round_, meta=restore_meta)
            elif envelope.kind == Kind.ACK and envelope.meta.get("of") == "restore" and envelope.step == round_:
                pending.discard(sender)

    async def _recover(self, lost: NodesLost) -> int:
        """A node is gone: abort the round everywhere, wait for it to come back (restarted by the
        launcher or its operator, possibly at a standby endpoint), restore everyone to the newest
        common checkpoint and replay from there. Returns the index of the next step."""
        started = time.perf_counter()
        if self.checkpoint_every <= 0:
            what = "dropping a client (clients.on_loss: drop) rolls the survivors back to a checkpoint, so it " \
                   "needs" if self.roster.can_drop(lost.nodes) else "recovery needs"
            raise PeerFailed(sorted(lost.nodes)[0], f"{lost}; {what} checkpoints (checkpoint.every > 0)")
        if self.roster.can_drop(lost.nodes) and self._planned is None:
            return await self._drop_clients(lost)
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
        for name, hello in lost.rejoined.items():  # its new process already announced itself
            self._note_hello(name, hello)
            self.seen(name)
        live = [n for n in self.nodes if n not in lost.nodes]
        await self.broadcast(Kind.ABORT, targets=live, step=self.round)
        missing = lost.nodes - lost.rejoined.keys()
        if missing:
            try:
                await self._wait_for_nodes(missing)
            except PeerTimeout as exc:  # say what happened first, not only that it did not come back
                raise PeerFailed(exc.peer, f"{lost}; it did not come back within {exc.waited_s:.1f}s") from None
        index = await self._restore_consistent()
        self.failovers += 1
        self.recovery_seconds.append(time.perf_counter() - started)
        self._record_failover(lost, self.recovery_seconds[-1], index)
        if self.options.progress:
            self.options.progress({"event": "recovered", "nodes": sorted(lost.nodes), "checkpoint": index,
                                   "seconds": self.recovery_seconds[-1]})
        return index

    async def _drop_clients(self, lost: NodesLost) -> int:
        """`clients.on_loss: drop`: the lost clients leave the run. The survivors roll back to the newest
        checkpoint they share and go on without them from that step (the drop's step); below
        `clients.min_clients` the run fails. Returns the index of the next step."""
        log.warning("%s; dropping the client(s), the run goes on without them", lost)
        if self.node.metrics:
            for name in lost.nodes:
                self.node.metrics.peer_up(name, False)
        if self.options.progress:  # the launcher replaces a paused process, as for a failover
            self.options.progress({"event": "nodes_lost", "nodes": sorted(lost.nodes)})
        for name in lost.nodes:
            self.checkpoints.pop(name, None)
            self.last_seen.pop(name, None)
        step = self._common_checkpoint(self.roster.survivors_after(lost.nodes, self.topology.nodes))
        change = self.roster.drop(lost.nodes, step, lost.cause)  # PeerFailed below clients.min_clients
        for name, hello in lost.rejoined.items():  # its new process announced itself already: rejoins later
            self._note_hello(name, hello)
        self.nodes = self.roster.active_nodes(self.topology.nodes)
        await self.broadcast(Kind.ABORT, step=self.round)
        index = await self._restore_consistent()
        self._note_change(change, detected=lost.detected, reason=lost.why)
        return index

    def _record_failover(self, lost: "NodesLost", seconds: float, checkpoint_step: int) -> None:
        """One entry per failover for the summary, and Prometheus counters/histograms by cause."""
        self.failover_events.append({"nodes": sorted(lost.nodes), "cause": lost.cause, "reason": lost.why,
                                     "detected": lost.detected, "recovery_seconds": seconds,
                                     "checkpoint": checkpoint_step})
        if self.node.metrics:
            self.node.metrics.failover(lost.cause)
            recovered = getattr(self.node.metrics, "recovery", None)
            if recovered is not None:
                recovered(seconds)

    def _step_row(self, info: StepInfo, done: dict) -> dict:
        """The history row of a committed step, from every node's DONE statistics."""
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
        pools = sample_pools(self.topology)
        batches = len(eval_batches(pools.test, self.topology.spec.training.eval_batch_size))
        lanes = self.roster.active_lanes(range(self.topology.lanes))  # dropped clients are not evaluated
        done = await self.forward_round("eval", control.Begin(lanes=lanes, micro_batches=batches), "finish evaluation")
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

    async def _sync_clients(self, info: StepInfo, steps: list[StepInfo]) -> bool:
        """FedAvg or sequential hand-off after this step, if due; True when weights changed. Dropped
        clients that came back are readmitted here (docs/failover.md): they get the global client weights
        (the FedAvg result, or the weights the hand-off passes on) and a fresh optimizer."""
        clients = self.topology.spec.clients
        if clients is None:
            return False
        sequential_turn_end = clients.mode == "sequential" and info.step + 1 < len(steps) \
            and steps[info.step + 1].lanes != info.lanes
        if not self._sync_due(info, steps) and not sequential_turn_end:
            return False
        rejoining = self._rejoining(info.step + 1)
        if rejoining:
            await self.broadcast(Kind.ABORT, targets=self._nodes_of(rejoining), step=self.round)  # a stale machine
        if clients.mode == "splitfed":
            await self._federated_average(rejoining)
        else:
            following = self.roster.next_active(self._step_lanes, info.step + 1, rejoining)  # may be a rejoiner
            to_lane = steps[following].lanes[0] if following is not None else None
            await self._hand_over(info.lanes[0], to_lane if to_lane != info.lanes[0] else None, rejoining)
            self._handed_over_for = following
        if rejoining:
            cause = "replayed" if self._planned else "rejoined"
            self._note_change(self.roster.readmit(rejoining, info.step + 1, cause))
            for node in self._nodes_of(rejoining):
                self.checkpoints[node] = set()  # its checkpoints from before the drop do not fit this run
                self.seen(node)
            self.nodes = self.roster.active_nodes(self.topology.nodes)
            if self.checkpoint_every > 0:
                self._deferred_checkpoint = info.step + 1  # a point every node, the rejoined too, can resume from
        return True

    async def _hand_over_past_dropped(self, steps: list[StepInfo], index: int) -> None:
        """Sequential: a turn that begins after skipped steps (a client dropped in or before its turn)
        starts from the weights of the last client taking part that trained before it (the hand-off
        skips the dropped client; what it trained in its unfinished turn is lost with it)."""
        clients = self.topology.spec.clients
        if clients is None or clients.mode != "sequential" or index == 0 or not self.roster.dropped \
                or self.roster.active_lanes(steps[index - 1].lanes) or self._handed_over_for == index:
            return
        source = self.roster.hand_off_source(self._step_lanes, index)
        if source is not None and source != steps[index].lanes[0]:
            await self._hand_over(source, steps[index].lanes[0])
        self._handed_over_for = index

    def _rejoining(self, step: int) -> tuple[int, ...]:
        """Dropped clients to readmit at the barrier before `step`: every node of theirs announced itself
        again (or, replaying a run, the recorded rejoins at `step`)."""
        if self._planned is not None:
            return tuple(sorted(lane for nodes in self._planned["rejoin"].pop(step, [])
                                for lane in {self.roster.lane_of_node[n] for n in nodes}))
        return self.roster.ready_to_rejoin()

    def _nodes_of(self, lanes) -> list[str]:
        return [n for lane in lanes for n in self.roster.nodes_of_lane[lane]]

    def _note_change(self, change, **extra) -> None:
        """A drop or rejoin: the summary's `client_events`, a progress event, a log line, metrics."""
        if change is None:
            return
        entry = {**change.to_dict(), "time": time.time(), **extra}
        self.client_events.append(entry)
        log.warning("client %s: %s from step %d (%s)", change.event, ", ".join(change.nodes), change.step,
                    change.cause)
        if self.options.progress:
            self.options.progress({"event": f"client_{change.event}", "nodes": list(change.nodes),
                                   "step": change.step, "cause": change.cause})
        counter = getattr(self.node.metrics, "client_change", None) if self.node.metrics else None
        if counter is not None:
            counter(change.event, change.cause)

    async def _release_dropped(self) -> None:
        """The end: clients dropped and not readmitted hold no final weights; those still running (back,
        or never gone: a false alarm) are told so and exit 0 without writing weights."""
        left_out = [n for n in self.topology.nodes if n in self.roster.dropped_nodes()]
        for name in left_out:
            lane = self.roster.lane_of_node[name]
            await self.node.send_control(name, Kind.SHUTDOWN, meta=control.Shutdown(
                dropped=f"client {name} was dropped from step {self.roster.dropped[lane]} and not readmitted "
                        f"before the end; it holds no final weights").to_meta())

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

    async def _push(self, segment: str, lanes, weights: list[torch.Tensor], fresh_optimizer: bool = False) -> None:
        """`fresh_optimizer`: a readmitted client also starts its optimizer afresh (docs/failover.md)."""
        nodes = {self.topology.node_of(segment, lane) for lane in lanes}
        if not nodes:
            return
        meta = {"segment": segment, "load": True, **({"fresh_optimizer": True} if fresh_optimizer else {})}
        for node in nodes:
            await self.node.send_control(node, Kind.WEIGHTS, parts=[[w] for w in weights],
                                         tensors=tuple(_describe_all(weights)), meta=meta, step=self.round)
        await self._collect(Kind.ACK, nodes, self.round, f"load weights of {segment}")

    async def _federated_average(self, rejoining: tuple[int, ...] = ()) -> None:
        """FedAvg of every replicated (client) segment over the clients taking part, weighted by each
        client's sample count (runtime/policies.py); `rejoining` clients get the result too."""
        pools = sample_pools(self.topology).train
        lanes = self.roster.active_lanes(range(self.topology.lanes))
        for segment in self._replicated_segments():
            average = FedAvg({lane: len(pools[lane]) for lane in lanes})
            for batch in self._pull_batches(segment, lanes):
                for lane, weights in zip(batch, await self._pull_many(segment, batch)):  # summed in lane order
                    average.add(lane, weights)
            typed = average.result()
            await self._push(segment, lanes, typed)
            await self._push(segment, rejoining, typed, fresh_optimizer=True)

    async def _hand_over(self, from_lane: int, to_lane: Optional[int], rejoining: tuple[int, ...] = ()) -> None:
        """Sequential split learning: the next client starts from the previous client's weights; readmitted
        clients get them too (with a fresh optimizer)."""
        if to_lane is None and not rejoining:
            return
        for segment in self._replicated_segments():
            weights = await self._pull(segment, from_lane)
            if to_lane is not None and to_lane not in rejoining:
                await self._push(segment, [to_lane], weights)
            await self._push(segment, rejoining, weights, fresh_optimizer=True)

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
            "failover_events": list(self.failover_events),
            "privacy": [p.model_dump() for p in self.topology.spec.privacy],
            "label_dp": self.topology.spec.training.label_dp.model_dump() if self.topology.spec.training.label_dp else None,
            "leakage": dict(self.leakage),
            "label_leakage": dict(self.label_leakage),
            "privacy_budget": getattr(self, "privacy_budget", None),
            "hijack_check": {n: s["hijack_check"] for n, s in self.node_stats.items() if s.get("hijack_check")},
        }
