"""Latency hiding (`training.staleness: k`, docs/wan.md): up to k + 1 training rounds in flight on a node.

The same events in and actions out as `machine.NodeMachine`, which stays the synchronous path (k = 0).
Each active round is a `NodeMachine` of its own (its units, queues and early messages), told not to pick
compute actions itself (`external_dispatch`); this machine owns the one compute thread and decides:

1. an optimizer step first, but only the oldest active round's (steps are applied strictly in round order);
2. then the `Prepare` of the next queued step, once at most k rounds are active (the node applied step
   r - k - 1 before it begins step r, so step r's weight version W_{r-k} exists) and within `lag` of the
   coordinator's last commit;
3. then forwards and backwards, oldest round first (each round keeps its deterministic in-round order).

Which weights a step uses is fixed by its index (the worker's stash), never by timing, so the order of
compute across rounds does not change results. Everything is bounded by k and the micro-batch count:
at most k + 1 active rounds, and early messages for at most k + 1 rounds past the newest begun.
"""
from __future__ import annotations

from collections import deque
from typing import Optional

from meshsl.errors import ProtocolError
from meshsl.machines.node import (
    Action, ApplyOptimizer, BeginRound, CommitRound, ComputeAction, ComputeFinished, Event, InputArrived,
    NodeMachine, OrderSource, Prepare, RoundDone, RunSteps, Step, SYNC_LAG, Wiring, Arrival)



class StaleMachine:
    def __init__(self, wiring: Wiring, schedule: str = "gpipe", deterministic: bool = True, staleness: int = 1,
                 planner: Optional[OrderSource] = None) -> None:
        if staleness < 1:
            raise ValueError("StaleMachine is for staleness >= 1; NodeMachine is the synchronous path")
        self.wiring, self.schedule, self.deterministic = wiring, schedule, deterministic
        self.planner = planner  # machines/schedules.RoundPlanner: each round keeps to its planned order
        self.staleness = staleness
        self.lag = SYNC_LAG + staleness  # commits still never delay a step: k more rounds are in flight
        self.rounds: dict[int, NodeMachine] = {}  # active rounds (begun, not finished), in round order
        self.round = 0  # the newest round begun
        self.phase = ""
        self.running: Optional[ComputeAction] = None
        self.queued: deque[tuple[int, int, tuple[int, ...]]] = deque()  # (round, step, lanes) still to begin
        self.micro_batches = 0
        self.early: dict[int, list[Arrival]] = {}  # round -> messages that came before we began it
        self._early_seen: set[Arrival] = set()
        self.applied = 0  # the last training round whose optimizer step was applied here
        self.committed = 0  # the last round the coordinator confirmed
        self.last_executed: tuple[int, list[Step]] = (0, [])  # (round, its Steps in the order they ran) of the last finished round

    # -- what node.py reads ------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self.running is not None

    @property
    def done(self) -> bool:
        return not self.rounds

    @property
    def pending_commit(self) -> Optional[int]:
        """The oldest training round still to be applied here (None when every begun step is applied)."""
        return next((r for r, inner in self.rounds.items() if inner.auto), None)

    def reset(self, round_: int) -> None:
        """Recovery: forget every round in flight; the next round must be after `round_`."""
        self.round, self.phase = round_, ""
        self.rounds, self.early, self._early_seen = {}, {}, set()
        self.queued = deque()
        self.applied = self.committed = round_
        self.running = None  # a compute action still on the thread finishes; compute_finished ignores it

    # -- events ------------------------------------------------------------------------------------
    def handle(self, event: Event) -> list[Action]:
        if isinstance(event, RunSteps):
            return self._run(event)
        if isinstance(event, BeginRound):
            return self.begin_round(event)
        if isinstance(event, CommitRound):
            return self._commit(event)
        if isinstance(event, ComputeFinished):
            return self.compute_finished(event.action)
        inner = self.rounds.get(event.round)
        if inner is None:
            if event.round > self.round:
                return self._hold(event)
            raise ProtocolError("stale_round", f"round {event.round} is over (now {self.round})")
        if isinstance(event, InputArrived):
            inner.input_arrived(event.segment, event.source, event.lane, event.micro_batch)
        else:
            inner.gradient_arrived(event.segment, event.consumer, event.lane, event.micro_batch)
        return self._dispatch()

    def _run(self, event: RunSteps) -> list[Action]:
        if self.rounds or self.running is not None or self.queued:
            raise ProtocolError("unexpected", f"run from round {event.first_round} "
                                              f"while round {self.round} is in progress")
        if event.first_round <= self.round:
            raise ProtocolError("stale_round", f"run from round {event.first_round} after round {self.round}")
        self.queued = deque((event.first_round + i, step, tuple(lanes)) for i, (step, lanes) in enumerate(event.steps))
        self.micro_batches = event.micro_batches
        self.committed = max(self.committed, event.first_round - 1)
        return self._dispatch()

    def begin_round(self, event: BeginRound) -> list[Action]:
        """A coordinator-driven round (evaluation, prediction): only between runs, with nothing in flight."""
        if event.round <= self.round:
            raise ProtocolError("stale_round", f"begin of round {event.round} after round {self.round}")
        if self.rounds or self.queued:
            raise ProtocolError("unexpected", f"begin of round {event.round} during self-driven training")
        inner = self._open(event.round)
        self.phase, self.micro_batches = event.phase, event.micro_batches
        out = inner.begin_round(event)
        return self._collect(event.round, inner, out) + self._dispatch()

    def _open(self, round_: int) -> NodeMachine:
        inner = NodeMachine(self.wiring, self.schedule, deterministic=self.deterministic, round=round_ - 1,
                            external_dispatch=True, planner=self.planner)
        held = self.early.pop(round_, [])
        inner.hold_early(held)
        self._early_seen.difference_update(held)
        for stale in [r for r in self.early if r < round_]:  # cannot happen in order; never keep them
            self._early_seen.difference_update(self.early.pop(stale))
        self.rounds[round_] = inner
        self.round = round_
        return inner

    def _hold(self, event: Arrival) -> list[Action]:
        # A peer is at most k + 1 rounds ahead of us: it began round r after applying r - k - 1, which
        # needed our gradient (or activation) of r - k - 1, so we had begun that round.
        if event.round > self.round + self.staleness + 1:
            raise ProtocolError("future_round", f"round {event.round} while at round {self.round}")
        limit = 4 * max(1, self.micro_batches) * sum(
            len(s.lanes) * (len(s.segment_inputs) + len(s.consumers)) for s in self.wiring.segments.values())
        held = self.early.setdefault(event.round, [])
        if len(held) >= limit or event in self._early_seen:
            raise ProtocolError("duplicate", "too many or repeated early messages")
        held.append(event)
        self._early_seen.add(event)
        return []

    def _commit(self, event: CommitRound) -> list[Action]:
        if event.round <= self.applied:
            if event.round > self.committed:
                self.committed = event.round
                return self._dispatch()
            return []
        if event.round < self.round and event.round not in self.rounds:
            return []  # a late commit of a round abandoned by a restore
        raise ProtocolError("unexpected", f"commit of round {event.round} (applied up to {self.applied})")

    def compute_finished(self, action: ComputeAction) -> list[Action]:
        if action != self.running:
            return []  # finished after a reset
        self.running = None
        inner = self.rounds.get(action.round)
        if inner is None:
            return self._dispatch()
        out = inner.compute_finished(action)
        if isinstance(action, ApplyOptimizer):
            self.applied = action.round
        return self._collect(action.round, inner, out) + self._dispatch()

    def _collect(self, round_: int, inner: NodeMachine, out: list[Action]) -> list[Action]:
        """A round that reported RoundDone (an applied step, a finished evaluation) is over here."""
        if any(isinstance(a, RoundDone) for a in out):
            self.last_executed = (round_, self.rounds.pop(round_).executed)
        return out

    # -- the schedule ------------------------------------------------------------------------------
    def _dispatch(self) -> list[Action]:
        if self.running is not None:
            return []
        action = self.next_compute()
        if action is None:
            return []
        self.running = action
        return [action]

    def next_compute(self) -> Optional[ComputeAction]:
        oldest = next(iter(self.rounds.items()), None)
        commit = oldest[1].take_commit() if oldest is not None else None
        if commit is not None:
            return commit  # steps are applied strictly in round order: only the oldest round's
        prepare = self._advance()
        if prepare is not None:
            return prepare
        for inner in self.rounds.values():
            if inner.pending_commit is not None:
                continue  # done, waiting for the optimizer steps of older rounds
            action = inner.next_compute()
            if action is not None:
                return action
        return None

    def _advance(self) -> Optional[Prepare]:
        if not self.queued or any(not inner.auto for inner in self.rounds.values()):
            return None
        if len(self.rounds) > self.staleness:
            return None  # step r - k - 1 is not applied yet: W_{r-k} does not exist
        round_, step, lanes = self.queued[0]
        if round_ - self.lag > self.committed:
            return None
        self.queued.popleft()
        inner = self._open(round_)
        self.phase = "train"
        inner.begin_round(BeginRound(round_, "train", lanes, self.micro_batches), prepare=True)
        return Prepare(round_, step, lanes)


__all__ = ["StaleMachine"]
