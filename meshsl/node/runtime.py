"""The asyncio node shell: turns frames into events for its parts and their decisions into I/O.

Its parts: the NodeMachine (rounds), Liveness (the coordinator's) and the CommitBook (steps,
checkpoints), all free of I/O; NodePresence (hello, heartbeats); the ComputeLane (compute off the event
loop, a chain of actions at a time) running NodeWork; NodeCheckpoints (files); PeerOutboxes (bounded,
ordered sending); NodeInbox (checks on arrivals) and NodeControl (the coordinator's commands). Every task it starts belongs to its TaskGroup. A message that fails validation
is counted by reason, logged and dropped; the node keeps running.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from meshsl.align.ids import uses_ids
from meshsl.node.align_runner import align_before_training
from meshsl.errors import ProtocolError
from meshsl.plans.nodeplan import build_edges
from meshsl.protocol import control
from meshsl.protocol.envelope import Envelope, Kind
from meshsl.protocol.frames import encode_message
from meshsl.node import faults
from meshsl.machines import liveness as lv
from meshsl.machines import node as m
from meshsl.machines.commit_book import CommitBook
from meshsl.node.compute_lane import COMPUTE_ACTIONS, ComputeChain, ComputeLane
from meshsl.node.keys_loading import transport_security
from meshsl.node.loop_post import poster_for
from meshsl.node.checkpoints import NodeCheckpoints
from meshsl.node.control import NodeControl
from meshsl.node.inbox import NodeInbox
from meshsl.node.presence import NodePresence
from meshsl.node.work import NodeWork
from meshsl.node.owned_tasks import OwnedTasks
from meshsl.node.peer_outboxes import PeerOutboxes
from meshsl.machines.schedules import RoundPlanner
from meshsl.machines.stale import StaleMachine
from meshsl.node.standby import wait_for_takeover, wait_until_free
from meshsl.node.wire import EdgeCodecs
from meshsl.transport import Transport, make_transport

log = logging.getLogger("meshsl.node")

CONTROL_FROM_COORDINATOR = {Kind.BEGIN, Kind.RUN, Kind.COMMIT, Kind.ABORT, Kind.RESTORE, Kind.WEIGHTS_PULL,
                            Kind.SHUTDOWN}
TO_COORDINATOR = {Kind.HELLO, Kind.DONE, Kind.ACK, Kind.FAILED}  # typed: control.*


@dataclass
class NodeCounters:
    """Plain counters kept even without Prometheus (they go into the run summary)."""

    bytes: dict = field(default_factory=dict)  # (edge, direction) -> bytes
    rejected: dict = field(default_factory=dict)  # reason -> count
    busy_seconds: float = 0.0

    def add_bytes(self, edge: str, direction: str, n: int) -> None:
        self.bytes[(edge, direction)] = self.bytes.get((edge, direction), 0) + n

    def reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1


class NodeRuntime:
    inbox: NodeInbox  # built by _build_parts; the transport's callbacks reach it once frames arrive
    liveness: lv.Liveness

    def __init__(self, topology, node: str, transport: Optional[Transport] = None, metrics=None,
                 coordinator_factory: Optional[Callable] = None, checkpoint_dir: Optional[Path] = None,
                 resume: bool = False, endpoint: Optional[str] = None, weights_dir: Optional[Path] = None,
                 inference=None, executor: Optional[concurrent.futures.Executor] = None,
                 bind: Optional[str] = None, peer_endpoints: Optional[dict] = None, standby: bool = False,
                 metrics_factory: Optional[Callable] = None) -> None:
        """`weights_dir`: start from saved segment weights (see entry.load_saved_weights); `inference`: a
        meshsl.apps.predict.NodeInference (this node's own prediction input/output; no checkpoints are written);
        `executor`: where compute runs (see ComputeLane); `standby`: a warm standby (docs/failover.md):
        build everything, then wait for "takeover" on stdin, take the endpoint over and resume from the
        newest checkpoint; `metrics_factory`: serves metrics then."""
        self.topology, self.node, self.spec = topology, node, topology.nodes[node]
        self.weights_dir, self.inference = weights_dir, inference
        self.coordinator_node = topology.coordinator
        self.counters = NodeCounters()
        self.metrics, self._metrics_factory = metrics, metrics_factory
        self.transport = transport or _transport_for(topology, node, endpoint, bind, peer_endpoints,
                                                      lambda reason: self.inbox.auth_refused(reason))
        self.transport.on_dropped = lambda: self.inbox.connection_dropped(
            self.stopped or self.liveness.shutdown_requested)
        self.checkpoint_dir = checkpoint_dir or Path(topology.spec.checkpoint.directory)
        self.checkpoint_every = topology.spec.checkpoint.every if inference is None else 0
        self.resume, self.standby = resume or standby, standby
        self.stood_down = False  # a standby that was never needed (its supervisor closed stdin)
        self.policy = topology.spec.retry
        self.max_message_bytes = topology.spec.security.max_message_bytes
        self.failure: Optional[str] = None
        self.aborted = False  # the run was aborted (by the coordinator, or it went silent): exit non-zero
        self.dropped: Optional[str] = None  # a dropped client at the end: no final weights (clients.on_loss)
        self.incarnation = secrets.token_hex(6)  # a restarted process announces a new one
        self._build_parts(executor)
        self.coordinator = coordinator_factory(self) if coordinator_factory and node == self.coordinator_node else None
        self.liveness = lv.Liveness(node, self.coordinator_node, topology.nodes, self.policy,
                                    self.coordinator is not None, time.monotonic())
        self.presence = NodePresence(self)
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._group: Optional[OwnedTasks] = None
        self._stopped = asyncio.Event()

    def _build_parts(self, executor: Optional[concurrent.futures.Executor]) -> None:
        topology, training, metrics = self.topology, self.topology.spec.training, (lambda: self.metrics)
        self.edges = build_edges(topology)
        self.codecs = EdgeCodecs(self.edges, aligned=training.deterministic)
        self.wiring = m.Wiring.from_topology(topology, self.node)
        self.staleness = training.staleness
        self.machine = _machine_for(self.wiring, topology)
        self.book = CommitBook(self.checkpoint_every, self.staleness)
        self.checkpoints = NodeCheckpoints(topology, self.node, self.checkpoint_dir, self.book, self.resume, metrics,
                                           lambda: self.machine.lag if self.staleness else 0)
        self.work = NodeWork(topology, self.node, self.machine, self.book, self.checkpoints, self.codecs,
                             self.counters, self.envelope, metrics, self.weights_dir, self.inference)
        self.lane = ComputeLane(self.node, self.machine, executor)
        # Messages per round per peer are bounded by the plan; outboxes hold a full round's worth.
        limit = max(64, 4 * training.micro_batches * topology.lanes * (len(self.edges) + 2))
        self.outboxes = PeerOutboxes(self.node, self.transport, limit, self.policy.timeout_s, self.counters, metrics)
        self.lane.bind(ComputeChain(self.lane, self.work, self.outboxes, self.counters, metrics, self._on_loop,
                                    self._after_compute, self._report_failure, self._wait_for_room))
        self.inbox = NodeInbox(topology, self.node, self.edges, self.codecs, self.lane, self.work, self.counters,
                               metrics)
        self.control = NodeControl(self)

    @property
    def worker(self):
        return self.work.worker

    @worker.setter
    def worker(self, worker) -> None:
        self.work.worker = worker

    @property
    def executor(self) -> concurrent.futures.Executor:
        return self.lane.executor

    # -- life cycle ------------------------------------------------------------------------------
    async def run(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self._poster = poster_for(loop)
        if not await self._start():
            await self.transport.close()
            self.lane.shutdown()
            return
        try:
            async with asyncio.TaskGroup() as group:
                owned = self._group = OwnedTasks(group)
                self.outboxes.start(owned)
                receiver = owned.create_task(self._receive_loop(), name=f"{self.node}-receive")
                self.presence.start(owned)
                if self.coordinator is not None:
                    owned.create_task(self._run_coordinator(self.coordinator), name=f"{self.node}-coordinator")
                await self._stopped.wait()
                receiver.cancel()
                await self.outboxes.drain()
                owned.cancel_all()
        finally:
            self.outboxes.stop_direct_sends()
            await self.transport.close()
            self.lane.shutdown()

    async def _start(self) -> bool:
        """Everything before the first message; False: the node does not run (a standby stood down, or
        aligning sample ids failed)."""
        if self.standby and not await self._stand_by():
            self.stood_down = True
            return False
        aligned = await align_before_training(self)  # PSI on sample ids before any data is read (meshsl.align)
        if aligned is False:
            return False
        if self.worker is None:  # (a warm standby built it while waiting)
            self.worker = await self.lane.call(self.work.build)
        await self.lane.call(self.checkpoints.prepare, self.worker)
        if aligned is None:
            await self.transport.start()
        self.liveness.handle(lv.Started(time.monotonic()))  # our own start-up is no silence of its
        return True

    async def _stand_by(self) -> bool:
        """A warm standby: everything a start needs is done now (imports, topology, and the modules,
        optimizers and data unless rows are aligned by id first); then wait for the supervisor's
        "takeover" line on stdin (EOF: stand down, False) and for the endpoint to be free."""
        if not uses_ids(self.topology):
            self.worker = await self.lane.call(self.work.build)
        log.info("%s: warm standby ready", self.node)
        if not await wait_for_takeover(self.node):
            return False
        address = self.transport.bind_address
        await wait_until_free(self.node, address, self.policy.startup_timeout_s)
        if self.metrics is None and self._metrics_factory is not None:
            self.metrics = self._metrics_factory()
        log.warning("%s: standby taking over %s", self.node, address)
        return True

    def stop(self, failure: Optional[str] = None) -> None:
        if failure and not self.failure:
            self.failure = failure
        self._stopped.set()

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    def give_up(self, reason: str, aborted: bool = True) -> None:
        """Stop with `reason`; `aborted`: the run is lost (exit non-zero)."""
        self.aborted = self.aborted or aborted
        self.stop(reason)

    def finish_if_idle(self) -> None:
        """Stop after a requested shutdown once compute has nothing left."""
        if self.liveness.finished(self.lane.idle):
            self.stop()

    async def _run_coordinator(self, coordinator: Any) -> None:
        await coordinator.run_to_end()  # never raises: an error aborts the run on every node
        if coordinator.error:
            self.aborted = True
            self.stop(coordinator.error)
        else:
            self.liveness.request_shutdown()  # its own SHUTDOWN may still be in flight
            self.finish_if_idle()

    # -- sending ---------------------------------------------------------------------------------
    def envelope(self, kind: Kind, **fields) -> Envelope:
        return Envelope(kind=kind, topology=self.topology.hash, sender=self.node, **fields)

    async def send_control(self, peer: str, kind: Kind, parts=(), **fields) -> None:
        if faults.ACTIVE and faults.drop(self.node, kind, fields.get("meta")):
            return  # chaos tests only (MESHSL_FAULTS): this message is lost
        await self.outboxes.enqueue(peer, encode_message(self.envelope(kind, **fields), parts), None)

    async def send_message(self, peer: str, message: control.ControlMessage, parts=(), **fields) -> None:
        """A typed control message (its kind and meta come from the message itself)."""
        await self.send_control(peer, message.kind, parts=parts, meta=message.to_meta(), **fields)

    def endpoint_of(self, peer: str) -> Optional[str]:
        """Where this node's transport reaches `peer` now (None: unknown)."""
        return self.transport.address_book.get(peer)

    def reroute(self, peer: str, endpoint: str) -> None:
        """`peer` now lives at `endpoint` (a standby took over): drop what was queued for the old one."""
        self.outboxes.reroute(peer, endpoint)

    # -- receiving -------------------------------------------------------------------------------
    async def _receive_loop(self) -> None:
        while True:
            sender, frames = await self.transport.recv()
            try:
                await self._on_message(sender, frames)
            except ProtocolError as exc:
                self.inbox.rejected(sender, exc)

    async def _on_message(self, sender: str, frames: list) -> None:
        envelope, tensors = self.inbox.accept(sender, frames)
        self.presence.heard(sender, envelope)
        if self.coordinator is not None:
            self.coordinator.seen(sender)
        kind = envelope.kind
        if kind in (Kind.ACTIVATION, Kind.GRADIENT):
            self.execute(self.inbox.on_tensor(sender, envelope, tensors))
        elif kind in CONTROL_FROM_COORDINATOR:
            if sender != self.coordinator_node:
                raise ProtocolError("not_coordinator", f"{kind.value} may only come from the coordinator", sender)
            await self.control.on_control(envelope)
        elif kind == Kind.WEIGHTS:
            await self.control.on_weights(sender, envelope, tensors)
        elif kind in TO_COORDINATOR:
            self.control.to_coordinator(sender, envelope, tensors)
        elif kind == Kind.HEARTBEAT:
            if self.metrics:
                self.metrics.heartbeat(sender)
                self.metrics.peer_up(sender, True)
        else:
            raise ProtocolError("unexpected", f"{kind.value} is not handled by a node", sender)

    # -- executing the machine's actions ---------------------------------------------------------
    def execute(self, actions: list) -> None:
        """On the loop: start compute (a chain on the compute thread), send tensors, report rounds."""
        for action in actions:
            if isinstance(action, COMPUTE_ACTIONS):
                self.lane.start(action)
            elif isinstance(action, (m.SendActivation, m.SendGradient)):
                self.outboxes.post(*self.work.tensor_message(action, self.machine.phase))
            elif isinstance(action, m.RoundDone):
                if self._group is None:
                    raise RuntimeError("a round finished before the node started its tasks")
                self._group.create_task(self.control.report_done(action))

    def _on_loop(self, callback, *args) -> None:
        """Run `callback(*args)` on the node's event loop (from the compute thread), in order."""
        self._poster.post(callback, *args)

    def _after_compute(self, messages: list, others: list, done) -> None:
        if self._stopped.is_set():
            return  # stopping (an aborted run): the transport may be closing under us
        for message in messages:
            self.outboxes.post(*message)
        if others:
            self.execute(others)
        if done is not None:
            summary, round_ = done
            self.outboxes.post(self.coordinator_node, encode_message(self.envelope(
                Kind.DONE, phase="train", step=round_, meta=summary)), None)
        self.finish_if_idle()

    def _report_failure(self, error: str) -> None:
        """On the loop: a compute failure the coordinator must hear (it would wait for the step otherwise)."""
        if self._group is not None and not self._stopped.is_set():
            self._group.create_task(self.send_message(self.coordinator_node, control.Failed(error=error), step=0))

    def _wait_for_room(self, peers: list) -> None:
        """On the compute thread; a shared executor must never block on one node's peer (a simulation's
        loop runs it)."""
        if self._loop is not None and self.lane.owns_executor:
            self.outboxes.wait_for_room(peers, self._loop, self._stopped)


def _transport_for(topology, node: str, endpoint: Optional[str], bind: Optional[str], peer_endpoints: Optional[dict],
                   on_auth_refused: Callable[[str], None]) -> Transport:
    address_book = {name: n.endpoint for name, n in topology.nodes.items()}
    address_book.update(peer_endpoints or {})  # per-node overrides (`meshsl node --peer`)
    # CURVE (when the topology asks for it) authenticates against its allow-list
    return make_transport(node, endpoint or topology.nodes[node].endpoint, address_book,
                          **transport_security(topology, node, on_auth_refused), **({"bind": bind} if bind else {}))


def _machine_for(wiring: m.Wiring, topology):
    """Every round keeps to its planned order (machines/schedules.py), the one `meshsl plan --schedule` prints."""
    training, planner = topology.spec.training, RoundPlanner.for_topology(topology)
    if training.staleness:  # latency hiding: several steps in flight on stashed weights (docs/wan.md)
        return StaleMachine(wiring, training.schedule, deterministic=training.deterministic,
                            staleness=training.staleness, planner=planner)
    return m.NodeMachine(wiring, training.schedule, deterministic=training.deterministic, planner=planner)
