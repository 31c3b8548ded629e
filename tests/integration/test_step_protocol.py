"""The step protocol without processes: typed control messages and self-driven steps in the state machine.

(The process-level checks are the equivalence, failover, SplitFed and fuzz suites; docs/wan.md describes
the protocol.)"""
import pytest

from meshsl.errors import ProtocolError
from meshsl.protocol import control
from meshsl.protocol.envelope import Envelope, Kind
from meshsl.machines import node as m


# ---- typed control messages ---------------------------------------------------------------------
@pytest.mark.parametrize("message", [
    control.Begin(lanes=(0, 2), micro_batches=4, epoch=1, train_step=9, step_in_epoch=3),
    control.Run(first_step=12, count=5, micro_batches=8, checkpoint=12, hold_checkpoint=True),
    control.Run(first_step=0, count=1, micro_batches=1),
    control.Restore(checkpoint=4, round=17, endpoints={"client": "tcp://10.0.0.2:5000"}),
    control.WeightsPull(segment="bottom"),
])
def test_control_messages_round_trip_through_meta(message):
    envelope = Envelope(kind=message.kind, topology="t", sender="server", meta=message.to_meta())
    assert control.parse(envelope) == message


@pytest.mark.parametrize("kind,meta,named", [
    (Kind.BEGIN, {"lanes": [0]}, "micro_batches"),  # a KeyError in node.py before typed messages
    (Kind.BEGIN, {"lanes": 3, "micro_batches": 1}, "lanes"),  # a TypeError before
    (Kind.BEGIN, {"lanes": [0], "micro_batches": "4"}, "micro_batches"),
    (Kind.BEGIN, {"lanes": [-1], "micro_batches": 1}, "lanes"),
    (Kind.RUN, {"first_step": 0, "count": 0, "micro_batches": 1}, "count"),
    (Kind.RUN, {"first_step": True, "count": 1, "micro_batches": 1}, "first_step"),
    (Kind.RUN, {"first_step": 0, "count": 1, "micro_batches": 1, "hold_checkpoint": 1}, "hold_checkpoint"),
    (Kind.RESTORE, {"checkpoint": 2}, "round"),
    (Kind.RESTORE, {"checkpoint": 2, "round": 3, "endpoints": ["x"]}, "endpoints"),
    (Kind.WEIGHTS_PULL, {"segment": 7}, "segment"),
    (Kind.DONE, {"tasks": {"digit": {"count": "many"}}}, "count"),
    (Kind.DONE, {"tasks": [1]}, "tasks"),
    (Kind.HELLO, {"checkpoints": "all"}, "checkpoints"),
    (Kind.ACK, {}, "of"),
    (Kind.SHUTDOWN, [], "object"),
])
def test_malformed_control_meta_is_a_protocol_error_naming_the_field(kind, meta, named):
    with pytest.raises(ProtocolError) as caught:
        control.MESSAGES[kind].from_meta(meta)
    assert caught.value.reason == "bad_control"
    assert named in str(caught.value) and kind.value in str(caught.value)


def test_every_control_kind_sent_by_a_node_or_coordinator_has_a_type():
    untyped = {Kind.ACTIVATION, Kind.GRADIENT, Kind.WEIGHTS, Kind.HEARTBEAT}  # tensor headers / no meta
    assert set(control.MESSAGES) | untyped == set(Kind)


# ---- self-driven steps in the state machine -----------------------------------------------------
def client_wiring() -> m.Wiring:
    """The client of vanilla.yaml: `bottom` here, `top` on the server."""
    return m.Wiring(node="client", segments={"bottom": m.SegmentWiring(
        name="bottom", lanes=(0,), inputs=("x",), segment_inputs=(), consumers=("top",), window=4)},
        node_of={"bottom": ("client",), "top": ("server",)})


def run_step(machine: m.NodeMachine, first: list) -> list:
    """Finish one self-driven step whose first actions are `first`: compute everything, answer every
    activation with its gradient at once. Returns every action seen after the step's Prepare."""
    seen, queue = [], list(first)
    while queue:
        action = queue.pop(0)
        seen.append(action)
        if isinstance(action, (m.Prepare, m.Forward, m.Backward, m.ApplyOptimizer)):
            queue.extend(machine.handle(m.ComputeFinished(action)))
        elif isinstance(action, m.SendActivation):
            queue.extend(machine.handle(m.GradientArrived(action.round, "bottom", "top", action.lane,
                                                          action.micro_batch)))
        elif isinstance(action, m.RoundDone):
            break
    return seen


def test_a_node_applies_and_begins_the_next_step_itself_within_the_lag():
    machine = m.NodeMachine(client_wiring(), "1f1b", lag=2)
    first = machine.handle(m.RunSteps(first_round=11, steps=((0, (0,)), (1, (0,)), (2, (0,)), (3, (0,))), micro_batches=2))
    assert first == [m.Prepare(11, 0, (0,))]
    seen = run_step(machine, first)
    # The optimizer step comes before the report, with no Commit in between (control off the path).
    kinds = [type(a).__name__ for a in seen]
    assert kinds.index("ApplyOptimizer") < kinds.index("RoundDone")
    assert seen[-1] == m.RoundDone(11, "train")
    follow = machine.handle(m.ComputeFinished(m.ApplyOptimizer(11))) if machine.running else []
    assert follow == []  # nothing stale: the chain already moved on
    # Step 2 (round 12) began at once: round 12 - lag(2) = 10 is settled by the Run.
    assert machine.round == 12 and machine.running == m.Prepare(12, 1, (0,))
    seen = run_step(machine, [machine.running])
    assert seen[-1] == m.RoundDone(12, "train")
    # Round 13 needs round 11 committed: the node waits for the coordinator ...
    assert machine.round == 12 and machine.running is None and machine.queued
    with pytest.raises(ProtocolError):
        machine.handle(m.CommitRound(14))  # no commit of a round this node has not applied
    assert machine.handle(m.CommitRound(11)) == [m.Prepare(13, 2, (0,))]  # ... and goes on when it comes
    assert machine.handle(m.CommitRound(11)) == []  # duplicates change nothing


def test_early_activation_of_the_next_step_is_held_until_the_node_gets_there():
    server = m.Wiring(node="server", segments={"top": m.SegmentWiring(
        name="top", lanes=(0,), inputs=("bottom",), segment_inputs=("bottom",), consumers=(), window=2)},
        node_of={"bottom": ("client",), "top": ("server",)})
    machine = m.NodeMachine(server, "gpipe")
    assert machine.handle(m.InputArrived(1, "top", "bottom", 0, 0)) == []  # before the Run: held
    assert machine.handle(m.RunSteps(1, ((0, (0,)), (1, (0,))), 1)) == [m.Prepare(1, 0, (0,))]
    assert machine.handle(m.ComputeFinished(m.Prepare(1, 0, (0,)))) == [m.Forward(1, "top", 0, 0)]
    assert machine.handle(m.InputArrived(2, "top", "bottom", 0, 0)) == []  # the next step's, early
    assert machine.handle(m.ComputeFinished(m.Forward(1, "top", 0, 0))) == [m.Backward(1, "top", 0, 0)]
    assert machine.handle(m.ComputeFinished(m.Backward(1, "top", 0, 0))) == [
        m.SendGradient(1, "bottom", "top", 0, 0, "client"), m.ApplyOptimizer(1)]
    assert machine.handle(m.ComputeFinished(m.ApplyOptimizer(1))) == [m.RoundDone(1, "train"), m.Prepare(2, 1, (0,))]
    assert machine.handle(m.ComputeFinished(m.Prepare(2, 1, (0,)))) == [m.Forward(2, "top", 0, 0)]


def test_reset_drops_the_queued_steps_and_a_restore_resumes_from_a_new_run():
    machine = m.NodeMachine(client_wiring(), "gpipe")
    first = machine.handle(m.RunSteps(1, ((0, (0,)), (1, (0,)), (2, (0,))), 1))
    run_step(machine, first)
    machine.reset(40)  # ABORT/RESTORE: the coordinator's next rounds are above 40
    assert not machine.queued and machine.running is None and machine.done
    assert machine.handle(m.ComputeFinished(m.Prepare(2, 1, (0,)))) == []  # a stale action finishing
    assert machine.handle(m.CommitRound(1)) == []  # a late commit of the abandoned rounds
    with pytest.raises(ProtocolError):
        machine.handle(m.RunSteps(40, ((1, (0,)),), 1))  # round 40 is not after the restore's base
    assert machine.handle(m.RunSteps(41, ((1, (0,)),), 1)) == [m.Prepare(41, 1, (0,))]


def test_a_node_without_work_in_a_step_still_applies_and_reports_it():
    """Sequential split learning: a client not training this step passes through it in order."""
    machine = m.NodeMachine(client_wiring(), "gpipe")
    first = machine.handle(m.RunSteps(1, ((0, (1,)),), 1))  # lane 1 only: nothing on this node
    assert machine.handle(m.ComputeFinished(first[0])) == [m.ApplyOptimizer(1)]
    assert machine.handle(m.ComputeFinished(m.ApplyOptimizer(1))) == [m.RoundDone(1, "train")]


def test_run_or_begin_during_self_driven_steps_is_rejected():
    machine = m.NodeMachine(client_wiring(), "gpipe")
    machine.handle(m.RunSteps(1, ((0, (0,)), (1, (0,))), 1))
    with pytest.raises(ProtocolError):
        machine.handle(m.RunSteps(5, ((3, (0,)),), 1))
    with pytest.raises(ProtocolError):
        machine.handle(m.BeginRound(9, "eval", (0,), 1))


def test_the_1f1b_window_is_the_micro_batch_count_by_default():
    from pathlib import Path
    import yaml
    from meshsl.config.loader import parse_spec
    from meshsl.topology.model import topology_from_spec
    root = Path(__file__).resolve().parents[2]
    document = yaml.safe_load((root / "topologies" / "vanilla.yaml").read_text())
    document["training"].update(micro_batches=8, schedule="1f1b")
    wiring = m.Wiring.from_topology(topology_from_spec(parse_spec(document), "<test>", root), "client")
    assert wiring.segments["bottom"].window == 8  # was 2 (stages to the loss): M/2 round trips a step
    document["training"]["window"] = 3
    wiring = m.Wiring.from_topology(topology_from_spec(parse_spec(document), "<test>", root), "client")
    assert wiring.segments["bottom"].window == 3


# ---- checkpoints at weight-changing barriers (issue 15, item 1) ---------------------------------
def test_splitfed_checkpoints_at_an_averaging_step_hold_the_averaged_weights(tmp_path):
    """A checkpoint of step k where FedAvg follows step k is written after the averaging (by the next Run),
    so a restore from it never skips the averaging: every client's copy of it holds the same weights."""
    import asyncio

    import torch

    from benchmarks.common import splitfed_document, topology_from_document
    from meshsl.compute import checkpoint
    from meshsl.coordinator.runtime import RunOptions
    from meshsl.launch.simulate import simulate

    document = splitfed_document(4, steps=5, average_every=2)
    document["checkpoint"] = {"every": 1, "directory": str(tmp_path / "ck")}
    topology = topology_from_document(document)
    asyncio.run(simulate(topology, RunOptions(evaluate=False)))
    clients = [topology.node_of("bottom", lane) for lane in range(4)]
    kept = checkpoint.available_steps(tmp_path / "ck", clients[0])  # the newest few of steps 0..5
    assert {3, 4} <= set(kept)
    for step in [s for s in kept if s > 0]:
        states = [checkpoint.load(tmp_path / "ck", c, step)["modules"]["bottom"] for c in clients]
        same = all(torch.equal(s[k], states[0][k]) for s in states[1:] for k in s)
        # After an averaging step every client holds the average; in between each trained on its own shard.
        assert same == (step % 2 == 0), f"checkpoint {step}: clients {'agree' if same else 'differ'}"


def test_the_round_stages_follow_the_transition_table():
    """The stage is explicit (machines/node.py: Stage, TRANSITIONS): a self-driven step goes IDLE ->
    PREPARING -> COMPUTING -> APPLYING -> IDLE, a coordinator-driven training round waits for its
    COMMIT, and a transition outside the table is a bug raised at once."""
    assert set(m.TRANSITIONS) == set(m.Stage)
    server = m.Wiring(node="server", segments={"top": m.SegmentWiring(
        name="top", lanes=(0,), inputs=("bottom",), segment_inputs=("bottom",), consumers=(), window=2)},
        node_of={"bottom": ("client",), "top": ("server",)})
    machine = m.NodeMachine(server, "gpipe")
    seen = [machine.stage]
    for event in (m.RunSteps(1, ((0, (0,)),), 1), m.ComputeFinished(m.Prepare(1, 0, (0,))),
                  m.InputArrived(1, "top", "bottom", 0, 0), m.ComputeFinished(m.Forward(1, "top", 0, 0)),
                  m.ComputeFinished(m.Backward(1, "top", 0, 0)), m.ComputeFinished(m.ApplyOptimizer(1))):
        machine.handle(event)
        seen.append(machine.stage)
    assert [s.name for s in dict.fromkeys(seen)] == ["IDLE", "PREPARING", "COMPUTING", "APPLYING"]
    assert seen[-1] == m.Stage.IDLE
    driven = m.NodeMachine(server, "gpipe")
    driven.handle(m.BeginRound(5, "train", (0,), 1))
    driven.handle(m.InputArrived(5, "top", "bottom", 0, 0))
    driven.handle(m.ComputeFinished(m.Forward(5, "top", 0, 0)))
    assert driven.handle(m.ComputeFinished(m.Backward(5, "top", 0, 0)))[-1] == m.RoundDone(5, "train")
    assert driven.stage == m.Stage.WAITING_COMMIT
    assert driven.handle(m.CommitRound(5)) == [m.ApplyOptimizer(5)] and driven.stage == m.Stage.APPLYING
    driven.handle(m.ComputeFinished(m.ApplyOptimizer(5)))
    with pytest.raises(ProtocolError):  # a second COMMIT of an applied round is refused, never applied twice
        driven.handle(m.CommitRound(5))
    with pytest.raises(RuntimeError, match="IDLE -> APPLYING"):
        driven._enter(m.Stage.APPLYING)
