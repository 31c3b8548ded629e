"""Every typed control parser rejects what it must (issue 30), by a table of hand-picked cases; the fuzz
(tests/e2e/test_security_fuzz.py) generates many more and asserts each is rejected too.
Each row is a valid message with one field made wrong; the parser must raise ProtocolError(bad_control)."""
from __future__ import annotations

import math

import pytest

from meshsl.errors import ProtocolError
from meshsl.protocol import control
from meshsl.protocol.envelope import Kind
from support.control_samples import VALID_CONTROL_META

pytestmark = pytest.mark.unit

VALID = VALID_CONTROL_META


def _task(**stat):
    return {"tasks": {"digit": {"loss_sum": 1.0, "correct": 1, "count": 2, **stat}}, "bytes": {}}


WRONG = [
    (Kind.DONE, _task(loss_sum=math.nan)),
    (Kind.DONE, _task(loss_sum=math.inf)),
    (Kind.DONE, _task(loss_sum=-math.inf)),
    (Kind.DONE, _task(loss_sum="1.0")),
    (Kind.DONE, _task(loss_sum=True)),
    (Kind.DONE, _task(count=-1)),
    (Kind.DONE, _task(count=2.0)),
    (Kind.DONE, _task(correct=True)),
    (Kind.DONE, {"tasks": [1, 2], "bytes": {}}),
    (Kind.DONE, {"tasks": {"digit": 3}, "bytes": {}}),
    (Kind.DONE, {**_task(), "bytes": []}),
    (Kind.DONE, {**_task(), "leakage": 0.5}),
    (Kind.DONE, {**_task(), "checkpoint": "3"}),
    (Kind.BEGIN, {**VALID[Kind.BEGIN], "micro_batches": 0}),
    (Kind.BEGIN, {**VALID[Kind.BEGIN], "micro_batches": True}),
    (Kind.BEGIN, {**VALID[Kind.BEGIN], "lanes": "0"}),
    (Kind.BEGIN, {**VALID[Kind.BEGIN], "lanes": [-1]}),
    (Kind.BEGIN, {**VALID[Kind.BEGIN], "epoch": -1}),
    (Kind.RUN, {**VALID[Kind.RUN], "count": 0}),
    (Kind.RUN, {**VALID[Kind.RUN], "first_step": -2}),
    (Kind.RUN, {**VALID[Kind.RUN], "hold_checkpoint": "yes"}),
    (Kind.RESTORE, {**VALID[Kind.RESTORE], "checkpoint": -1}),
    (Kind.RESTORE, {**VALID[Kind.RESTORE], "endpoints": [1]}),
    (Kind.WEIGHTS_PULL, {"segment": 7}),
    (Kind.HELLO, {**VALID[Kind.HELLO], "checkpoints": "0"}),
    (Kind.HELLO, {**VALID[Kind.HELLO], "checkpoints": [-1]}),
    (Kind.ACK, {**VALID[Kind.ACK], "of": 3}),
]


@pytest.mark.parametrize("kind", sorted(VALID, key=lambda k: k.value))
def test_the_valid_messages_parse(kind):
    assert isinstance(control.MESSAGES[kind].from_meta(VALID[kind]), control.MESSAGES[kind])


@pytest.mark.parametrize("kind, meta", WRONG, ids=[f"{k.name}-{i}" for i, (k, _) in enumerate(WRONG)])
def test_one_wrong_field_is_rejected(kind, meta):
    with pytest.raises(ProtocolError) as caught:
        control.MESSAGES[kind].from_meta(meta)
    assert caught.value.reason == "bad_control"


@pytest.mark.parametrize("kind", sorted(VALID, key=lambda k: k.value))
@pytest.mark.parametrize("meta", [None, [], "x", 3])
def test_a_non_object_is_rejected(kind, meta):
    with pytest.raises(ProtocolError):
        control.MESSAGES[kind].from_meta(meta)
