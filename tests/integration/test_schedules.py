"""A round's schedule is data (issue 30): `meshsl plan --schedule` prints every node's compute order for
GPipe, 1F1B and stale, and a node executes exactly that order -- it waits for the order's next action
even when another one is ready."""
from __future__ import annotations

import asyncio

import pytest

from meshsl.coordinator.runtime import RunOptions
from meshsl.launch.simulate import simulate
from meshsl.machines import node as m
from meshsl.machines.schedules import RoundPlanner, format_orders, schedule_document
from meshsl.topology.model import load_topology

from support.paths import TOPOLOGIES


def _topology(name: str, **overrides):
    assignments = [f"{key}={value}" for key, value in overrides.items()]
    return load_topology(TOPOLOGIES / name, overrides=assignments)


@pytest.mark.unit
def test_vanilla_orders_print_like_pipeline_order():
    planner = RoundPlanner.for_topology(_topology("vanilla.yaml", **{"training.schedule": "gpipe"}))
    printed = format_orders(planner.orders("train", (0,), 4))
    assert printed == {"client": "bottom.F0 bottom.F1 bottom.F2 bottom.F3 bottom.B0 bottom.B1 bottom.B2 bottom.B3",
                       "server": "top.F0 top.F1 top.F2 top.F3 top.B0 top.B1 top.B2 top.B3"}
    one_f_one_b = RoundPlanner.for_topology(_topology("vanilla.yaml", **{"training.schedule": "1f1b"}))
    assert format_orders(one_f_one_b.orders("train", (0,), 2))["server"] == "top.F0 top.B0 top.F1 top.B1"
    assert format_orders(one_f_one_b.orders("eval", (0,), 2))["server"] == "top.F0 top.F1"


@pytest.mark.unit
@pytest.mark.parametrize("name", ["u_shaped.yaml", "multi_hop.yaml", "splitfed.yaml", "vertical.yaml",
                                  "multi_task.yaml"])
def test_every_unit_once_and_backwards_in_micro_batch_order(name):
    """Each order covers its node's units exactly once, and a segment's backwards keep (micro-batch, lane)
    order: the gradient sums, and so the weights, do not depend on the schedule."""
    topology = _topology(name)
    training = topology.spec.training
    orders = RoundPlanner.for_topology(topology).orders("train", tuple(range(topology.lanes)), training.micro_batches)
    for node, steps in orders.items():
        assert len(set(steps)) == len(steps)
        forwards = {(s.segment, s.lane, s.micro_batch) for s in steps if s.kind == "F"}
        assert forwards == {(s.segment, s.lane, s.micro_batch) for s in steps if s.kind == "B"}
        for segment in {s.segment for s in steps}:
            backwards = [(s.micro_batch, s.lane) for s in steps if s.kind == "B" and s.segment == segment]
            assert backwards == sorted(backwards), (node, segment)


@pytest.mark.unit
def test_a_node_waits_for_its_orders_next_action():
    """GPipe server: the input of micro-batch 1 arrives first; the node does not run it before 0."""
    topology = _topology("vanilla.yaml", **{"training.schedule": "gpipe"})
    machine = m.NodeMachine(m.Wiring.from_topology(topology, "server"), "gpipe",
                            planner=RoundPlanner.for_topology(topology))
    assert machine.handle(m.BeginRound(1, "train", (0,), 4)) == []
    assert machine.handle(m.InputArrived(1, "top", "bottom", 0, 1)) == []  # ready, but not next
    assert machine.handle(m.InputArrived(1, "top", "bottom", 0, 0)) == [m.Forward(1, "top", 0, 0)]
    unplanned = m.NodeMachine(m.Wiring.from_topology(topology, "server"), "gpipe")  # the policy alone
    unplanned.handle(m.BeginRound(1, "train", (0,), 4))
    assert unplanned.handle(m.InputArrived(1, "top", "bottom", 0, 1)) == [m.Forward(1, "top", 0, 1)]


@pytest.mark.integration
@pytest.mark.parametrize("name, overrides", [
    ("vanilla.yaml", {"training.schedule": "gpipe"}),
    ("u_shaped.yaml", {"training.schedule": "1f1b"}),
    ("multi_hop.yaml", {}),
    ("splitfed.yaml", {}),
    ("vanilla.yaml", {"training.staleness": 1}),
])
def test_each_node_executes_the_printed_order(name, overrides):
    """A real run (every node's runtime, its compute thread, in-process transport): the last training
    step each node ran is, action for action, what `meshsl plan --schedule` prints."""
    topology = _topology(name, **{"training.steps": 3, "training.eval_every": 0, **overrides})
    printed = schedule_document(topology)
    _, runtimes = asyncio.run(simulate(topology, RunOptions(evaluate=False)))
    with_lane = topology.lanes > 1
    for node, runtime in runtimes.items():
        machine = runtime.machine
        steps = machine.last_executed[1] if hasattr(machine, "last_executed") else machine.executed
        assert " ".join(s.label(with_lane) for s in steps) == printed["train"][node], node
