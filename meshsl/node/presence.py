"""A node's presence to the coordinator, the I/O around Liveness: say hello until acknowledged, send
heartbeats, and carry out what Liveness decides (announce again, mark the coordinator down, give up)."""
from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Optional

from meshsl.node.owned_tasks import OwnedTasks
from meshsl.protocol import control
from meshsl.protocol.envelope import Kind
from meshsl.protocol.frames import encode_message
from meshsl.machines import liveness as lv

log = logging.getLogger("meshsl.node")


class NodePresence:
    """`runtime`: the NodeRuntime it speaks for (its liveness, outboxes, envelopes, `send_control`, `stop`)."""

    def __init__(self, runtime) -> None:
        self.runtime = runtime
        self.liveness: lv.Liveness = runtime.liveness
        self.node, self.coordinator = runtime.node, runtime.coordinator_node
        self._acked = asyncio.Event()  # wakes the announcer (Liveness.hello_acked says whether we are)
        self._owner: Optional[OwnedTasks] = None  # the running node's tasks

    def _started(self) -> OwnedTasks:
        if self._owner is None:
            raise RuntimeError("used before the node started its tasks")
        return self._owner

    def start(self, tasks) -> None:
        """Announce and heartbeat as tasks of `tasks` (the node's OwnedTasks)."""
        self._owner = tasks
        tasks.create_task(self.announce(), name=f"{self.node}-hello")
        tasks.create_task(self.heartbeats(), name=f"{self.node}-heartbeat")

    def acked(self) -> None:
        """The coordinator acknowledged our hello."""
        self.liveness.handle(lv.HelloAcked())
        self._acked.set()

    def heard(self, sender: str, envelope) -> None:
        """Any valid message: one from the coordinator proves it alive; its heartbeat names its process."""
        if sender != self.coordinator:
            return
        self.liveness.handle(lv.CoordinatorHeard(time.monotonic()))
        if envelope.kind == Kind.HEARTBEAT:
            beat = control.parse_as(envelope, control.Heartbeat)  # checked: a malformed one is rejected, counted
            self.apply(self.liveness.handle(lv.IncarnationHeard(beat.incarnation or None)))

    async def heartbeats(self) -> None:
        """Tell the coordinator we are alive; notice when it is gone and announce again to its successor."""
        while True:
            await asyncio.sleep(self.runtime.policy.heartbeat_interval_s)
            if self.apply(self.liveness.handle(lv.Tick(time.monotonic()))):
                return

    async def announce(self) -> None:
        """Say hello to the coordinator until it acknowledges (it may start after us)."""
        runtime = self.runtime
        delay, since = 0.05, time.monotonic()
        while not self.liveness.hello_acked and not runtime.stopped:
            await runtime.send_message(self.coordinator, self._hello())
            try:
                await asyncio.wait_for(self._acked.wait(), timeout=delay)
            except TimeoutError:
                delay = min(delay * 2, 1.0)
                refused = runtime.transport.refused_by.get(self.coordinator, 0)
                if self.apply(self.liveness.handle(lv.HelloUnanswered(time.monotonic(), since, refused))):
                    return

    def _hello(self) -> control.Hello:
        runtime, inference = self.runtime, self.runtime.inference
        return control.Hello(checkpoints=tuple(runtime.checkpoints.steps()), endpoint=runtime.transport.endpoint,
                             incarnation=runtime.incarnation, predict_rows=inference.rows if inference else None,
                             pid=os.getpid())

    def apply(self, decisions: list) -> bool:
        """Carry out Liveness's decisions; True once the node gives up."""
        for decision in decisions:
            if isinstance(decision, lv.SendHeartbeat):
                self._send_heartbeat(decision.peer)
            elif isinstance(decision, lv.PeerDown):
                if self.runtime.metrics:
                    self.runtime.metrics.peer_up(decision.peer, False)
            elif isinstance(decision, lv.Announce):
                log.warning("%s: coordinator %s %s; announcing again", self.node, self.coordinator, decision.reason)
                self._acked.clear()
                self._started().create_task(self.announce(), name=f"{self.node}-hello-again")
            elif isinstance(decision, lv.GiveUp):
                self.runtime.give_up(decision.reason, decision.aborted)
                return True
        return False

    def _send_heartbeat(self, peer: str) -> None:
        """Never waits: a heartbeat that does not fit a full outbox is skipped (the peer is busy or gone)."""
        outboxes = self.runtime.outboxes
        if outboxes.full(peer) or not self.liveness.heartbeat_due(peer, time.monotonic(),
                                                                  outboxes.last_sent.get(peer, 0.0)):
            return
        # The coordinator's node names its process: a peer that sees a new one (a standby took over
        # within the heartbeat timeout) announces itself again at once.
        beat = control.Heartbeat(incarnation=self.runtime.incarnation if self.liveness.hosts_coordinator else "")
        outboxes.post(peer, encode_message(self.runtime.envelope(beat.kind, meta=beat.to_meta())), None)
