"""One class per control message (issue 30): every control kind, in both directions, has exactly one
typed class in meshsl.protocol.control; no state machine or shell defines a class of the same name;
each message survives its own wire form; and the coordinator's events carry those classes."""
from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

import pytest

from meshsl.node.runtime import CONTROL_FROM_COORDINATOR, TO_COORDINATOR
from meshsl.protocol import control
from meshsl.protocol.envelope import Kind

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2] / "meshsl"
TENSOR_KINDS = {Kind.ACTIVATION, Kind.GRADIENT}  # typed by their header (edge, shape, dtype), not a class

SAMPLES = [
    control.Begin(lanes=(0, 2), micro_batches=4, epoch=1, train_step=3, step_in_epoch=2, offset=5, count=6),
    control.Run(first_step=3, count=8, micro_batches=2, checkpoint=2, hold_checkpoint=True, dropped_lanes=(1,)),
    control.Commit(), control.Abort(),
    control.Restore(checkpoint=4, round=9, endpoints={"a": "tcp://h:1"}),
    control.WeightsPull(segment="bottom"), control.Shutdown(abort="boom"), control.Shutdown(dropped="left out"),
    control.Hello(checkpoints=(0, 4), endpoint="tcp://h:2", incarnation="a-1", predict_rows=12),
    control.Hello(endpoint=None, incarnation="dial-out"),
    control.Ack(of="checkpoint", checkpoint=4), control.Ack(of="weights", segment="bottom"),
    control.Done(checkpoint=4, tasks={"t": {"count": 8, "correct": 5, "loss_sum": 3.5}}, leakage={"a->b": 0.4},
                 label_leakage={"a->b": 0.6}, label_leakage_upper_bound={"a->b": 0.9}, bytes={"a->b|forward": 1024},
                 rejected={"bad_shape": 1}, compute_seconds=0.5, wall_seconds=0.75, predicted={"t": 8},
                 hijack_check={"verdict": "ok"}, privacy_spent={"a->b|dp": 1.5}),
    control.Failed(error="out of memory"),
    control.Weights(segment="bottom", load=True, fresh_optimizer=True), control.Heartbeat(incarnation="c-1"),
]


def _class_names(folder: str) -> list[str]:
    names = []
    for path in (ROOT / folder).glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names += [node.name for node in tree.body if isinstance(node, ast.ClassDef)]
    return names


def test_every_control_kind_has_exactly_one_class():
    assert set(control.MESSAGES) == set(Kind) - TENSOR_KINDS
    assert all(cls.kind == kind for kind, cls in control.MESSAGES.items())
    assert TO_COORDINATOR | CONTROL_FROM_COORDINATOR <= set(control.MESSAGES)


def test_no_class_name_is_defined_twice_among_the_machines_the_shells_and_the_protocol():
    names = [n for folder in ("machines", "protocol", "node", "coordinator") for n in _class_names(folder)]
    twice = sorted(n for n, count in Counter(names).items() if count > 1)
    assert twice == []


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_a_message_survives_its_wire_form(message):
    assert type(message).from_meta(message.to_meta()) == message
