"""Recovery at the coordinator (docs/failover.md): a lost node is waited for (restarted by the launcher
or its operator, possibly at a standby endpoint) or, for clients with `clients.on_loss: drop`, dropped;
then every node rolls back to the newest checkpoint they all have and the run replays from there."""
from __future__ import annotations

import logging
import time

from meshsl.errors import NodesLost, PeerFailed, PeerTimeout
from meshsl.protocol import control

log = logging.getLogger("meshsl.coordinator")


class Recovery:
    """Recovers the run of `coordinator` (the async driver) from lost nodes."""

    def __init__(self, coordinator) -> None:
        self.coordinator = coordinator
        self.restarts: dict[str, int] = {}  # node -> failovers it needed so far

    async def restore_consistent(self) -> int:
        """Every node loads the newest checkpoint they all have; returns the index of the next step."""
        coordinator = self.coordinator
        step = coordinator.machine.book.common_checkpoint(coordinator.nodes)
        if coordinator.roster.rewind(step):  # readmissions after that step are replayed at their barrier again
            coordinator.machine.roster_changed()
        round_ = coordinator.machine.restoring()  # the restored checkpoint is where the run resumes
        restore = control.Restore(checkpoint=step, round=round_, endpoints=dict(coordinator.machine.book.endpoints))
        await coordinator.broadcast(restore, step=round_)
        await coordinator.collect_restore_acks(round_, restore)
        if step:
            log.warning("resumed every node from the checkpoint of step %d", step)
        return step

    async def recover(self, lost: NodesLost) -> int:
        """A node is gone: abort the round everywhere, wait for it to come back, restore everyone to the
        newest common checkpoint and replay from there. Returns the index of the next step."""
        coordinator = self.coordinator
        started = time.perf_counter()
        if coordinator.checkpoint_every <= 0:
            what = "dropping a client (clients.on_loss: drop) rolls the survivors back to a checkpoint, so it " \
                   "needs" if coordinator.roster.can_drop(lost.nodes) else "recovery needs"
            raise PeerFailed(sorted(lost.nodes)[0], f"{lost}; {what} checkpoints (checkpoint.every > 0)")
        if coordinator.roster.can_drop(lost.nodes) and coordinator.planned is None:
            return await self.drop_clients(lost)
        policy = coordinator.policy
        for name in lost.nodes:
            self.restarts[name] = self.restarts.get(name, 0) + 1
            if self.restarts[name] > policy.max_restarts:
                raise PeerFailed(name, f"{lost}; restart budget of {policy.max_restarts} spent")
        log.warning("%s; recovering", lost)
        self._forget(lost)
        for name, hello in lost.rejoined.items():  # its new process already announced itself
            await coordinator.note_hello(name, hello)
            coordinator.seen(name)
        live = [n for n in coordinator.nodes if n not in lost.nodes]
        await coordinator.broadcast(control.Abort(), targets=live, step=coordinator.round)
        missing = lost.nodes - lost.rejoined.keys()
        if missing:
            try:
                await coordinator.wait_for_nodes(missing)
            except PeerTimeout as exc:  # say what happened first, not only that it did not come back
                raise PeerFailed(exc.peer, f"{lost}; it did not come back within {exc.waited_s:.1f}s") from None
        index = await self.restore_consistent()
        seconds = time.perf_counter() - started
        coordinator.record.failover(lost.nodes, lost.cause, lost.why, lost.detected, seconds, index)
        self._count_failover(lost.cause, seconds)
        if coordinator.options.progress:
            coordinator.options.progress({"event": "recovered", "nodes": sorted(lost.nodes), "checkpoint": index,
                                          "seconds": seconds})
        return index

    async def drop_clients(self, lost: NodesLost) -> int:
        """`clients.on_loss: drop`: the lost clients leave the run. The survivors roll back to the newest
        checkpoint they share and go on without them from that step (the drop's step); below
        `clients.min_clients` the run fails. Returns the index of the next step."""
        coordinator = self.coordinator
        roster = coordinator.roster
        log.warning("%s; dropping the client(s), the run goes on without them", lost)
        self._forget(lost)  # the launcher replaces a paused process, as for a failover
        survivors = roster.survivors_after(lost.nodes, coordinator.topology.nodes)
        step = coordinator.machine.book.common_checkpoint(survivors)
        change = roster.drop(lost.nodes, step, lost.cause)  # PeerFailed below clients.min_clients
        for name, hello in lost.rejoined.items():  # its new process announced itself already: rejoins later
            await coordinator.note_hello(name, hello)
        coordinator.machine.roster_changed()
        await coordinator.broadcast(control.Abort(), step=coordinator.round)
        index = await self.restore_consistent()
        coordinator.note_change(change, detected=lost.detected, reason=lost.why)
        return index

    def _forget(self, lost: NodesLost) -> None:
        """The lost nodes are down (metrics, progress); their checkpoints and silence no longer count."""
        coordinator = self.coordinator
        metrics = coordinator.node.metrics
        if metrics:
            for name in lost.nodes:
                metrics.peer_up(name, False)
        if coordinator.options.progress:
            coordinator.options.progress({"event": "nodes_lost", "nodes": sorted(lost.nodes)})
        for name in lost.nodes:
            coordinator.machine.forget(name)

    def _count_failover(self, cause: str, seconds: float) -> None:
        """Prometheus counters/histograms by cause."""
        metrics = self.coordinator.node.metrics
        if metrics:
            metrics.failover(cause)
            recovered = getattr(metrics, "recovery", None)
            if recovered is not None:
                recovered(seconds)
