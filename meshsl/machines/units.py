"""What a node hosts (its wiring, fixed for the node's life), the units of work of one round, and the
schedule policy's pick among the ready units (machines/node.py applies it; machines/schedules.py turns it
into each round's planned order). Pure data and functions: no I/O, no torch."""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any, Optional

# ---- wiring (from the topology, fixed for the node's life) -------------------------------------
@dataclass(frozen=True)
class SegmentWiring:
    name: str
    lanes: tuple[int, ...]
    inputs: tuple[str, ...]  # data sources and segments
    segment_inputs: tuple[str, ...]
    consumers: tuple[str, ...]  # segments consuming the output
    window: int  # 1F1B in-flight bound (see the module doc)


@dataclass(frozen=True)
class Wiring:
    node: str
    segments: dict[str, SegmentWiring]
    node_of: dict[str, tuple[str, ...]]  # segment -> node per lane

    @classmethod
    def from_topology(cls, topology: Any, node: str) -> "Wiring":
        training = topology.spec.training
        declared = getattr(training, "window", None) or training.micro_batches
        depth: dict[str, int] = {}
        for name in reversed(topology.segment_order):
            depth[name] = 1 + max((depth[c] for c in topology.consumers(name)), default=0)
        segments = {}
        for name in topology.segment_order:
            lanes = tuple(topology.lanes_of(name, node))
            if not lanes:
                continue
            spec = topology.segments[name]
            segments[name] = SegmentWiring(
                name=name, lanes=lanes, inputs=tuple(spec.inputs),
                segment_inputs=tuple(i for i in spec.inputs if i in topology.segments),
                consumers=tuple(topology.consumers(name)), window=max(depth[name], declared))
        return cls(node=node, segments=segments,
                   node_of={s: topology.placement[s] for s in topology.segments})

    def is_local(self, segment: str, lane: int) -> bool:
        return self.node_of[segment][lane] == self.node


@dataclass
class Unit:
    inputs_missing: set[str]
    grads_missing: set[str]
    forwarded: bool = False
    backwarded: bool = False


class SegmentQueue:
    """The schedule's view of one segment's units in the current round, kept up to date per event so the
    next compute action is found in O(log units) instead of a scan (a SplitFed server has a unit per client).

    `ready_forwards`: (mb, lane) of units whose inputs are all there and that were not picked yet;
    `ready_backwards`: the same for backwards (used when the order is not deterministic);
    `open`: (mb, lane) of every unit not backwarded yet, lazily pruned: its head is the unit whose
    backward must come next in deterministic order."""

    __slots__ = ("ready_forwards", "ready_backwards", "open")

    def __init__(self) -> None:
        self.ready_forwards: list[tuple[int, int]] = []
        self.ready_backwards: list[tuple[int, int]] = []
        self.open: list[tuple[int, int]] = []


def round_units(wiring: Wiring, training: bool, lanes: tuple[int, ...],
                micro_batches: int) -> tuple[dict[tuple[str, int, int], Unit], dict[str, SegmentQueue]]:
    """The units of work of a round (segment, lane, micro-batch) this node computes, and per segment
    the queue of them (forwards with no segment inputs ready at once)."""
    units: dict[tuple[str, int, int], Unit] = {}
    queues: dict[str, SegmentQueue] = {}
    round_lanes = set(lanes)
    for seg in wiring.segments.values():
        queue = SegmentQueue()
        for lane in seg.lanes:
            if lane not in round_lanes:
                continue
            for mb in range(micro_batches):
                units[(seg.name, lane, mb)] = Unit(inputs_missing=set(seg.segment_inputs),
                                                    grads_missing=set(seg.consumers) if training else set())
                queue.open.append((mb, lane))
                if not seg.segment_inputs:
                    queue.ready_forwards.append((mb, lane))
        if queue.open:
            heapq.heapify(queue.open)
            heapq.heapify(queue.ready_forwards)
            queues[seg.name] = queue
    return units, queues


def pick_ready(units: dict[tuple[str, int, int], Unit], queues: dict[str, SegmentQueue], in_flight: dict[str, int],
               wiring: Wiring, one_f_one_b: bool, deterministic: bool) -> Optional[tuple[str, str, int, int]]:
    """The ready unit with the smallest (micro-batch, lane, segment) as ("F" | "B", segment, lane,
    micro-batch), by the rules of NodeMachine.next_compute; None when nothing is ready."""
    forward: Optional[tuple[int, int, str]] = None
    backward: Optional[tuple[int, int, str]] = None
    for segment, queue in queues.items():
        first_open = None
        if deterministic:
            heads = queue.open
            while heads and units[(segment, heads[0][1], heads[0][0])].backwarded:
                heapq.heappop(heads)
            if heads:
                first_open = heads[0]
                unit = units[(segment, first_open[1], first_open[0])]
                if unit.forwarded and not unit.grads_missing:
                    candidate = (first_open[0], first_open[1], segment)
                    if backward is None or candidate < backward:
                        backward = candidate
        else:
            heads = queue.ready_backwards
            while heads and units[(segment, heads[0][1], heads[0][0])].backwarded:
                heapq.heappop(heads)
            if heads:
                candidate = (heads[0][0], heads[0][1], segment)
                if backward is None or candidate < backward:
                    backward = candidate
        ready = _forward_candidate(units, queue, segment, first_open,
                                   not one_f_one_b or in_flight[segment] < wiring.segments[segment].window)
        if ready is not None and (forward is None or ready < forward):
            forward = ready
    if backward is not None and (one_f_one_b or forward is None):
        return ("B", backward[2], backward[1], backward[0])
    if forward is not None:
        return ("F", forward[2], forward[1], forward[0])
    return None


def _forward_candidate(units: dict[tuple[str, int, int], Unit], queue: SegmentQueue, segment: str,
                       first_open: Optional[tuple[int, int]], window_open: bool) -> Optional[tuple[int, int, str]]:
    ready = queue.ready_forwards
    while ready and units[(segment, ready[0][1], ready[0][0])].forwarded:
        heapq.heappop(ready)
    if not ready:
        return None
    if window_open:
        return (ready[0][0], ready[0][1], segment)
    if first_open is not None and not units[(segment, first_open[1], first_open[0])].forwarded \
            and not units[(segment, first_open[1], first_open[0])].inputs_missing:
        return (first_open[0], first_open[1], segment)  # past the window: see NodeMachine.next_compute
    return None


def step_ready(step: Any, unit: Unit) -> bool:
    """Can `step` (a planned F or B) of this unit run now?"""
    if step.kind == "F":
        return not unit.forwarded and not unit.inputs_missing
    return unit.forwarded and not unit.backwarded and not unit.grads_missing


def planned_order(order: tuple[Any, ...], units: dict[tuple[str, int, int], Unit], phase: str,
                  node: str) -> tuple[Any, ...]:
    """A round's planned order, checked against its units (a forward, and in training a backward, each)."""
    if len(order) != len(units) * (2 if phase == "train" else 1):
        raise RuntimeError(f"the planned order of {node} does not cover its {len(units)} units")
    return order
