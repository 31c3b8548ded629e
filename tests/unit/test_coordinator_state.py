"""The run's state (round numbers, the deferred checkpoint, the nodes taking part, the HELLO book) belongs
to the I/O-free CoordinatorMachine: the async shells read it and change it only through the machine's
transitions (issue 30). This test reads the shells' code: any assignment to one of those fields, on any
object, or any write into the machine's book or inbox of early DONEs, fails it, naming the line."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from meshsl.machines.coordinator import CoordinatorMachine
from meshsl.machines.policies import ClientRoster

SHELL = Path(__file__).resolve().parents[2] / "meshsl" / "coordinator"
SHELLS = sorted(p.name for p in SHELL.glob("*.py") if p.name != "__init__.py")  # every async part of the shell
STATE = {"round", "deferred_checkpoint", "nodes", "all_nodes", "book", "ahead", "wait", "liveness"}
MUTATORS = {"clear", "pop", "update", "add", "discard", "append", "setdefault", "popitem", "remove"}


def _writes(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
        for target in targets:
            while isinstance(target, ast.Subscript):  # book.checkpoints[n] = ...: a write into the state
                target = target.value
            if isinstance(target, ast.Attribute) and (target.attr in STATE or _through_state(target.value)):
                found.append((node.lineno, ast.unparse(target)))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in MUTATORS \
                and _through_state(node.func.value):
            found.append((node.lineno, ast.unparse(node.func)))
    return found


def _through_state(expr: ast.AST) -> bool:
    """`machine.book.x`, `coordinator.machine.ahead`, ...: an expression that reaches into the state."""
    while isinstance(expr, (ast.Attribute, ast.Subscript)):
        if isinstance(expr, ast.Attribute) and expr.attr in STATE - {"nodes", "round"}:
            return True
        expr = expr.value
    return False


@pytest.mark.parametrize("shell", SHELLS)
def test_the_coordinator_shells_write_no_field_of_the_run_state(shell):
    writes = _writes(ast.parse((SHELL / shell).read_text()))
    assert writes == [], f"{shell} writes the run's state outside CoordinatorMachine: {writes}"


def test_the_checker_sees_the_writes_it_forbids():
    planted = ("coordinator.round += 1\nself.deferred_checkpoint = None\nself.machine.book.checkpoints[n] = set()\n"
               "coordinator.machine.ahead.clear()\nx = coordinator.round\n")
    assert [line for line, _ in _writes(ast.parse(planted))] == [1, 2, 3, 4]


def test_the_run_state_transitions():
    class Policy:
        heartbeat_timeout_s = 5.0
    roster = ClientRoster.from_topology(type("T", (), {"spec": type("S", (), {"clients": None})(), "lanes": 1,
                                                       "nodes": {"a": None, "b": None}})())
    machine = CoordinatorMachine("a", ["a", "b"], Policy(), 0.0, roster=roster)
    machine.start_at(1000)
    assert machine.run_rounds(5) == 1000 and machine.round == 1005 and machine.next_round() == 1006
    machine.defer_checkpoint(8)
    assert machine.take_deferred_checkpoint() == 8 and machine.take_deferred_checkpoint() is None
    machine.defer_checkpoint(9)
    machine.ahead[("done", 3)] = {}
    assert machine.restoring() == 1007 and machine.deferred_checkpoint is None and not machine.ahead
