"""A round's compute order as data: for every node, the Forward/Backward actions it runs, in order.

The schedule policy (GPipe: forwards first; 1F1B: a ready backward first, at most `window` forwards in
flight; backwards of a segment in (micro-batch, lane) order) is applied once per round shape to every
node's NodeMachine together, in supersteps: each node runs all the work it can, then every message
crosses. Remote messages are thus late by construction -- what a wide-area link makes them -- so a node
does everything local before it waits. The result is one global execution, so each node's projection
of it is deadlock-free when the node keeps to it: the node runtime executes exactly this order (the
machine waits for the next action's inputs), and `meshsl plan --schedule` prints it, like
torch.distributed.pipelining's `pipeline_order` of "F0"/"B0" actions per rank.

A round's shape is its phase, lanes and micro-batch count; orders are memoised per shape, and planners
per (topology, schedule) beside the topology, so the many nodes of one simulation share one planner.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Union

from meshsl.machines.node import (
    Action, Arrival, Backward, BeginRound, Forward, GradientArrived, InputArrived, NodeMachine, SendActivation, SendGradient, Step,
    Wiring)

_PLANNERS: "weakref.WeakKeyDictionary[Any, dict[tuple[str, bool], RoundPlanner]]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class RoundShape:
    phase: str  # train | eval | predict
    lanes: tuple[int, ...]
    micro_batches: int


class RoundPlanner:
    """Per-node compute orders of rounds of one topology under one schedule policy."""

    def __init__(self, wirings: dict[str, Wiring], schedule: str, deterministic: bool = True) -> None:
        self.wirings, self.schedule, self.deterministic = wirings, schedule, deterministic
        self._orders: dict[RoundShape, dict[str, tuple[Step, ...]]] = {}

    @classmethod
    def for_topology(cls, topology: Any) -> "RoundPlanner":
        training = topology.spec.training
        key = (training.schedule, bool(training.deterministic))
        planners = _PLANNERS.setdefault(topology, {})
        if key not in planners:
            wirings = {node: Wiring.from_topology(topology, node) for node in topology.nodes}
            planners[key] = cls(wirings, *key)
        return planners[key]

    def order(self, node: str, phase: str, lanes: Iterable[int], micro_batches: int) -> tuple[Step, ...]:
        return self.orders(phase, lanes, micro_batches).get(node, ())

    def orders(self, phase: str, lanes: Iterable[int], micro_batches: int) -> dict[str, tuple[Step, ...]]:
        shape = RoundShape(phase, tuple(lanes), micro_batches)
        orders = self._orders.get(shape)
        if orders is None:
            orders = self._orders[shape] = self._simulate(shape)
        return orders

    def _simulate(self, shape: RoundShape) -> dict[str, tuple[Step, ...]]:
        machines = {node: NodeMachine(wiring, self.schedule, deterministic=self.deterministic)
                    for node, wiring in self.wirings.items()}
        executed: dict[str, list[Step]] = {node: [] for node in machines}
        running: dict[str, Optional[Union[Forward, Backward]]] = {}
        for node, machine in machines.items():
            running[node] = _compute_of(machine.begin_round(BeginRound(1, shape.phase, shape.lanes,
                                                                       shape.micro_batches)))
        while True:
            mail: dict[str, list[Arrival]] = {}
            for node in sorted(machines):  # a superstep: every node runs all it can
                machine, action = machines[node], running[node]
                while action is not None:
                    executed[node].append(Step.of(action))
                    out = machine.compute_finished(action)
                    for sent in out:
                        if isinstance(sent, SendActivation):
                            mail.setdefault(sent.peer, []).append(
                                InputArrived(1, sent.consumer, sent.producer, sent.lane, sent.micro_batch))
                        elif isinstance(sent, SendGradient):
                            mail.setdefault(sent.peer, []).append(
                                GradientArrived(1, sent.producer, sent.consumer, sent.lane, sent.micro_batch))
                    action = _compute_of(out)
                running[node] = None
            if not mail:
                break
            for node, events in mail.items():  # then every message crosses, and each node picks once
                running[node] = _compute_of(machines[node].deliver(events))
        unfinished = sorted(n for n, m in machines.items() if not m.done)
        if unfinished:  # a wiring the policy cannot finish: a bug, not a user error
            raise RuntimeError(f"schedule {self.schedule} leaves {', '.join(unfinished)} unfinished in {shape}")
        return {node: tuple(steps) for node, steps in executed.items()}


def _compute_of(actions: list[Action]) -> Optional[Union[Forward, Backward]]:
    return next((a for a in actions if isinstance(a, (Forward, Backward))), None)


def format_orders(orders: dict[str, tuple[Step, ...]]) -> dict[str, str]:
    """Every node's order printed like torch's pipeline_order: `bottom.F0 bottom.F1 bottom.B0 ...`
    (with `[lane]` when the round has several lanes)."""
    with_lane = len({step.lane for steps in orders.values() for step in steps}) > 1
    return {node: " ".join(step.label(with_lane) for step in steps) for node, steps in orders.items()}


def schedule_document(topology: Any) -> dict[str, Any]:
    """The first training step's order on every node (`meshsl plan --schedule`, `meshsl.plan()`)."""
    from meshsl.schedule.steps import epoch_steps  # the sample pools: read only when a schedule is asked for
    training = topology.spec.training
    lanes = epoch_steps(topology)[0].lanes
    orders = RoundPlanner.for_topology(topology).orders("train", lanes, training.micro_batches)
    return {"policy": training.schedule, "micro_batches": training.micro_batches, "lanes": list(lanes),
            "staleness": training.staleness, "train": format_orders(orders)}


__all__ = ["RoundPlanner", "RoundShape", "format_orders", "schedule_document"]
