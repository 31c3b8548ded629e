"""How a node answers the coordinator's control messages: rounds to begin or run, commits, aborts,
recovery from a checkpoint, weights to send or load, shutdown.

Each is parsed and checked (control.parse) first; a malformed or unexpected one raises ProtocolError,
which the node counts and drops while it keeps running.
"""
from __future__ import annotations

import logging
import time
from meshsl.compute.worker import RoundContext
from meshsl.errors import ProtocolError
from meshsl.schedule.steps import step_at
from meshsl.protocol import control
from meshsl.protocol.envelope import Envelope, Kind
from meshsl.protocol.frames import describe
from meshsl.machines import node as m

log = logging.getLogger("meshsl.node")


class NodeControl:
    """`runtime`: the NodeRuntime it answers for (its parts, `execute`, `send_control`, `reroute`)."""

    def __init__(self, runtime) -> None:
        self.runtime = runtime
        self.lane = runtime.lane
        self.work = runtime.work
        self.book = runtime.book
        self.machine = runtime.machine
        self.coordinator = runtime.coordinator_node

    async def _ack(self, step: int, **fields) -> None:
        await self.runtime.send_message(self.coordinator, control.Ack(**fields), step=step)

    async def on_control(self, envelope: Envelope) -> None:
        message = control.parse(envelope)  # ProtocolError (counted, node keeps running) when malformed
        if isinstance(message, control.Begin):
            await self._begin(envelope, message)
        elif isinstance(message, control.Run):
            await self._run(envelope.step, message)
        elif isinstance(message, control.Commit):
            self.runtime.execute(self.lane.handle(m.CommitRound(envelope.step)))
        elif isinstance(message, control.Restore):
            await self._restore(message)
        elif isinstance(message, control.Abort):
            self.lane.reset(self.machine.round)
            self.book.run_dropped()
            await self.lane.call(self.work.worker.discard_gradients)
        elif isinstance(message, control.WeightsPull):
            await self._send_weights(envelope, message.segment)
        elif isinstance(message, control.Shutdown):
            self._shutdown(message)

    def _shutdown(self, message: control.Shutdown) -> None:
        runtime = self.runtime
        if message.abort:  # the coordinator stopped the run on an error: a failure here too (exit non-zero)
            log.error("%s: run aborted by the coordinator (%s): %s", runtime.node, self.coordinator, message.abort)
            runtime.give_up(f"run aborted by the coordinator ({self.coordinator}): {message.abort}")
            return
        if message.dropped:  # a dropped client not readmitted: the run went on without it
            runtime.dropped = message.dropped
            log.warning("%s: %s", runtime.node, message.dropped)
        runtime.liveness.request_shutdown()
        runtime.finish_if_idle()

    async def _begin(self, envelope: Envelope, message: control.Begin) -> None:
        context = RoundContext(round=envelope.step, phase=envelope.phase, micro_batches=message.micro_batches,
                               lanes=message.lanes, epoch=message.epoch, step=message.train_step,
                               step_in_epoch=message.step_in_epoch, offset=message.offset, count=message.count)
        if envelope.phase not in ("eval", "predict"):  # training steps come in a Run
            raise ProtocolError("bad_control", f"begin of a {envelope.phase!r} round", envelope.sender)
        if envelope.step <= self.machine.round or self.machine.queued:
            raise ProtocolError("stale_round", f"begin of round {envelope.step} at round {self.machine.round}",
                                envelope.sender)
        await self.lane.call(self.work.worker.begin, context)
        self.book.round_began(message.lanes, time.perf_counter())
        log.debug("round begins", extra={"node": self.runtime.node, "step": self.book.train_step,
                                         "round": envelope.step, "phase": envelope.phase})
        self.runtime.execute(self.lane.handle(m.BeginRound(envelope.step, envelope.phase, context.lanes,
                                                      context.micro_batches)))

    async def _run(self, base: int, run: control.Run) -> None:
        """Self-driven training steps (docs/wan.md): first the checkpoint the coordinator deferred past a
        barrier (FedAvg, hand-off), then the machine begins each step on its own."""
        last = run.first_step + run.count - 1
        steps = tuple((s, step_at(self.work.one_epoch, s).lanes) for s in range(run.first_step, last + 1))
        if run.dropped_lanes:  # clients dropped from the run (clients.on_loss: drop): their lanes are not trained
            dropped = set(run.dropped_lanes)
            steps = tuple((s, tuple(lane for lane in lanes if lane not in dropped)) for s, lanes in steps)
        if self.machine.queued or not self.machine.done or base < self.machine.round:
            raise ProtocolError("unexpected", f"run from round {base + 1} while at round {self.machine.round}",
                                self.coordinator)
        deferred = self.book.deferred_checkpoint(run)
        if deferred is not None:
            await self.lane.call(self.work.checkpoints.timed_save, deferred, self.work.worker)
            await self._ack(base, of="checkpoint", checkpoint=deferred)
        self.book.run_started(run, time.perf_counter())
        # The machine begins the run's first step at once (and the others on its own): this is the line
        # tools wait for (benchmarks/startup.py times a node's start-up to it).
        log.debug("round begins", extra={"node": self.runtime.node, "step": run.first_step, "round": base + 1,
                                         "phase": "train"})
        self.runtime.execute(self.lane.handle(m.RunSteps(base + 1, steps, run.micro_batches)))

    async def _restore(self, restore: control.Restore) -> None:
        """Recovery: drop the round in progress, load the agreed checkpoint, re-route to moved peers."""
        step, base = restore.checkpoint, restore.round
        if self.book.already_restored(base):
            await self._ack(base, of="restore", checkpoint=step)
            return
        runtime = self.runtime
        for peer, endpoint in restore.endpoints.items():
            if peer in runtime.topology.nodes and peer != runtime.node and runtime.endpoint_of(peer) != endpoint:
                runtime.reroute(peer, str(endpoint))
        self.lane.reset(base)
        self.book.run_dropped()
        state = await self.lane.call(self.work.checkpoints.load, step)
        await self.lane.call(self.work.worker.restore, state)
        self.work.worker.store.drop_before(base + 1)
        fresh = step == 0 and self.book.train_step is None  # the start of a run: nothing trained, nothing lost
        self.book.restored(base)
        log.log(restore_log_level(step, fresh), "%s: restored checkpoint of step %d", runtime.node, step)
        await self._ack(base, of="restore", checkpoint=step)

    def _segment(self, segment: str, sender: str) -> str:
        if segment not in self.work.worker.modules:
            raise ProtocolError("unexpected", f"no segment {segment[:64]!r} here", sender)
        return segment

    async def _send_weights(self, envelope: Envelope, segment: str) -> None:
        self._segment(segment, envelope.sender)
        weights = await self.lane.call(self.work.worker.weights, segment)
        await self.runtime.send_message(self.coordinator, control.Weights(segment=segment), parts=[[w] for w in weights],
                                        tensors=tuple(_describe_all(weights)), step=envelope.step)

    async def on_weights(self, sender: str, envelope: Envelope, tensors: list) -> None:
        """Weights to load (from the coordinator) or to collect (for the coordinator hosted here)."""
        message = control.parse_as(envelope, control.Weights)  # checked: a malformed one is rejected, counted
        if sender == self.coordinator and message.load:
            await self._load_weights(envelope, message, tensors)
        elif self.runtime.coordinator is not None:
            self.runtime.coordinator.deliver(sender, envelope, tensors)
        else:
            raise ProtocolError("unexpected", "weights sent to a node that is not the coordinator", sender)

    def to_coordinator(self, sender: str, envelope: Envelope, tensors: list) -> None:
        """A message for the coordinator (or its acknowledgement of our hello)."""
        message = control.parse(envelope)  # typed and checked: a malformed one is rejected, counted
        if isinstance(message, control.Ack) and message.of == "hello" and sender == self.coordinator:
            self.runtime.presence.acked()
        elif self.runtime.coordinator is None:
            raise ProtocolError("unexpected", f"{envelope.kind.value} sent to a node that is not the coordinator",
                                sender)
        else:
            self.runtime.coordinator.deliver(sender, envelope, tensors)

    async def _load_weights(self, envelope: Envelope, message: control.Weights, tensors: list) -> None:
        """The coordinator sends a segment's weights (a readmitted client, a hand-off)."""
        segment = self._segment(message.segment, envelope.sender)
        worker = self.work.worker
        expected = [tuple(t.shape) for t in worker.modules[segment].state_dict().values()]
        got = [d.shape for d in envelope.tensors]
        if expected != got or any(d.codec != "none" for d in envelope.tensors):
            raise ProtocolError("bad_shape", f"weights for {segment} do not match its parameters", envelope.sender)
        values = [parts[0].reshape(d.shape) for parts, d in zip(tensors, envelope.tensors)]
        await self.lane.call(worker.load_weights, segment, values)
        if message.fresh_optimizer:  # a dropped client readmitted (docs/failover.md)
            await self.lane.call(worker.reset_optimizer, segment)
        await self._ack(envelope.step, of="weights", segment=segment)

    async def report_done(self, action: m.RoundDone) -> None:
        """A coordinator-driven round (evaluation, prediction) is finished: report it."""
        summary = await self.lane.call(self.work.round_summary, action)
        if action.phase == "predict":
            # Predictions stay with the owner of the task output: written to its own file, only counts leave.
            writer = self.runtime.inference.write if self.runtime.inference is not None else None
            summary["predicted"] = await self.lane.call(writer, self.runtime.worker) if writer else {}
        await self.runtime.send_control(self.coordinator, Kind.DONE, phase=action.phase, step=action.round,
                                        meta=summary)



def _describe_all(tensors):
    return [describe(t.dtype, tuple(t.shape), "none", [t]) for t in tensors]


def restore_log_level(step: int, fresh: bool) -> int:
    """Every run with checkpoints starts by restoring step 0 everywhere: that is DEBUG, not the WARNING a
    roll-back after a failure (or a resume) deserves."""
    return logging.DEBUG if fresh and step == 0 else logging.WARNING
