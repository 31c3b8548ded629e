"""The node's scheduling logic as a state machine free of I/O: events in, actions out.

A *round* is one training step, evaluation pass or prediction pass, numbered monotonically by the
coordinator. Within a round every hosted segment runs once per (lane, micro-batch): forward when all
its inputs are there, backward (training only) when every consumer's gradient is there. One compute
action runs at a time (the node's compute thread); the schedule policy picks the next one:

- gpipe: all ready forwards before any backward;
- 1f1b: a ready backward first, and at most `window` forwards in flight per segment, which bounds
  stashed activations. The window is `training.window`, by default the micro-batch count (never less
  than the number of pipeline stages from the segment to the loss): a window of 2 would cost about M/2
  data round trips per step on a wide-area link, while M in flight cost one (docs/wan.md).

Training steps are self-driven (docs/wan.md): a `Run` hands the machine a list of steps; it begins each
on its own (a `Prepare` compute action sets up the step's micro-batches), applies the optimizer as soon
as its own part of the step is complete (its gradients are final) and reports `RoundDone` after that.
It begins the next step only while at most `lag` steps are not yet committed by the coordinator
(`Commit` events, which travel behind the data), so control never stands between two steps, yet a
node never runs far ahead of what the coordinator has confirmed. Evaluation and prediction rounds are
begun by the coordinator (`Begin`); a training `Begin` still waits for a `Commit` before applying.
"""
from __future__ import annotations

import enum
import heapq
from collections import deque
from dataclasses import dataclass, field
from typing import Optional, Protocol, Union

from meshsl.errors import ProtocolError
from meshsl.machines.units import (SegmentQueue, SegmentWiring, Unit, Wiring, pick_ready, planned_order,
                                   round_units, step_ready)
from meshsl.schedule.steps import edge_name


SYNC_LAG = 3  # how many self-driven steps a node may run past the coordinator's last commit (docs/wan.md)


# ---- events -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BeginRound:
    round: int
    phase: str  # train | eval | predict
    lanes: tuple[int, ...]
    micro_batches: int


@dataclass(frozen=True)
class InputArrived:
    """A remote producer's activation for `segment` (from `source`) arrived."""
    round: int
    segment: str
    source: str
    lane: int
    micro_batch: int


@dataclass(frozen=True)
class GradientArrived:
    """A remote consumer's gradient for `segment`'s output arrived."""
    round: int
    segment: str
    consumer: str
    lane: int
    micro_batch: int


@dataclass(frozen=True)
class ComputeFinished:
    action: "ComputeAction"


@dataclass(frozen=True)
class CommitRound:
    """A training BeginRound: apply the optimizer for `round`. Self-driven steps: every node applied `round`."""
    round: int


@dataclass(frozen=True)
class RunSteps:
    """Train `steps` ((step index, lanes) each) as rounds first_round, first_round + 1, ... on our own."""
    first_round: int
    steps: tuple[tuple[int, tuple[int, ...]], ...]
    micro_batches: int


Event = Union[BeginRound, InputArrived, GradientArrived, ComputeFinished, CommitRound, RunSteps]
Arrival = Union[InputArrived, GradientArrived]  # a peer's tensor of a round: held when it comes early


# ---- actions ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Forward:
    round: int
    segment: str
    lane: int
    micro_batch: int


@dataclass(frozen=True)
class Backward:
    round: int
    segment: str
    lane: int
    micro_batch: int


@dataclass(frozen=True)
class ApplyOptimizer:
    round: int


@dataclass(frozen=True)
class Prepare:
    """Set up training step `step` as round `round` (which rows each micro-batch has) on the compute thread."""
    round: int
    step: int
    lanes: tuple[int, ...]


ComputeAction = Union[Forward, Backward, ApplyOptimizer, Prepare]


@dataclass(frozen=True)
class Step:
    """One entry of a round's compute order (machines/schedules.py): `F` or `B` of a unit."""
    kind: str  # F | B
    segment: str
    lane: int
    micro_batch: int

    @classmethod
    def of(cls, action: Union[Forward, Backward]) -> "Step":
        return cls("F" if isinstance(action, Forward) else "B", action.segment, action.lane, action.micro_batch)

    def label(self, with_lane: bool = False) -> str:
        """`bottom.F0`; with the lane when a topology has several (`bottom[2].F0`)."""
        return f"{self.segment}{f'[{self.lane}]' if with_lane else ''}.{self.kind}{self.micro_batch}"


class OrderSource(Protocol):
    """Where a machine gets each round's planned order (machines/schedules.RoundPlanner)."""

    def order(self, node: str, phase: str, lanes: tuple[int, ...], micro_batches: int) -> tuple[Step, ...]: ...


@dataclass(frozen=True)
class SendActivation:
    round: int
    producer: str
    consumer: str
    lane: int
    micro_batch: int
    peer: str


@dataclass(frozen=True)
class SendGradient:
    round: int
    producer: str
    consumer: str
    lane: int
    micro_batch: int
    peer: str


@dataclass(frozen=True)
class RoundDone:
    round: int
    phase: str


Action = Union[Forward, Backward, ApplyOptimizer, Prepare, SendActivation, SendGradient, RoundDone]


class Stage(enum.Enum):
    """Where a node is in its current round (one round at a time; a StaleMachine keeps one per round)."""
    IDLE = "idle"  # no round in progress: the last one finished, or a reset
    PREPARING = "preparing"  # a self-driven step's Prepare runs (its micro-batches are set up)
    COMPUTING = "computing"  # forwards and backwards of the round's units
    WAITING_COMMIT = "waiting_commit"  # a coordinator-driven training round is done here; COMMIT applies it
    APPLYING = "applying"  # the optimizer step is due or running


# Every transition of a round; anything else is a bug in the machine, raised at once. A reset (recovery)
# returns to IDLE from anywhere.
TRANSITIONS: dict[Stage, frozenset[Stage]] = {
    Stage.IDLE: frozenset({Stage.PREPARING, Stage.COMPUTING}),
    Stage.PREPARING: frozenset({Stage.COMPUTING}),
    Stage.COMPUTING: frozenset({Stage.APPLYING, Stage.WAITING_COMMIT, Stage.IDLE}),
    Stage.WAITING_COMMIT: frozenset({Stage.APPLYING}),
    Stage.APPLYING: frozenset({Stage.IDLE}),
}


@dataclass
class NodeMachine:
    wiring: Wiring
    schedule: str = "gpipe"
    deterministic: bool = True  # backwards of a segment run in (micro-batch, lane) order: fixed float sums
    round: int = 0  # coordinators number rounds from 1: a peer's round-1 message before our BEGIN is held
    phase: str = ""
    stage: Stage = Stage.IDLE
    running: Optional["ComputeAction"] = None  # the one compute action on the compute thread
    units: dict[tuple[str, int, int], Unit] = field(default_factory=dict)
    micro_batches: int = 0
    in_flight: dict[str, int] = field(default_factory=dict)
    early: list[Arrival] = field(default_factory=list)  # events of the next round, replayed at its BeginRound
    pending_commit: Optional[int] = None
    lag: int = SYNC_LAG  # self-driven steps: begin round r only once round r - lag is committed (docs/wan.md)
    auto: bool = False  # the current round is a self-driven training step
    applied: int = 0  # the last self-driven round whose optimizer step was applied
    committed: int = 0  # the last round the coordinator confirmed every node applied
    queued: deque[tuple[int, int, tuple[int, ...]]] = field(default_factory=deque)  # self-driven rounds still to begin: (round, step, lanes)
    _queues: dict[str, SegmentQueue] = field(default_factory=dict, repr=False)
    _open_units: int = field(default=0, repr=False)  # units not backwarded yet
    _early_seen: set[Arrival] = field(default_factory=set, repr=False)  # `early` as a set (duplicate check)
    external_dispatch: bool = False  # one round of a StaleMachine: it picks the compute actions (stale_machine.py)
    planner: Optional["OrderSource"] = None  # machines/schedules.RoundPlanner: each round keeps to its planned order
    order: Optional[tuple["Step", ...]] = None  # this round's planned Steps (None: the policy picks among ready units)
    position: int = 0  # the next Step of `order`
    executed: list["Step"] = field(default_factory=list)  # the Steps this round ran, in order (bounded by its units)

    # -- public API ------------------------------------------------------------------------------
    def handle(self, event: Event) -> list[Action]:
        """Apply one event; raises ProtocolError (and changes nothing) for events a peer had no right to send."""
        if isinstance(event, BeginRound):
            return self.begin_round(event)
        if isinstance(event, CommitRound):
            return self._commit(event)
        if isinstance(event, RunSteps):
            return self._run(event)
        if isinstance(event, ComputeFinished):
            return self.compute_finished(event.action)
        if event.round > self.round:
            return self._hold(event)
        if event.round < self.round:
            raise ProtocolError("stale_round", f"round {event.round} is over (now {self.round})")
        if isinstance(event, InputArrived):
            self.input_arrived(event.segment, event.source, event.lane, event.micro_batch)
        else:
            self.gradient_arrived(event.segment, event.consumer, event.lane, event.micro_batch)
        return self._dispatch()

    @property
    def busy(self) -> bool:
        return self.running is not None

    @property
    def done(self) -> bool:
        """This node's part of the current round is finished (its optimizer step may still be due)."""
        return self.stage not in (Stage.PREPARING, Stage.COMPUTING)

    def _enter(self, stage: Stage) -> None:
        if stage not in TRANSITIONS[self.stage]:
            raise RuntimeError(f"node {self.wiring.node}, round {self.round}: {self.stage.name} -> {stage.name} "
                               f"is not a transition of a round")
        self.stage = stage

    def reset(self, round_: int) -> None:
        """Recovery: forget the round in progress; the next BeginRound must be after `round_`.

        A compute action still on the thread finishes, but its result is ignored."""
        self.round, self.phase, self.stage = round_, "", Stage.IDLE
        self.units, self.early, self.in_flight = {}, [], {}
        self._queues, self._open_units, self._early_seen = {}, 0, set()
        self.pending_commit, self.order, self.position = None, None, 0
        self.auto, self.applied, self.committed, self.queued = False, round_, round_, deque()
        self.running = None  # a compute action still on the thread finishes; compute_finished ignores it

    # -- transitions -----------------------------------------------------------------------------
    def _run(self, event: RunSteps) -> list[Action]:
        if not self.done or self.running is not None or self.queued or self.pending_commit is not None:
            raise ProtocolError("unexpected", f"run from round {event.first_round} "
                                              f"while round {self.round} is in progress")
        if event.first_round <= self.round:
            raise ProtocolError("stale_round", f"run from round {event.first_round} after round {self.round}")
        self.queued = deque((event.first_round + i, step, tuple(lanes)) for i, (step, lanes) in enumerate(event.steps))
        self.micro_batches = event.micro_batches
        self.committed = max(self.committed, event.first_round - 1)  # the coordinator settled every earlier round
        return self._advance()

    def _advance(self) -> list[Action]:
        """Begin the next self-driven step if this node is free and within `lag` of the last commit."""
        if not self.queued or not self.done or self.running is not None or self.pending_commit is not None:
            return []
        if self.auto and self.applied < self.round:
            return []
        round_, step, lanes = self.queued[0]
        if round_ - self.lag > self.committed:
            return []
        self.queued.popleft()
        self.begin_round(BeginRound(round_, "train", lanes, self.micro_batches), prepare=True)
        self.running = Prepare(round_, step, lanes)
        return [self.running]

    def begin_round(self, event: BeginRound, prepare: bool = False) -> list[Action]:
        if event.round <= self.round:
            raise ProtocolError("stale_round", f"begin of round {event.round} after round {self.round}")
        if self.queued and not prepare:
            raise ProtocolError("unexpected", f"begin of round {event.round} during self-driven training")
        self.round, self.phase, self.micro_batches = event.round, event.phase, event.micro_batches
        self.auto = prepare
        self._enter(Stage.PREPARING if prepare else Stage.COMPUTING)
        self.in_flight = {name: 0 for name in self.wiring.segments}
        self.units, self._queues = round_units(self.wiring, event.phase == "train", event.lanes, event.micro_batches)
        self._open_units = len(self.units)
        self.order, self.position, self.executed = (None if self.planner is None else planned_order(
            self.planner.order(self.wiring.node, event.phase, event.lanes, event.micro_batches), self.units,
            event.phase, self.wiring.node)), 0, []
        early, self.early, self._early_seen = self.early, [], set()
        self._take([held for held in early if held.round == self.round])
        if prepare:
            return []  # the Prepare action runs first; its ComputeFinished dispatches
        if not self.units:
            return self._maybe_done()
        return self._dispatch()

    def deliver(self, events: list[Arrival]) -> list[Action]:
        """Arrivals of the current round taken together, then one pick (the planner's supersteps)."""
        self._take(events)
        return self._dispatch()

    def _take(self, events: list[Arrival]) -> None:
        for event in events:
            if isinstance(event, InputArrived):
                self.input_arrived(event.segment, event.source, event.lane, event.micro_batch)
            else:
                self.gradient_arrived(event.segment, event.consumer, event.lane, event.micro_batch)

    def _hold(self, event: Arrival) -> list[Action]:
        if event.round != self.round + 1:
            raise ProtocolError("future_round", f"round {event.round} while at round {self.round}")
        # Bounded: at most one message per (segment, source, lane, micro-batch) of a round can be early.
        limit = 4 * max(1, self.micro_batches) * sum(
            len(s.lanes) * (len(s.segment_inputs) + len(s.consumers)) for s in self.wiring.segments.values())
        if len(self.early) >= limit or event in self._early_seen:
            raise ProtocolError("duplicate", "too many or repeated early messages")
        self.early.append(event)
        self._early_seen.add(event)
        return []

    def _unit(self, segment: str, lane: int, micro_batch: int) -> Unit:
        unit = self.units.get((segment, lane, micro_batch))
        if unit is None:
            raise ProtocolError("unexpected", f"no work for {segment} lane {lane} micro-batch {micro_batch}")
        return unit

    def hold_early(self, events: list[Arrival]) -> None:
        """Events of this machine's next round that were held elsewhere (by the stale machine's routing)."""
        self.early, self._early_seen = list(events), set(events)

    def input_arrived(self, segment: str, source: str, lane: int, micro_batch: int) -> None:
        unit = self._unit(segment, lane, micro_batch)
        if source not in unit.inputs_missing:
            raise ProtocolError("duplicate", f"input {source} of {segment} ({lane}, {micro_batch}) already here")
        unit.inputs_missing.discard(source)
        if not unit.inputs_missing and not unit.forwarded:
            heapq.heappush(self._queues[segment].ready_forwards, (micro_batch, lane))

    def gradient_arrived(self, segment: str, consumer: str, lane: int, micro_batch: int) -> None:
        if self.phase != "train":
            raise ProtocolError("unexpected", "gradient outside a training round")
        unit = self._unit(segment, lane, micro_batch)
        if consumer not in unit.grads_missing:
            raise ProtocolError("duplicate", f"gradient from {consumer} for {segment} ({lane}, {micro_batch})")
        unit.grads_missing.discard(consumer)
        self._backward_ready(segment, lane, micro_batch, unit)

    def _backward_ready(self, segment: str, lane: int, micro_batch: int, unit: Unit) -> None:
        """Deterministic order needs no heap of ready backwards: only a segment's first open unit may run."""
        if not self.deterministic and unit.forwarded and not unit.backwarded and not unit.grads_missing:
            heapq.heappush(self._queues[segment].ready_backwards, (micro_batch, lane))

    def _commit(self, event: CommitRound) -> list[Action]:
        if self.stage == Stage.WAITING_COMMIT and event.round == self.round:
            self.pending_commit = event.round  # a coordinator-driven step: apply now
            self._enter(Stage.APPLYING)
            return self._dispatch()
        if event.round <= self.applied:  # self-driven steps: the coordinator confirms what we applied
            if event.round > self.committed:
                self.committed = event.round
                return self._advance()
            return []
        if event.round < self.round:
            return []  # a late commit of a round abandoned by a restore
        raise ProtocolError("unexpected", f"commit of round {event.round} (at {self.round}, {self.stage.value})")

    def compute_finished(self, action: ComputeAction) -> list[Action]:
        """`action` ran on the compute thread. A StaleMachine's round (`external_dispatch`) gets only the
        actions its owner started for it; alone, a result after a reset is ignored."""
        if not self.external_dispatch and action != self.running:
            return []  # finished after a reset: the thread is free again, nothing else changes
        self.running = None
        out: list[Action] = []
        if isinstance(action, Prepare):
            self._enter(Stage.COMPUTING)
            return self._maybe_done() + self._dispatch()
        if isinstance(action, ApplyOptimizer):
            self._enter(Stage.IDLE)
            if self.auto and action.round == self.round:
                self.applied = action.round
                return [RoundDone(action.round, "train"), *self._advance()]
            return self._dispatch()
        if action.round != self.round:
            return self._dispatch()  # the round was abandoned while computing
        seg = self.wiring.segments[action.segment]
        unit = self.units[(action.segment, action.lane, action.micro_batch)]
        if self.order is not None:
            self.position += 1  # the action was the order's next Step (next_compute picks nothing else)
        self.executed.append(Step.of(action))
        if isinstance(action, Forward):
            unit.forwarded = True
            if self.phase == "train":
                self.in_flight[seg.name] += 1
            for consumer in seg.consumers:
                if self.wiring.is_local(consumer, action.lane):
                    self.input_arrived(consumer, seg.name, action.lane, action.micro_batch)
                else:
                    out.append(SendActivation(action.round, seg.name, consumer, action.lane, action.micro_batch,
                                              self.wiring.node_of[consumer][action.lane]))
            if self.phase != "train":
                unit.backwarded = True  # nothing more to do for this unit
                self._open_units -= 1
            else:
                self._backward_ready(seg.name, action.lane, action.micro_batch, unit)
        else:
            unit.backwarded = True
            self._open_units -= 1
            self.in_flight[seg.name] -= 1
            for producer in seg.segment_inputs:
                if self.wiring.is_local(producer, action.lane):
                    self.gradient_arrived(producer, seg.name, action.lane, action.micro_batch)
                else:
                    out.append(SendGradient(action.round, producer, seg.name, action.lane, action.micro_batch,
                                            self.wiring.node_of[producer][action.lane]))
        return out + self._maybe_done() + self._dispatch()

    def _maybe_done(self) -> list[Action]:
        if self.stage == Stage.COMPUTING and self._open_units == 0:
            if self.auto:  # our gradients of the step are complete: apply, then report (RoundDone)
                self._enter(Stage.APPLYING)
                self.pending_commit = self.round
                return []
            self._enter(Stage.WAITING_COMMIT if self.phase == "train" else Stage.IDLE)
            return [RoundDone(self.round, self.phase)]
        return []

    # -- the schedule policy ---------------------------------------------------------------------
    def _dispatch(self) -> list[Action]:
        if self.busy or self.external_dispatch:
            return []
        action = self.next_compute()
        if action is None:
            return []
        self.running = action
        return [action]

    def next_compute(self) -> Optional[ComputeAction]:
        """The ready unit with the smallest (micro-batch, lane, segment), by the rules in the module doc.

        Deterministic order: a segment's backwards run in (micro-batch, lane) order, so only the unit at
        the head of its `open` heap may run its backward. 1F1B: a ready backward first; a segment with
        `window` forwards in flight may only run the forward of its next-backward unit (otherwise a later
        lane's input that arrived first fills the window and nothing can move).

        The heaps are pruned lazily: a picked action is on the compute thread until ComputeFinished
        marks its unit, and nothing is picked meanwhile (one compute action at a time)."""
        commit = self.take_commit()
        if commit is not None:
            return commit
        if self.order is not None:
            return self._next_planned(self.order)
        picked = pick_ready(self.units, self._queues, self.in_flight, self.wiring, self.schedule == "1f1b",
                            self.deterministic)
        if picked is None:
            return None
        kind, segment, lane, mb = picked
        return (Backward if kind == "B" else Forward)(self.round, segment, lane, mb)

    def take_commit(self) -> Optional[ApplyOptimizer]:
        """The optimizer step this round's complete gradients wait for, handed out once."""
        if self.pending_commit is None:
            return None
        round_, self.pending_commit = self.pending_commit, None
        return ApplyOptimizer(round_)

    def _next_planned(self, order: tuple["Step", ...]) -> Optional[ComputeAction]:
        """The order's next Step once its unit is ready; nothing else meanwhile (the node waits)."""
        step = order[self.position] if self.position < len(order) else None
        if step is None or not step_ready(step, self.units[(step.segment, step.lane, step.micro_batch)]):
            return None
        return (Forward if step.kind == "F" else Backward)(self.round, step.segment, step.lane, step.micro_batch)


__all__ = [
    "Action", "ApplyOptimizer", "Backward", "Stage", "TRANSITIONS", "BeginRound", "CommitRound", "ComputeFinished", "Event", "Forward",
    "GradientArrived", "InputArrived", "NodeMachine", "Prepare", "RoundDone", "RunSteps", "SendActivation", "SendGradient",
    "SegmentWiring", "Step", "Wiring", "edge_name",
]
