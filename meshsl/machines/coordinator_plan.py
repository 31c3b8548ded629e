"""Which steps run together, free of I/O: where the barriers between self-driven runs of steps fall
(evaluation, FedAvg, sequential hand-off, a change of the clients taking part) and which step trains
next when clients are dropped. The coordinator asks; nothing here sends anything."""
from __future__ import annotations

from typing import Any, Optional, Sequence

from meshsl.schedule.steps import StepInfo, training_steps
from meshsl.machines.policies import ClientChange, ClientRoster


class StepPlanner:
    """Planning over the run's `steps`. `planned`: a replayed client schedule (policies.planned_changes),
    whose drops this planner applies to the roster as their steps come."""

    def __init__(self, topology: Any, roster: ClientRoster, steps: Sequence[StepInfo], evaluate: bool = True,
                 planned: Optional[dict[str, Any]] = None, epoch_length: Optional[int] = None) -> None:
        self.topology = topology
        self.roster = roster
        self.steps = list(steps)
        self.step_lanes = [info.lanes for info in self.steps]
        self.evaluate = evaluate
        self.planned = planned
        self._epoch_length = epoch_length

    @property
    def epoch_length(self) -> int:
        if self._epoch_length is None:
            self._epoch_length = len(training_steps(self.topology, epochs=1)) or 1
        return self._epoch_length

    def eval_due(self, info: StepInfo) -> bool:
        eval_every = self.topology.spec.training.eval_every
        if eval_every:
            due = (info.step + 1) % eval_every == 0
        else:
            due = (info.step + 1) % self.epoch_length == 0
        return due or info.step == self.steps[-1].step

    def sync_due(self, info: StepInfo) -> bool:
        """After this step the coordinator changes weights (FedAvg, sequential hand-off)."""
        clients = self.topology.spec.clients
        if clients is None:
            return False
        if clients.mode == "splitfed":
            return bool((info.step + 1) % clients.average_every == 0)
        following = self.roster.next_active(self.step_lanes, info.step + 1) if self.roster.dropped \
            else (info.step + 1 if info.step + 1 < len(self.steps) else None)  # the hand-off skips dropped clients
        return following is not None and self.steps[following].lanes != info.lanes

    def turn_ends(self, info: StepInfo) -> bool:
        """Sequential: the next step is another client's turn (a hand-off, also to a rejoining client)."""
        clients = self.topology.spec.clients
        return clients is not None and clients.mode == "sequential" and info.step + 1 < len(self.steps) \
            and self.steps[info.step + 1].lanes != info.lanes

    def barrier_after(self, index: int) -> int:
        """The first step from `index` after which the nodes wait for the coordinator: evaluation,
        weight synchronisation, a change of the clients taking part, or the last step."""
        steps = self.steps
        for i in range(index, len(steps)):
            info = steps[i]
            if self.sync_due(info) or (self.evaluate and self.eval_due(info)):
                return i
            if i + 1 < len(steps) and ((self.roster.dropped and not self.roster.active_lanes(steps[i + 1].lanes))
                                       or (self.planned and i + 1 in self.planned["drop"])):
                return i
        return len(steps) - 1

    def next_training_step(self, index: int) -> tuple[Optional[int], list[ClientChange]]:
        """The next step to train from `index` (None: no more), and the replayed drops that took effect
        by then (applied to the roster). Steps no client taking part trains (sequential turns of dropped
        clients) are skipped."""
        changes: list[ClientChange] = []
        while True:
            if self.planned:
                for step in sorted(s for s in self.planned["drop"] if s <= index):
                    for nodes in self.planned["drop"].pop(step):
                        change = self.roster.drop(nodes, step, "replayed")
                        if change is not None:
                            changes.append(change)
            following = self.roster.next_active(self.step_lanes, index)
            if following is None or following == index:
                return following, changes
            index = following

    def as_trained(self, info: StepInfo) -> StepInfo:
        """The step as trained: over the clients taking part."""
        if not self.roster.dropped:
            return info
        return StepInfo(info.step, info.epoch, info.step_in_epoch, self.roster.active_lanes(info.lanes))
