"""The asyncio node: receives messages, feeds the state machine, runs compute on its own thread, sends.

Every task it starts belongs to its TaskGroup; every queue is bounded; compute never runs on the
event loop. A message that fails validation is counted by reason, logged and dropped; the node
keeps running.

Hot path: the compute thread runs a *chain* of compute actions. When one finishes it asks the state
machine (under a lock shared with the event loop) for the next, encodes the tensors to send, hands
them to the loop in one call and goes straight on, so a busy pipeline stage never waits on the event
loop between micro-batches. The loop receives, validates and sends; a message to a peer whose queue is
empty goes straight to the socket (`Transport.try_send`).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import secrets
import threading
import time
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from meshsl import checkpoint
from meshsl.align.ids import uses_ids
from meshsl.align.runner import align_before_training
from meshsl.compute.staging import to_host
from meshsl.compute.weights import load_saved_weights
from meshsl.compute.worker import RoundContext, SegmentWorker
from meshsl.errors import MeshslError, ProtocolError
from meshsl.plan.nodeplan import build_edges, edge_name
from meshsl.plan.steps import epoch_steps, step_at
from meshsl.protocol import control
from meshsl.protocol.envelope import Envelope, Kind
from meshsl.protocol.frames import decode_message, describe, encode_message
from meshsl.runtime import faults
from meshsl.runtime import machine as m
from meshsl.runtime.stale_machine import StaleMachine
from meshsl.runtime.standby import wait_for_takeover, wait_until_free
from meshsl.runtime.keys_loading import transport_security
from meshsl.runtime.loop_post import poster_for
from meshsl.runtime.outbox import Outbox
from meshsl.runtime.owned_tasks import OwnedTasks
from meshsl.runtime.wire import EdgeCodecs, max_rows
from meshsl.transport import Transport, make_transport
from meshsl.transport.base import SPOOFED_PREFIX

log = logging.getLogger("meshsl.node")

COMPUTE_ACTIONS = (m.Forward, m.Backward, m.ApplyOptimizer, m.Prepare)
CONTROL_FROM_COORDINATOR = {Kind.BEGIN, Kind.RUN, Kind.COMMIT, Kind.ABORT, Kind.RESTORE, Kind.WEIGHTS_PULL,
                            Kind.SHUTDOWN}
TO_COORDINATOR = {Kind.HELLO, Kind.DONE, Kind.ACK, Kind.FAILED}


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
    def __init__(self, topology, node: str, transport: Optional[Transport] = None, metrics=None,
                 coordinator_factory: Optional[Callable] = None, checkpoint_dir: Optional[Path] = None,
                 resume: bool = False, endpoint: Optional[str] = None, weights_dir: Optional[Path] = None,
                 inference=None, executor: Optional[concurrent.futures.Executor] = None,
                 bind: Optional[str] = None, peer_endpoints: Optional[dict] = None, standby: bool = False,
                 metrics_factory: Optional[Callable] = None) -> None:
        """`weights_dir`: start from saved segment weights (see entry.load_saved_weights); `inference`: a
        meshsl.predict.NodeInference (this node's own prediction input/output; no checkpoints are written);
        `executor`: where compute runs, one task at a time per node (default: a thread of its own; a
        simulation hosting many nodes passes one shared single-thread executor); `standby`: a warm
        standby (docs/failover.md): build everything, then wait for "takeover" on stdin, take the
        endpoint over and resume from the newest checkpoint; `metrics_factory`: serves metrics then."""
        self.topology = topology
        self.weights_dir = weights_dir
        self.inference = inference
        self.node = node
        self.spec = topology.nodes[node]
        self.coordinator_node = topology.coordinator
        address_book = {name: n.endpoint for name, n in topology.nodes.items()}
        address_book.update(peer_endpoints or {})  # per-node overrides (`meshsl node --peer`)
        if transport is None:  # CURVE (when the topology asks for it) authenticates against its allow-list
            transport = make_transport(node, endpoint or self.spec.endpoint, address_book,
                                       **transport_security(topology, node, self._on_auth_refused),
                                       **({"bind": bind} if bind else {}))
        self.transport = transport
        if hasattr(transport, "on_dropped"):
            transport.on_dropped = self._on_connection_dropped
        self.checkpoint_dir = checkpoint_dir or Path(topology.spec.checkpoint.directory)
        self.checkpoint_every = topology.spec.checkpoint.every if inference is None else 0
        self.resume = resume or standby
        self.standby = standby
        self.stood_down = False  # a standby that was never needed (its supervisor closed stdin)
        self._metrics_factory = metrics_factory
        self.policy = topology.spec.retry
        self._coordinator_seen = time.monotonic()
        self._run: Optional[control.Run] = None  # the self-driven training steps in progress (docs/wan.md)
        self._contacted = False  # heard from the coordinator at least once
        self.metrics = metrics
        self.edges = build_edges(topology)
        self.codecs = EdgeCodecs(self.edges, aligned=topology.spec.training.deterministic)
        self.wiring = m.Wiring.from_topology(topology, node)
        self.staleness = topology.spec.training.staleness
        if self.staleness:  # latency hiding: several steps in flight on stashed weights (docs/wan.md)
            self.machine = StaleMachine(self.wiring, topology.spec.training.schedule,
                                        deterministic=topology.spec.training.deterministic, staleness=self.staleness)
        else:
            self.machine = m.NodeMachine(self.wiring, topology.spec.training.schedule,
                                         deterministic=topology.spec.training.deterministic)
        self.worker: Optional[SegmentWorker] = None
        self.counters = NodeCounters()
        self.max_message_bytes = topology.spec.security.max_message_bytes
        self._owns_executor = executor is None
        self.executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"compute-{node}")
        # The state machine is fed from the loop (arrivals, control) and the compute thread (finished work).
        self._machine_lock = threading.Lock()
        # Socket use by the loop's fast path and the compute thread's direct sends is serialised by this
        # lock; the compute thread only sends to a peer whose outbox is idle (no async send in flight).
        self._send_lock = threading.Lock()
        self._direct_send = getattr(self.transport, "try_send_threadsafe", None)
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self.coordinator = coordinator_factory(self) if coordinator_factory and node == self.coordinator_node else None
        self._outboxes: dict[str, Outbox] = {}
        self._last_sent: dict[str, float] = {}  # peer -> when a message for it was last handed over
        self._last_heartbeat: dict[str, float] = {}
        self._senders: dict[str, asyncio.Task] = {}
        self._group: Optional[asyncio.TaskGroup] = None
        self._stopped = asyncio.Event()
        self._round_meta: dict = {}
        self._round_started = 0.0
        self._train_step: Optional[int] = None  # last training step begun (eval rounds follow it)
        self._hello_acked = asyncio.Event()
        self._shutdown_requested = False
        self.failure: Optional[str] = None
        self.aborted = False  # the run was aborted (by the coordinator, or it went silent): exit non-zero
        self.dropped: Optional[str] = None  # a dropped client at the end: no final weights (clients.on_loss)
        self.incarnation = secrets.token_hex(6)  # a restarted process announces a new one
        self._restored_round: Optional[int] = None
        self._joined = False  # the coordinator acknowledged us at least once
        lanes = topology.lanes
        training = topology.spec.training
        # Messages per round per peer are bounded by the plan; outboxes hold a full round's worth.
        self._outbox_size = max(64, 4 * training.micro_batches * lanes * (len(self.edges) + 2))

    # -- life cycle ------------------------------------------------------------------------------
    async def run(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self._poster = poster_for(loop)
        if self.standby and not await self._stand_by():
            self.stood_down = True
            await self.transport.close()
            if self._owns_executor:
                self.executor.shutdown(wait=True)
            return
        aligned = await align_before_training(self)  # PSI on sample ids before any data is read (meshsl.align)
        if aligned is False:
            await self.transport.close()
            if self._owns_executor:
                self.executor.shutdown(wait=True)
            return
        if self.worker is None:  # (a warm standby built it while waiting)
            self.worker = await loop.run_in_executor(self.executor, self._build_worker)
        await loop.run_in_executor(self.executor, self._prepare_checkpoints)
        if aligned is None:
            await self.transport.start()
        self._coordinator_seen = time.monotonic()  # our own start-up (torch, data) is no silence of its
        try:
            async with asyncio.TaskGroup() as group:
                group = self._group = OwnedTasks(group)
                receiver = group.create_task(self._receive_loop(), name=f"{self.node}-receive")
                group.create_task(self._announce(), name=f"{self.node}-hello")
                group.create_task(self._heartbeat_loop(), name=f"{self.node}-heartbeat")
                if self.coordinator is not None:
                    group.create_task(self._run_coordinator(), name=f"{self.node}-coordinator")
                await self._stopped.wait()
                receiver.cancel()
                await self._drain_outboxes()
                group.cancel_all()
        finally:
            with self._send_lock:  # the compute thread must not touch a socket once it may be closed
                self._direct_send = None
            await self.transport.close()
            if self._owns_executor:
                self.executor.shutdown(wait=True)

    async def _stand_by(self) -> bool:
        """A warm standby: everything a start needs is done now (imports, topology, and the modules,
        optimizers and data unless rows are aligned by id first); then wait for the supervisor's
        "takeover" line on stdin (EOF: stand down, False) and for the endpoint to be free."""
        if not uses_ids(self.topology):
            self.worker = await asyncio.get_running_loop().run_in_executor(self.executor, self._build_worker)
        log.info("%s: warm standby ready", self.node)
        if not await wait_for_takeover(self.node):
            return False
        address = getattr(self.transport, "bind", None) or self.transport.endpoint
        await wait_until_free(self.node, address, self.policy.startup_timeout_s)
        if self.metrics is None and self._metrics_factory is not None:
            self.metrics = self._metrics_factory()
        log.warning("%s: standby taking over %s", self.node, address)
        return True

    def _build_worker(self) -> SegmentWorker:
        torch.set_num_threads(self.spec.threads)
        worker = SegmentWorker(self.topology, self.node)
        if self.weights_dir is not None:
            load_saved_weights(worker, Path(self.weights_dir))
        if self.inference is not None:
            self.inference.attach(worker)
        self._one_epoch = epoch_steps(self.topology)  # the step schedule every node derives alike
        return worker

    def _prepare_checkpoints(self) -> None:
        """Fresh runs start from a step-0 checkpoint (a point every node has); resumed ones load the newest."""
        if self.checkpoint_every <= 0:
            return
        steps = checkpoint.available_steps(self.checkpoint_dir, self.node)
        if self.resume and steps:
            newest, state = checkpoint.load_newest(self.checkpoint_dir, self.node, self._model_hash)
            self.worker.restore(state)
            log.warning("%s: resumed from checkpoint of step %d", self.node, newest)
            if self.metrics:
                self.metrics.restart()
            return
        for step in steps:  # a fresh run must not mix with an earlier run's files
            (checkpoint.node_dir(self.checkpoint_dir, self.node) / f"step-{step}.pt").unlink(missing_ok=True)
        checkpoint.save(self.checkpoint_dir, self.node, 0, self.worker.state(), self._model_hash)

    def _checkpoint_steps(self) -> list[int]:
        return checkpoint.available_steps(self.checkpoint_dir, self.node) if self.checkpoint_every > 0 else []

    async def _heartbeat_loop(self) -> None:
        """Tell the coordinator we are alive; notice when it is gone and announce again to its successor."""
        interval = self.policy.heartbeat_interval_s
        while True:
            await asyncio.sleep(interval)
            if self.coordinator is not None:
                for peer in self.topology.nodes:  # the coordinator's node is watched by the launcher
                    if peer != self.node:
                        self._send_heartbeat(peer)
                continue
            self._send_heartbeat(self.coordinator_node)
            silent = time.monotonic() - self._coordinator_seen
            if self._give_up_on_coordinator(silent):
                return
            if self._hello_acked.is_set() and silent > self.policy.heartbeat_timeout_s:
                log.warning("%s: coordinator %s silent for %.1fs; announcing again", self.node,
                            self.coordinator_node, silent)
                if self.metrics:
                    self.metrics.peer_up(self.coordinator_node, False)
                self._hello_acked.clear()
                self._group.create_task(self._announce(), name=f"{self.node}-hello-again")

    def _send_heartbeat(self, peer: str) -> None:
        """Never waits: a heartbeat that does not fit a full outbox is skipped (the peer is busy or gone).

        Any message proves liveness, so a peer sent something within the interval gets a heartbeat only
        every half timeout (a coordinator of 1,000 clients would otherwise send 1,000 every interval)."""
        box = self._outboxes.get(peer)
        if box is not None and box.full:
            return
        now = time.monotonic()
        if now - self._last_sent.get(peer, 0.0) < self.policy.heartbeat_interval_s and \
                now - self._last_heartbeat.get(peer, 0.0) < self.policy.heartbeat_timeout_s / 2:
            return
        self._last_heartbeat[peer] = now
        # The coordinator's node names its process: a peer that sees a new one (a standby took over
        # within the heartbeat timeout) announces itself again at once.
        meta = {"incarnation": self.incarnation} if self.coordinator is not None else {}
        self._post(peer, encode_message(self.envelope(Kind.HEARTBEAT, meta=meta)), None)

    def _finish_if_idle(self) -> None:
        """Stop once the compute thread has nothing left (a commit's optimizer step must not be lost)."""
        if self._shutdown_requested and not self.machine.busy and self.machine.pending_commit is None \
                and not self.machine.queued:
            self.stop()

    def stop(self, failure: Optional[str] = None) -> None:
        if failure and not self.failure:
            self.failure = failure
        self._stopped.set()

    async def _run_coordinator(self) -> None:
        await self.coordinator.run_to_end()  # never raises: an error aborts the run on every node
        if self.coordinator.error:
            self.aborted = True
            self.stop(self.coordinator.error)
        else:
            self._shutdown_requested = True  # its own SHUTDOWN may still be in flight
            self._finish_if_idle()

    def _on_auth_refused(self, reason: str) -> None:
        """A peer failed CURVE authentication (unknown key, plain text): counted, never let in."""
        self.counters.reject(f"auth_{reason}")
        if self.metrics:
            self.metrics.auth_refused()
        log.warning("%s: refused a connection (%s)", self.node, reason)

    def _on_connection_dropped(self) -> None:
        """The socket dropped a connection: a frame above the message limit (refused unread, so it is
        counted here) or a peer that went away; the socket cannot tell which."""
        self.counters.reject("connection_dropped")
        if self.metrics:
            self.metrics.rejected("connection_dropped")
        log.info("%s: a connection was dropped (a frame above %s bytes, or the peer left)", self.node,
                 self.max_message_bytes)

    def _stop_if_key_refused(self, since: float) -> bool:
        """The coordinator keeps refusing our CURVE key: give up after the startup timeout."""
        refused = getattr(self.transport, "refused_by", {}).get(self.coordinator_node, 0)
        if refused and time.monotonic() - since > self.policy.startup_timeout_s:
            self.stop(f"node {self.node!r} could not join: {self.coordinator_node} refused its CURVE key "
                      f"{refused} times (check {self.node}.key_secret against the topology's keys)")
            return True
        return False

    # -- reliability: an aborted run, a silent coordinator, a crash on the compute thread ---------
    def _give_up_on_coordinator(self, silent: float) -> bool:
        """The coordinator has not been heard from past every declared timeout: the run is lost."""
        limit = coordinator_silence_limit(self.policy)
        if not self._joined or silent <= limit:  # before joining, _announce waits (longer: start-up)
            return False
        self.aborted = True
        self.stop(f"coordinator {self.coordinator_node!r} silent for {silent:.1f}s, unreachable (network partition "
                  f"or node down; limit {limit:.1f}s: retry.coordinator_timeout_s); giving up on the run")
        return True

    def _stop_if_coordinator_absent(self, since: float) -> bool:
        """Announcing with no acknowledgement for as long as the coordinator would wait for us: give up."""
        waited = time.monotonic() - since
        # Before joining, the coordinator may still be starting (importing torch on a busy machine).
        limit = coordinator_silence_limit(self.policy) + (0 if self._joined else self.policy.startup_timeout_s)
        if waited <= limit:
            return False
        self.aborted = True
        self.stop(f"coordinator {self.coordinator_node!r} did not acknowledge node {self.node!r} within "
                  f"{waited:.1f}s (limit {limit:.1f}s from retry.heartbeat_timeout_s and startup_timeout_s); "
                  f"is it running?")
        return True

    def _on_run_aborted(self, reason: str) -> None:
        """The coordinator stopped the run on an error: a failure here too (no final weights, exit non-zero)."""
        self.aborted = True
        log.error("%s: run aborted by the coordinator (%s): %s", self.node, self.coordinator_node, reason)
        self.stop(f"run aborted by the coordinator ({self.coordinator_node}): {reason}")

    def _report_compute_crash(self, future: concurrent.futures.Future) -> None:
        """A compute chain raised outside its own guard (e.g. a checkpoint write: disk full, read-only):
        the coordinator must hear the OS error, not wait for a step that never ends."""
        exc = None if future.cancelled() else future.exception()
        if exc is None:
            return
        log.error("%s: compute thread failed: %s: %s", self.node, type(exc).__name__, exc)
        self._on_loop(self._spawn_send_control, self.coordinator_node, Kind.FAILED,
                      {"error": f"{type(exc).__name__}: {exc}"[:500]}, 0)

    async def _announce(self) -> None:
        """Say hello to the coordinator until it acknowledges (it may start after us)."""
        delay, since = 0.05, time.monotonic()
        while not self._hello_acked.is_set() and not self._stopped.is_set():
            await self.send_control(self.coordinator_node, Kind.HELLO, meta={
                "checkpoints": self._checkpoint_steps(), "endpoint": self.transport.endpoint,
                "incarnation": self.incarnation,
                **({"predict_rows": self.inference.rows} if self.inference and self.inference.rows is not None else {})})
            try:
                await asyncio.wait_for(self._hello_acked.wait(), timeout=delay)
            except TimeoutError:
                delay = min(delay * 2, 1.0)
                if self._stop_if_key_refused(since) or self._stop_if_coordinator_absent(since):
                    return
        if self._hello_acked.is_set():
            self._joined = True

    async def _drain_outboxes(self) -> None:
        for box in list(self._outboxes.values()):
            try:
                await asyncio.wait_for(box.join(), timeout=5)
            except TimeoutError:
                pass

    # -- sending ---------------------------------------------------------------------------------
    def envelope(self, kind: Kind, **fields) -> Envelope:
        return Envelope(kind=kind, topology=self.topology.hash, sender=self.node, **fields)

    async def send_control(self, peer: str, kind: Kind, parts=(), **fields) -> None:
        if faults.ACTIVE and faults.drop(self.node, kind, fields.get("meta")):
            return  # chaos tests only (MESHSL_FAULTS): this message is lost
        await self._enqueue(peer, encode_message(self.envelope(kind, **fields), parts), None)

    def _outbox(self, peer: str) -> Outbox:
        box = self._outboxes.get(peer)
        if box is None:
            box = self._outboxes[peer] = Outbox(self._outbox_size)
            self._senders[peer] = self._group.create_task(self._sender(peer, box), name=f"{self.node}-send-{peer}")
        return box

    async def _enqueue(self, peer: str, frames: list, edge_direction: Optional[tuple]) -> None:
        """Send in order after what is queued for `peer`; waits while its queue is full."""
        box = self._outbox(peer)
        self._last_sent[peer] = time.monotonic()
        if not box.idle or not self._try_send(peer, frames, edge_direction):
            await box.put((frames, edge_direction))

    def _post(self, peer: str, frames: list, edge_direction: Optional[tuple]) -> None:
        """Like `_enqueue` but never waits: the caller bounds what it posts (see `_wait_for_room`)."""
        box = self._outbox(peer)
        self._last_sent[peer] = time.monotonic()
        if not box.idle or not self._try_send(peer, frames, edge_direction):
            box.post((frames, edge_direction))

    def _try_send(self, peer: str, frames: list, edge_direction: Optional[tuple]) -> bool:
        try:
            with self._send_lock:
                sent = self.transport.try_send(peer, frames)
                if sent:
                    self._count_sent(frames, edge_direction)
        except MeshslError as exc:
            log.warning("%s: dropped a message to %s: %s", self.node, peer, exc)
            return True
        return sent

    def _send_from_compute(self, peer: str, frames: list, edge_direction: tuple) -> bool:
        """On the compute thread: put a tensor message straight on the socket when nothing for `peer` is
        queued or being sent (True), saving the event loop a wake-up per message; else False."""
        box = self._outboxes.get(peer)
        if self._direct_send is None or box is None:
            return False
        with self._send_lock:
            send = self._direct_send  # None once the transport is closing
            if send is None or not box.idle:
                return False
            try:
                sent = send(peer, frames)
            except Exception:  # noqa: BLE001 - e.g. a socket closed under us: the loop's path reports it
                return False
            if sent:
                self._count_sent(frames, edge_direction)
                self._last_sent[peer] = time.monotonic()
        return sent

    def _count_sent(self, frames: list, edge_direction: Optional[tuple]) -> None:
        if edge_direction is not None:
            nbytes = sum(len(f) if isinstance(f, (bytes, memoryview)) else f.nbytes for f in frames)
            self.counters.add_bytes(*edge_direction, nbytes)
            if self.metrics:
                self.metrics.message(edge_direction[0], "sent", nbytes)

    async def _sender(self, peer: str, box: Outbox) -> None:
        """One sender per peer keeps per-peer order and never blocks the receive loop."""
        while True:
            frames, edge_direction = await box.get()
            if self.metrics:
                self.metrics.queue_depth(f"outbox:{peer}", len(box))
            try:
                # A peer that cannot take a message within the policy's timeout is gone; the
                # coordinator's recovery replays the round, so the message is dropped, not queued forever.
                await asyncio.wait_for(self.transport.send(peer, frames), timeout=self.policy.timeout_s)
                with self._send_lock:  # the compute thread counts its direct sends too
                    self._count_sent(frames, edge_direction)
            except (MeshslError, TimeoutError) as exc:
                log.warning("%s: dropped a message to %s: %s", self.node, peer, exc or "timed out")
            finally:
                box.done()

    def endpoint_of(self, peer: str) -> Optional[str]:
        """Where this node's transport reaches `peer` now (None: unknown)."""
        return self.transport.address_book.get(peer)

    def reroute(self, peer: str, endpoint: str) -> None:
        """`peer` now lives at `endpoint` (a standby took over): drop what was queued for the old one."""
        with self._send_lock:  # not while the compute thread is sending on the old socket
            self.transport.reroute(peer, endpoint)
        sender = self._senders.pop(peer, None)
        if sender is not None:
            sender.cancel()
        self._outboxes.pop(peer, None)

    # -- receiving -------------------------------------------------------------------------------
    async def _receive_loop(self) -> None:
        while True:
            sender, frames = await self.transport.recv()
            try:
                await self._on_message(sender, frames)
            except ProtocolError as exc:
                self.counters.reject(exc.reason)
                if self.metrics:
                    self.metrics.rejected(exc.reason)
                log.warning("%s: rejected message from %r: %s", self.node, sender[:64], exc)

    async def _on_message(self, sender: str, frames: list) -> None:
        if sender.startswith(SPOOFED_PREFIX):  # CURVE identity and routing id disagree
            raise ProtocolError("spoofed_sender", "routing id differs from the authenticated node", sender[1:])
        envelope, tensors = decode_message(frames, self.max_message_bytes)
        if envelope.topology != self.topology.hash:
            raise ProtocolError("wrong_topology", f"topology hash {envelope.topology[:20]!r}", sender)
        if envelope.sender != sender:
            raise ProtocolError("spoofed_sender", f"header names {envelope.sender[:64]!r}", sender)
        if sender not in self.topology.nodes:
            raise ProtocolError("unknown_peer", "not a node of this topology", sender)
        if sender == self.coordinator_node:
            self._coordinator_seen = time.monotonic()
            self._contacted = True
        if self.coordinator is not None:
            self.coordinator.seen(sender)
        kind = envelope.kind
        if kind in (Kind.ACTIVATION, Kind.GRADIENT):
            self._on_tensor(sender, envelope, tensors)
        elif kind in CONTROL_FROM_COORDINATOR:
            if sender != self.coordinator_node:
                raise ProtocolError("not_coordinator", f"{kind.value} may only come from the coordinator", sender)
            await self._on_control(envelope, tensors)
        elif kind == Kind.WEIGHTS:
            if sender == self.coordinator_node and envelope.meta.get("load"):
                await self._on_load_weights(envelope, tensors)
            elif self.coordinator is not None:
                self.coordinator.deliver(sender, envelope, tensors)
            else:
                raise ProtocolError("unexpected", "weights sent to a node that is not the coordinator", sender)
        elif kind in TO_COORDINATOR:
            message = control.parse(envelope)  # typed and checked: a malformed one is rejected, counted
            if kind == Kind.ACK and message.of == "hello" and sender == self.coordinator_node:
                self._hello_acked.set()
            elif self.coordinator is None:
                raise ProtocolError("unexpected", f"{kind.value} sent to a node that is not the coordinator", sender)
            else:
                self.coordinator.deliver(sender, envelope, tensors)
        elif kind == Kind.HEARTBEAT:
            if sender == self.coordinator_node and self.coordinator is None:
                self._check_coordinator_incarnation(envelope.meta.get("incarnation"))
            if self.metrics:
                self.metrics.heartbeat(sender)
                self.metrics.peer_up(sender, True)
        else:
            raise ProtocolError("unexpected", f"{kind.value} is not handled by a node", sender)

    def _check_coordinator_incarnation(self, token) -> None:
        """A heartbeat from a new process of the coordinator's node: it knows nothing of us yet."""
        if not isinstance(token, str) or len(token) > 64:
            return
        previous, self._coordinator_incarnation = getattr(self, "_coordinator_incarnation", None), token
        if previous is not None and previous != token and self._hello_acked.is_set():
            log.warning("%s: coordinator %s restarted; announcing again", self.node, self.coordinator_node)
            self._hello_acked.clear()
            self._group.create_task(self._announce(), name=f"{self.node}-hello-again")

    def _on_tensor(self, sender: str, envelope: Envelope, tensors: list) -> None:
        edge = self.edges.get(envelope.edge)
        if edge is None:
            raise ProtocolError("unknown_edge", f"edge {envelope.edge[:64]!r}", sender)
        lane, mb = envelope.lane, envelope.micro_batch
        if lane >= self.topology.lanes:
            raise ProtocolError("bad_lane", f"lane {lane}", sender)
        forward = envelope.kind == Kind.ACTIVATION
        expected_sender = self.topology.node_of(edge.producer if forward else edge.consumer, lane)
        receiver = self.topology.node_of(edge.consumer if forward else edge.producer, lane)
        if receiver != self.node or expected_sender != sender:
            raise ProtocolError("wrong_peer", f"{envelope.edge} lane {lane} is not between {sender} and me", sender)
        if len(envelope.tensors) != 1:
            raise ProtocolError("bad_frame_count", "one tensor per activation/gradient message", sender)
        training = self.topology.spec.training
        rows = max_rows(training.batch_size, training.micro_batches) if envelope.phase == "train" \
            else max(training.eval_batch_size, training.batch_size)
        tensor = self.codecs.decode(edge, "act" if forward else "grad", envelope.tensors[0], tensors[0], rows)
        if forward:
            event = m.InputArrived(envelope.step, edge.consumer, edge.producer, lane, mb)
        else:
            event = m.GradientArrived(envelope.step, edge.producer, edge.consumer, lane, mb)
        store = self.worker.store
        with self._machine_lock:  # the compute thread may pick the unit up as soon as the lock is released
            actions = self.machine.handle(event)  # raises (and stores nothing) for unexpected messages
            if forward:
                store.inputs[(envelope.step, edge.consumer, edge.producer, lane, mb)] = tensor
            else:
                store.grads[(envelope.step, edge.producer, lane, mb)].append((edge.consumer, tensor))
        nbytes = sum(p.nbytes for p in tensors[0])
        self.counters.add_bytes(edge.name, ("forward" if forward else "backward") + "_received", nbytes)
        if self.metrics:
            self.metrics.message(edge.name, "received", nbytes)
        self._execute(actions)

    async def _on_control(self, envelope: Envelope, tensors: list) -> None:
        loop = asyncio.get_running_loop()
        message = control.parse(envelope)  # ProtocolError (counted, node keeps running) when malformed
        if isinstance(message, control.Begin):
            context = RoundContext(round=envelope.step, phase=envelope.phase, micro_batches=message.micro_batches,
                                   lanes=message.lanes, epoch=message.epoch, step=message.train_step,
                                   step_in_epoch=message.step_in_epoch, offset=message.offset, count=message.count)
            if envelope.phase not in ("eval", "predict"):  # training steps come in a Run
                raise ProtocolError("bad_control", f"begin of a {envelope.phase!r} round", envelope.sender)
            if envelope.step <= self.machine.round or self.machine.queued:
                raise ProtocolError("stale_round", f"begin of round {envelope.step} at round {self.machine.round}",
                                    envelope.sender)
            await loop.run_in_executor(self.executor, self.worker.begin, context)
            self._round_meta = {"lanes": list(message.lanes)}
            self._round_started = time.perf_counter()
            log.debug("round begins", extra={"node": self.node, "step": self._train_step,
                                             "round": envelope.step, "phase": envelope.phase})
            self._execute(self._handle(m.Begin(envelope.step, envelope.phase, context.lanes, context.micro_batches)))
        elif isinstance(message, control.Run):
            await self._on_run(envelope.step, message)
        elif isinstance(message, control.Commit):
            self._execute(self._handle(m.Commit(envelope.step)))
        elif isinstance(message, control.Restore):
            await self._restore(message)
        elif isinstance(message, control.Abort):
            with self._machine_lock:
                self.machine.reset(self.machine.round)
            self._run = None
            await loop.run_in_executor(self.executor, self.worker.discard_gradients)
        elif isinstance(message, control.WeightsPull):
            segment = message.segment
            if segment not in self.worker.modules:
                raise ProtocolError("unexpected", f"no segment {segment[:64]!r} here", envelope.sender)
            weights = await loop.run_in_executor(self.executor, self.worker.weights, segment)
            await self.send_control(self.coordinator_node, Kind.WEIGHTS, parts=[[w] for w in weights],
                                    tensors=tuple(_describe_all(weights)), meta={"segment": segment},
                                    step=envelope.step)
        elif isinstance(message, control.Shutdown):
            if message.abort:
                self._on_run_aborted(message.abort)
                return
            if message.dropped:  # a dropped client not readmitted: the run went on without it
                self.dropped = message.dropped
                log.warning("%s: %s", self.node, message.dropped)
            self._shutdown_requested = True
            self._finish_if_idle()

    async def _on_run(self, base: int, run: control.Run) -> None:
        """Self-driven training steps (docs/wan.md): first the checkpoint the coordinator deferred past a
        barrier (FedAvg, hand-off), then the machine begins each step on its own."""
        last = run.first_step + run.count - 1
        steps = tuple((s, step_at(self._one_epoch, s).lanes) for s in range(run.first_step, last + 1))
        if run.dropped_lanes:  # clients dropped from the run (clients.on_loss: drop): their lanes are not trained
            dropped = set(run.dropped_lanes)
            steps = tuple((s, tuple(lane for lane in lanes if lane not in dropped)) for s, lanes in steps)
        if self.machine.queued or not self.machine.done or base < self.machine.round:
            raise ProtocolError("unexpected", f"run from round {base + 1} while at round {self.machine.round}",
                                self.coordinator_node)
        if run.checkpoint is not None and self.checkpoint_every > 0:
            await asyncio.get_running_loop().run_in_executor(self.executor, self._timed_checkpoint, run.checkpoint)
            await self.send_control(self.coordinator_node, Kind.ACK,
                                    meta={"of": "checkpoint", "checkpoint": run.checkpoint}, step=base)
        self._run = run
        self._round_started = time.perf_counter()
        self._execute(self._handle(m.Run(base + 1, steps, run.micro_batches)))

    async def _restore(self, restore: control.Restore) -> None:
        """Recovery: drop the round in progress, load the agreed checkpoint, re-route to moved peers."""
        step, base = restore.checkpoint, restore.round
        if self._restored_round == base:  # a retried RESTORE (our ack was lost): acknowledge again, load once
            await self.send_control(self.coordinator_node, Kind.ACK, meta={"of": "restore", "checkpoint": step},
                                    step=base)
            return
        for peer, endpoint in restore.endpoints.items():
            if peer in self.topology.nodes and peer != self.node and self.transport.address_book.get(peer) != endpoint:
                self.reroute(peer, str(endpoint))
        with self._machine_lock:
            self.machine.reset(base)
        self._run = None
        state = await asyncio.get_running_loop().run_in_executor(
            self.executor, checkpoint.load, self.checkpoint_dir, self.node, step, self._model_hash)
        await asyncio.get_running_loop().run_in_executor(self.executor, self.worker.restore, state)
        self.worker.store.drop_before(base + 1)
        self._restored_round = base
        log.warning("%s: restored checkpoint of step %d", self.node, step)
        await self.send_control(self.coordinator_node, Kind.ACK, meta={"of": "restore", "checkpoint": step}, step=base)

    async def _on_load_weights(self, envelope: Envelope, tensors: list) -> None:
        segment = str(envelope.meta.get("segment"))
        if segment not in self.worker.modules:
            raise ProtocolError("unexpected", f"no segment {segment[:64]!r} here", envelope.sender)
        expected = [tuple(t.shape) for t in self.worker.modules[segment].state_dict().values()]
        got = [d.shape for d in envelope.tensors]
        if expected != got or any(d.codec != "none" for d in envelope.tensors):
            raise ProtocolError("bad_shape", f"weights for {segment} do not match its parameters", envelope.sender)
        values = [parts[0].reshape(d.shape) for parts, d in zip(tensors, envelope.tensors)]
        await asyncio.get_running_loop().run_in_executor(self.executor, self.worker.load_weights, segment, values)
        if envelope.meta.get("fresh_optimizer") is True:  # a dropped client readmitted (docs/failover.md)
            await asyncio.get_running_loop().run_in_executor(self.executor, self.worker.reset_optimizer, segment)
        await self.send_control(self.coordinator_node, Kind.ACK, meta={"of": "weights", "segment": segment},
                                step=envelope.step)

    # -- executing the machine's actions ---------------------------------------------------------
    def _handle(self, event) -> list:
        with self._machine_lock:
            return self.machine.handle(event)

    def _execute(self, actions: list) -> None:
        """On the loop: start compute (a chain on the compute thread), send tensors, report rounds."""
        for action in actions:
            if isinstance(action, COMPUTE_ACTIONS):
                self.executor.submit(self._compute_chain, action).add_done_callback(self._report_compute_crash)
            elif isinstance(action, (m.SendActivation, m.SendGradient)):
                self._post(*self._tensor_message(action, self.machine.phase))
            elif isinstance(action, m.RoundDone):
                self._group.create_task(self._report_done(action))

    def _compute_chain(self, action) -> None:
        """On the compute thread: run `action`, then whatever the machine says comes next, until nothing does.

        Outgoing tensors are encoded here (codecs are compute) and handed to the loop once per action."""
        while action is not None:
            start = time.perf_counter()
            try:
                self._run_compute(action)
            except Exception as exc:  # a local compute failure: report it, do not hang the topology
                log.exception("%s: %s failed", self.node, type(action).__name__)
                self._on_loop(self._spawn_send_control, self.coordinator_node, Kind.FAILED,
                              {"error": f"{type(exc).__name__}: {exc}"[:500]}, 0)
                return
            seconds = time.perf_counter() - start
            self.counters.busy_seconds += seconds
            if self.metrics and isinstance(action, (m.Forward, m.Backward)):
                self.metrics.microbatch(action.segment, "forward" if isinstance(action, m.Forward) else "backward",
                                        seconds)
            with self._machine_lock:
                actions = self.machine.handle(m.ComputeFinished(action))
                phase = self.machine.phase
            action, messages, others, done = None, [], [], None
            for follow in actions:
                if isinstance(follow, COMPUTE_ACTIONS):
                    action = follow
                elif isinstance(follow, (m.SendActivation, m.SendGradient)):
                    message = self._tensor_message(follow, phase)
                    if not self._send_from_compute(*message):
                        messages.append(message)
                elif isinstance(follow, m.RoundDone) and follow.phase == "train":
                    try:  # before the next step's Prepare resets the statistics
                        if self.staleness:
                            self.worker.use_round(follow.round)
                        done = self._step_applied(follow)
                    except Exception as exc:  # e.g. the checkpoint could not be written: the run must know
                        log.exception("%s: finishing step of round %d failed", self.node, follow.round)
                        self._on_loop(self._spawn_send_control, self.coordinator_node, Kind.FAILED,
                                      {"error": f"{type(exc).__name__}: {exc}"[:500]}, 0)
                        return
                else:
                    others.append(follow)
            if messages or others or done is not None or action is None:  # a wake-up only when there is news
                self._on_loop(self._after_compute, messages, others, done)
            if action is not None and messages:
                self._wait_for_room([peer for peer, _, _ in messages])

    def _step_applied(self, action: m.RoundDone) -> tuple:
        """On the compute thread, right after a self-driven step's optimizer step: its statistics, and its
        checkpoint when due (a step ending at a weight-changing barrier leaves that to the next Run)."""
        step = self.worker.context.step
        summary = self._round_summary(action)
        run = self._run
        held = run is not None and run.hold_checkpoint and step == run.first_step + run.count - 1
        if self.checkpoint_every > 0 and (step + 1) % self.checkpoint_every == 0 and not held:
            self._timed_checkpoint(step + 1)
            summary["checkpoint"] = step + 1
        self._round_started = time.perf_counter()
        return summary, action.round

    def _timed_checkpoint(self, step: int) -> None:
        started = time.perf_counter()
        self._save_checkpoint(step)
        if self.metrics:
            self.metrics.checkpoint(time.perf_counter() - started, step)

    def _run_compute(self, action) -> None:
        worker = self.worker
        if self.staleness and not isinstance(action, m.Prepare):
            worker.use_round(action.round)  # several training rounds are in flight
        if isinstance(action, m.Forward):
            worker.forward(action.segment, action.lane, action.micro_batch)
        elif isinstance(action, m.Backward):
            worker.backward(action.segment, action.lane, action.micro_batch)
        elif isinstance(action, m.Prepare):
            info = step_at(self._one_epoch, action.step)
            worker.begin(RoundContext(round=action.round, phase="train", micro_batches=self.machine.micro_batches,
                                      lanes=action.lanes, epoch=info.epoch, step=info.step,
                                      step_in_epoch=info.step_in_epoch))
            self._round_meta = {"lanes": action.lanes}  # shared tuple (a copy per node: clients squared)
            self._train_step = info.step
            if self.metrics:
                self.metrics.progress(info.step, info.epoch)
        else:
            worker.apply_optimizer(action.round)

    def _on_loop(self, callback, *args) -> None:
        """Run `callback(*args)` on the node's event loop (from the compute thread), in order."""
        self._poster.post(callback, *args)

    def _after_compute(self, messages: list, others: list, done) -> None:
        if self._stopped.is_set():
            return  # stopping (an aborted run): the transport may be closing under us
        for message in messages:
            self._post(*message)
        if others:
            self._execute(others)
        if done is not None:
            summary, round_ = done
            self._post(self.coordinator_node, encode_message(self.envelope(
                Kind.DONE, phase="train", step=round_, meta=summary)), None)
        self._finish_if_idle()

    def _spawn_send_control(self, peer: str, kind: Kind, meta: dict, step: int) -> None:
        if self._group is not None and not self._stopped.is_set():
            self._group.create_task(self.send_control(peer, kind, meta=meta, step=step))

    def _wait_for_room(self, peers: list) -> None:
        """Backpressure on the compute thread: do not produce more for a peer whose queue is full."""
        boxes = [self._outboxes.get(peer) for peer in peers]
        if not any(box is not None and box.full for box in boxes):
            return
        if self._loop is None or self._owns_executor is False:
            return  # a shared executor must never block on one node's peer (a simulation's loop runs it)

        async def room() -> None:
            for peer in peers:
                box = self._outboxes.get(peer)
                if box is not None:
                    await box.wait_for_room()

        while not self._stopped.is_set():
            future = asyncio.run_coroutine_threadsafe(room(), self._loop)
            try:
                future.result(timeout=1.0)
                return
            except concurrent.futures.TimeoutError:
                future.cancel()
            except (RuntimeError, concurrent.futures.CancelledError):
                return

    def _tensor_message(self, action, phase: str) -> tuple:
        """(peer, frames, (edge, direction)) for a SendActivation/SendGradient."""
        forward = isinstance(action, m.SendActivation)
        edge = edge_name(action.producer, action.consumer)
        store = self.worker.store
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

    async def _report_done(self, action: m.RoundDone) -> None:
        """A coordinator-driven round (evaluation, prediction) is finished: report it."""
        loop = asyncio.get_running_loop()
        summary = await loop.run_in_executor(self.executor, self._round_summary, action)
        if action.phase == "predict":
            # Predictions stay with the owner of the task output: written to its own file, only counts leave.
            writer = self.inference.write if self.inference is not None else None
            summary["predicted"] = await loop.run_in_executor(self.executor, writer, self.worker) if writer else {}
        await self.send_control(self.coordinator_node, Kind.DONE, phase=action.phase, step=action.round,
                                meta=summary)

    def _round_summary(self, action: m.RoundDone) -> dict:
        """On the compute thread: what the coordinator learns about a finished round (no sample data)."""
        summary = self.worker.round_summary()
        wall = time.perf_counter() - self._round_started
        compute = dict(self.worker.compute_seconds)
        summary["compute_seconds"] = sum(compute.values())
        summary["wall_seconds"] = wall
        summary["bytes"] = {f"{e}|{d}": n for (e, d), n in list(self.counters.bytes.items())}
        summary["rejected"] = dict(self.counters.rejected)
        if self.metrics and action.phase == "train":
            for segment in self.worker.segments:
                busy = compute.get((segment, "forward"), 0.0) + compute.get((segment, "backward"), 0.0)
                self.metrics.bubble(segment, max(0.0, 1.0 - busy / wall) if wall > 0 else 0.0)
        if self.metrics:
            self._observe_round(action.phase, summary, wall)
            for edge, dcor in summary.get("leakage", {}).items():
                self.metrics.leakage(edge, dcor)
            for edge, auc in summary.get("label_leakage", {}).items():
                self.metrics.label_leakage(edge, auc)
            for key, eps in summary.get("privacy_spent", {}).items():
                self.metrics.privacy_epsilon(*key.split("|"), eps)
        log.info("round done", extra={"node": self.node, "step": self._train_step, "round": action.round,
                                      "phase": action.phase, "seconds": round(wall, 4),
                                      "busy_seconds": round(summary["compute_seconds"], 4)})
        return summary

    def _observe_round(self, phase: str, summary: dict, wall: float) -> None:
        """Prometheus: this node's samples and step time, and the loss/metrics of each task it owns."""
        if phase == "train":
            lanes = [lane for lane in self._round_meta.get("lanes", [])
                     if any(self.topology.node_of(s, lane) == self.node for s in self.worker.segments)]
            samples = self.topology.spec.training.batch_size * len(lanes)
            if samples:
                self.metrics.step_done(wall, samples)
        kinds = {t.name: t.loss for t in self.topology.spec.tasks}
        for task, stats in summary.get("tasks", {}).items():
            if phase == "train" and stats.get("count"):
                count = stats["count"]
                metrics = {} if kinds.get(task) == "mse" else {"accuracy": stats.get("correct", 0) / count}
                self.metrics.task(task, stats.get("loss_sum", 0.0) / count, metrics, "train")
            elif phase == "eval" and _finite(stats.get("loss")):
                metrics = {k: float(v) for k, v in stats.items() if k in ("accuracy", "f1", "auroc") and _finite(v)}
                self.metrics.task(task, float(stats["loss"]), metrics, "eval")

    def _save_checkpoint(self, step: int) -> None:
        # Staleness k: nodes may be up to lag = k + 3 steps apart, and all must still share a checkpoint.
        keep = checkpoint.KEEP + (self.machine.lag // max(1, self.checkpoint_every) + 1 if self.staleness else 0)
        checkpoint.save(self.checkpoint_dir, self.node, step, self.worker.state(), self._model_hash, keep=keep)

    @property
    def _model_hash(self) -> str:
        """What this node's checkpoints hold (checkpoint.model_hash), computed once."""
        cached = self.__dict__.get("_model_hash_value")
        if cached is None:
            cached = self.__dict__["_model_hash_value"] = checkpoint.model_hash(self.topology)
        return cached


def coordinator_silence_limit(policy) -> float:
    """How long a node waits for a silent coordinator (it may be restarted meanwhile) before giving up."""
    declared = getattr(policy, "coordinator_timeout_s", None)
    return declared if declared else policy.heartbeat_timeout_s + policy.startup_timeout_s


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _describe_all(tensors):
    return [describe(t.dtype, tuple(t.shape), "none", [t]) for t in tensors]
