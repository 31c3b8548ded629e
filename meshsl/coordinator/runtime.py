"""The coordinator: hands the nodes runs of training steps, confirms (commits) each step once every node
reported it, drives evaluation, client averaging/hand-off, recovery and shutdown. Lives in the process of
one node (the plan's coordinator, by default the first task's label holder) and talks through that
node's transport.

Training steps are self-driven (docs/wan.md): the coordinator sends one Run per stretch of steps between
barriers (evaluation, FedAvg, sequential hand-off, the end); the nodes begin each step themselves and
report DONE after applying it; COMMIT travels behind the data. No control round trip stands between two
steps of a run.

This module is the async driver. What incoming messages mean is decided by the I/O-free
coordinator_machine (one loop, `_drive`, feeds it the inbox and the clock and carries out its actions);
where barriers fall by coordinator_plan; what the run reports by coordinator_summary; client weights
at barriers by coordinator_clients; runs of training steps and evaluation by coordinator_training;
recovery by coordinator_recovery."""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Union

from meshsl.compute import checkpoint
from meshsl.errors import ConfigError, MeshslError, NodesLost, ProtocolError
from meshsl.schedule.steps import training_steps
from meshsl.schedule.accounting import check_budget
from meshsl.protocol import control
from meshsl.protocol.envelope import Kind
from meshsl.coordinator.clients import ClientSync
from meshsl.machines.coordinator import (
    ClientBack, Collected, CoordinatorMachine, Exited, Extended, Fail, Lost, Received, Reroute, SendAck, SendRestore,
    event_of,
)
from meshsl.machines.liveness import Tick
from meshsl.machines.coordinator_plan import StepPlanner
from meshsl.coordinator.recovery import Recovery
from meshsl.machines.coordinator_summary import RunRecord
from meshsl.coordinator.training import Training
from meshsl.machines.policies import ClientRoster, planned_changes
from meshsl.coordinator.prediction import coordinate_prediction
from meshsl.topology.model import Topology

log = logging.getLogger("meshsl.coordinator")

ROUNDS_PER_INCARNATION = 1 << 24  # round numbers of a restarted coordinator are above any earlier ones


def _now() -> float:
    return time.monotonic()  # looked up at each call: tests drive the coordinator's clock through `time`


def privacy_budget_of(topology, steps: int) -> Optional[dict]:
    """(epsilon, delta) per edge and party for a run of `steps`; PrivacyBudgetError if over a declared budget."""
    if not topology.spec.privacy and topology.spec.training.label_dp is None:
        return None
    return check_budget(topology, steps)


class QueueGauge(Protocol):
    """The node's metric the coordinator sets (its inbox depth)."""

    def queue_depth(self, queue: str, depth: int) -> None: ...


class CoordinatorHost(Protocol):
    """What the coordinator uses of the node hosting it (node/runtime.py), and nothing else."""

    node: str
    topology: Topology
    checkpoint_dir: Path
    metrics: Optional[QueueGauge]

    async def send_control(self, peer: str, kind: Kind, parts: Any = (), **fields: Any) -> None: ...

    async def send_message(self, peer: str, message: control.ControlMessage, parts: Any = (),
                           **fields: Any) -> None: ...

    def endpoint_of(self, peer: str) -> Optional[str]: ...

    def reroute(self, peer: str, endpoint: str) -> None: ...


@dataclass
class RunOptions:
    steps: Optional[int] = None
    epochs: Optional[int] = None
    evaluate: bool = True
    progress: Optional[Callable[[dict], None]] = None  # called with every history row
    predict: Optional[Any] = None  # meshsl.apps.predict.PredictSettings: prediction rounds instead of training
    startup_timeout_s: Optional[float] = None  # overrides retry.startup_timeout_s (waiting for every node)
    # Replay a run's client drops and rejoins (its summary's `client_events`) at the same steps, without
    # faults: the reference a run with drop-outs is checked against (docs/failover.md).
    client_schedule: Optional[list] = None


@dataclass
class Coordinator:
    node: CoordinatorHost
    options: RunOptions = field(default_factory=RunOptions)
    error: Optional[str] = None
    history: list = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    exception: Optional[BaseException] = None  # the typed error behind `error`

    def __post_init__(self) -> None:
        topology = self.topology = self.node.topology
        self.inbox: asyncio.Queue[Union[Received, Exited]] = asyncio.Queue(maxsize=max(256, 8 * len(topology.nodes)))
        self.checkpoint_every = topology.spec.checkpoint.every
        self.checkpoint_dir = self.node.checkpoint_dir
        self.incarnation = 0
        if self.checkpoint_every > 0:
            self.incarnation = checkpoint.read_counter(self.checkpoint_dir, "coordinator") + 1
            checkpoint.write_counter(self.checkpoint_dir, "coordinator", self.incarnation)
        self.roster = ClientRoster.from_topology(topology)  # who takes part (clients.on_loss: drop)
        self.planned = planned_changes(self.options.client_schedule)
        self.machine = CoordinatorMachine(self.node.node, list(topology.nodes), topology.spec.retry, _now(),
                                          roster=self.roster, replaying=self.planned is not None)
        self.machine.start_at(self.incarnation * ROUNDS_PER_INCARNATION)
        self.record = RunRecord({f"{p}->{c}" for p, c in topology.cut_edges()}, history=self.history,
                                regression_tasks=frozenset(t.name for t in topology.spec.tasks if t.loss == "mse"))
        self.clients = ClientSync(self)
        self.recovery = Recovery(self)
        self.training: Optional[Training] = None  # once the run's steps are known
        self.privacy_budget: Optional[dict] = None

    # -- the machine's state, for the host and tests ----------------------------------------------
    # the run's state lives in the machine: read here, changed only by its transitions
    nodes = property(lambda self: self.machine.nodes)
    round = property(lambda self: self.machine.round)
    deferred_checkpoint = property(lambda self: self.machine.deferred_checkpoint)
    policy = property(lambda self: self.machine.policy, lambda self, p: setattr(self.machine, "policy", p))
    heard = property(lambda self: self.machine.liveness.heard)
    predict_rows = property(lambda self: self.machine.book.predict_rows)

    def seen(self, node: str) -> None:
        self.machine.heard_from(node, _now())

    # -- messages ---------------------------------------------------------------------------------
    def deliver(self, sender: str, envelope, tensors) -> None:
        event = event_of(sender, envelope, tensors, 0.0)  # malformed: ProtocolError, counted by the node
        try:
            self.inbox.put_nowait(event)
        except asyncio.QueueFull:
            raise ProtocolError("flood", "coordinator inbox is full", sender) from None
        self._observe_inbox()

    def process_exited(self, node: str, pid: int) -> None:
        """The launcher saw process `pid` of `node` end (`meshsl node --exit-reports`): an event, not an error."""
        try:
            self.inbox.put_nowait(Exited(node, pid))
        except asyncio.QueueFull:
            pass  # a flooded inbox: the replacement's hello or the timeouts still tell

    def _observe_inbox(self) -> None:
        if self.node.metrics:
            self.node.metrics.queue_depth("coordinator_inbox", self.inbox.qsize())

    async def _next_message(self, timeout: float) -> Union[Received, Exited]:
        """The next inbox message (TimeoutError after `timeout`); no timer when one is already waiting."""
        try:
            return self.inbox.get_nowait()
        except asyncio.QueueEmpty:
            return await asyncio.wait_for(self.inbox.get(), timeout=timeout)

    def _known_endpoint(self, sender: str, hello: control.Hello) -> Optional[str]:
        """Where we send to `sender` now; asked only when its HELLO names an endpoint."""
        return self.node.endpoint_of(sender) if hello.endpoint else None

    async def _drive(self, actions: list) -> dict:
        """The one receive loop: carry out the machine's actions, feed it the clock and the inbox, until
        its wait ends (Collected: the results; Lost, Fail: raised)."""
        while True:
            done = await self._carry_out(actions)
            if done is not None:
                return done
            now = _now()
            done = await self._carry_out(self.machine.handle(Tick(now)))
            if done is not None:
                return done
            try:
                event = await self._next_message(self.machine.wait_s(now))
            except TimeoutError:
                actions = []
                continue
            self._observe_inbox()
            if isinstance(event, Exited):
                actions = self.machine.handle(event)
                continue
            hello = event.message if isinstance(event.message, control.Hello) else None
            endpoint = self._known_endpoint(event.sender, hello) if hello is not None else None
            actions = self.machine.handle(replace(event, now=_now(), known_endpoint=endpoint))

    async def _carry_out(self, actions: list) -> Optional[dict]:
        for action in actions:
            if isinstance(action, Reroute):
                self.node.reroute(action.node, action.endpoint)  # it came back at a standby endpoint
            elif isinstance(action, SendAck):
                await self.node.send_message(action.node, control.Ack(of=action.of))
            elif isinstance(action, SendRestore):
                await self.broadcast(action.message, targets=list(action.nodes), step=action.round)
            elif isinstance(action, ClientBack):
                log.warning("dropped client node %s is back; it rejoins at the next barrier", action.node)
            elif isinstance(action, Extended):
                log.warning("every node is alive but %s did not %s in time; waiting once more",
                            ", ".join(action.pending), action.what)
            elif isinstance(action, Collected):
                return action.results
            elif isinstance(action, Lost):
                raise NodesLost(set(action.nodes), action.why, cause=action.cause, rejoined=action.rejoined)
            elif isinstance(action, Fail):
                raise action.error
        return None

    async def collect(self, kind: Kind, senders: set[str], round_: Optional[int], what: str,
                      timeout: Optional[float] = None) -> dict[str, tuple]:
        """One `kind` message from each of `senders` (for `round_`) as {node: Received} (its parsed
        control message, and the tensors of a Weights reply)."""
        return await self._drive(self.machine.expect(kind, senders, round_, self.round, what, _now(), timeout))

    async def wait_for_nodes(self, nodes: Optional[set[str]] = None) -> None:
        """Every one of `nodes` (default: all) announced itself (HELLO); PeerTimeout past the startup timeout."""
        timeout = self.options.startup_timeout_s or self.policy.startup_timeout_s
        await self._drive(self.machine.expect_hellos(set(nodes or self.nodes), timeout, _now()))

    async def collect_restore_acks(self, round_: int, restore: Optional[control.Restore] = None) -> None:
        """Every node acknowledges the RESTORE of `round_`. The exchange is idempotent and retried: a
        node that has not answered within the heartbeat timeout, or that announces itself again (a
        lost message, a new process), is sent the same RESTORE again."""
        await self._drive(self.machine.expect_restore_acks(round_, restore, _now()))

    async def note_hello(self, sender: str, hello: control.Hello) -> None:
        """A HELLO a recovery already holds (the new process announced itself mid-round)."""
        _, actions = self.machine.note_hello(sender, hello, self._known_endpoint(sender, hello))
        await self._carry_out(actions)

    async def forward_round(self, phase: str, begin: control.Begin, what: str) -> dict[str, tuple]:
        """One coordinator-driven round (evaluation, prediction): BEGIN to every node, then every node's
        DONE as {node: Received} (`.message`: its control.Done). The public way for an application (meshsl.apps.predict) to drive
        rounds; the round number is the coordinator's business."""
        round_ = self.machine.next_round()
        await self.broadcast(begin, phase=phase, step=round_)
        return await self.collect(Kind.DONE, set(self.nodes), round_, what)

    async def broadcast(self, message: control.ControlMessage, targets=None, **fields) -> None:
        for name in targets or self.nodes:
            await self.node.send_message(name, message, **fields)

    async def broadcast_shutdown(self) -> None:
        await self.broadcast(control.Shutdown())

    async def broadcast_abort(self, reason: str) -> None:
        """The run failed: every other node stops with this reason, writes no final weights, exits non-zero."""
        others = [n for n in self.topology.nodes if n != self.node.node]  # dropped clients too
        await self.broadcast(control.Shutdown(abort=reason[:500]), targets=others)

    # -- the run ----------------------------------------------------------------------------------
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
        unknown = {n for kind in (self.planned or {}).values() for groups in kind.values() for nodes in groups
                   for n in nodes if n not in self.roster.lane_of_node}
        if unknown:  # a replayed schedule of another topology: stop before anything trains
            raise ConfigError(f"not client nodes of this topology: {', '.join(sorted(unknown))} (clients: "
                              f"{', '.join(self.roster.lane_of_node) or 'none'})", "client_schedule")
        await self.wait_for_nodes()
        if self.options.predict is not None:
            self.summary = await coordinate_prediction(self, self.options.predict)
            await self.broadcast_shutdown()
            return
        # steps=0: no training at all (evaluate saved weights); training_steps reads 0 as "not given"
        steps = [] if self.options.steps == 0 else training_steps(self.topology, self.options.steps, self.options.epochs)
        self.privacy_budget = privacy_budget_of(self.topology, len(steps))  # over budget: stops here, before step 0
        self.training = Training(self, StepPlanner(self.topology, self.roster, steps, self.options.evaluate,
                                                   self.planned))
        index = await self.recovery.restore_consistent() if self.checkpoint_every > 0 else 0
        at_start = self.topology.spec.training.eval_at_start and index == 0 and steps and self.options.evaluate
        initial = await self.training.evaluate() if at_start else None
        started = time.perf_counter()
        await self.training.train(index)
        await self.training.await_commits()
        eval_only = await self.training.evaluate() if not steps and self.options.evaluate else None
        self.summary = self.record.summarise(self.topology, steps, time.perf_counter() - started, self.privacy_budget)
        for key, results in (("eval", eval_only), ("eval_start", initial)):
            for name, result in (results or {}).items():
                self.summary["tasks"].setdefault(name, {"train": {}})[key] = result
        self.summary["client_events"] = list(self.record.client_events)
        await self.broadcast_shutdown()
        await self.clients.release_dropped()

    # -- clients taking part ----------------------------------------------------------------------
    def note_change(self, change, **extra) -> None:
        """A drop or rejoin: the summary's `client_events`, a progress event, a log line, metrics."""
        if change is None:
            return
        self.record.client_events.append({**change.to_dict(), "time": time.time(), **extra})
        log.warning("client %s: %s from step %d (%s)", change.event, ", ".join(change.nodes), change.step,
                    change.cause)
        if self.options.progress:
            self.options.progress({"event": f"client_{change.event}", "nodes": list(change.nodes),
                                   "step": change.step, "cause": change.cause})
        counter = getattr(self.node.metrics, "client_change", None) if self.node.metrics else None
        if counter is not None:
            counter(change.event, change.cause)

    def readmitted(self, lanes: tuple[int, ...], nodes: list[str], step: int) -> None:
        """Dropped clients `lanes` (on `nodes`) take part again from `step`, with the global weights."""
        self.note_change(self.roster.readmit(lanes, step, "replayed" if self.planned else "rejoined"))
        for node in nodes:
            self.machine.forget_checkpoints(node)
            self.seen(node)
        self.machine.roster_changed()
        if self.checkpoint_every > 0:
            self.machine.defer_checkpoint(step)  # a point every node, the rejoined too, can resume from
