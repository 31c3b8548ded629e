"""Latency hiding (`training.staleness: k`, docs/wan.md): several steps in flight on stashed weights.

Step s runs forward and backward on W_{s-k} (the weights after steps 0 .. s-k-1) and its update is
applied to the live weights in step order. Checked here: the state machine keeps k + 1 rounds in flight
and applies in order; the split run equals an unsplit reference of the same rule; weights do not depend
on timing (in-process and over real processes, also across a SIGKILL of a middle hop); the features it
cannot support are refused by name."""
import asyncio
import signal
from pathlib import Path

import pytest
import torch
import yaml

from meshsl.config.loader import ConfigErrors
from meshsl.errors import ProtocolError
from meshsl.apps.reference import train_reference
from meshsl.machines import node as m
from meshsl.coordinator.runtime import RunOptions
from meshsl.launch.simulate import simulate
from meshsl.machines.stale import StaleMachine

from support.documents import chain, topology_of  # noqa: E402
from support.processes import assert_same_weights, chaos_topology, kill_at, saved_weights as weights, train  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


# ---- the state machine --------------------------------------------------------------------------
def client_machine(k: int, micro_batches: int = 2) -> StaleMachine:
    wiring = m.Wiring(node="client", segments={"bottom": m.SegmentWiring(
        name="bottom", lanes=(0,), inputs=("x",), segment_inputs=(), consumers=("top",), window=4)},
        node_of={"bottom": ("client",), "top": ("server",)})
    return StaleMachine(wiring, "1f1b", staleness=k)


def drive(machine: StaleMachine, actions: list, log: list) -> list:
    """Finish every compute action (gradients are not answered): returns the activations sent."""
    sent, queue = [], list(actions)
    while queue:
        action = queue.pop(0)
        log.append(action)
        if isinstance(action, (m.Prepare, m.Forward, m.Backward, m.ApplyOptimizer)):
            queue.extend(machine.handle(m.ComputeFinished(action)))
        elif isinstance(action, m.SendActivation):
            sent.append(action)
    return sent


def test_k_plus_one_steps_in_flight_and_optimizer_steps_in_round_order():
    k, M = 2, 2
    machine = client_machine(k, M)
    log: list = []
    sent = drive(machine, machine.handle(m.RunSteps(1, tuple((s, (0,)) for s in range(6)), M)), log)
    # Rounds 1..3 (k + 1) begun and their activations out before any gradient came back; not round 4.
    assert sorted({a.round for a in sent}) == [1, 2, 3]
    assert [a.round for a in log if isinstance(a, m.Prepare)] == [1, 2, 3]
    # Gradients of round 2 first: its backwards run, but its optimizer step waits for round 1's.
    for mb in range(M):
        log.extend(machine.handle(m.GradientArrived(2, "bottom", "top", 0, mb)))
    drive(machine, [a for a in log[-M:] if isinstance(a, m.Backward)], log)
    assert not any(isinstance(a, m.ApplyOptimizer) for a in log)
    before = len(log)
    actions = []
    for mb in range(M):
        actions += machine.handle(m.GradientArrived(1, "bottom", "top", 0, mb))
    drive(machine, actions, log)
    applied = [a.round for a in log[before:] if isinstance(a, m.ApplyOptimizer)]
    done = [a.round for a in log[before:] if isinstance(a, m.RoundDone)]
    assert applied == [1, 2] and done == [1, 2]
    # Two steps applied: rounds 4 and 5 begin (within the lag of the coordinator's commits).
    assert [a.round for a in log[before:] if isinstance(a, m.Prepare)] == [4, 5]
    assert machine.pending_commit == 3 and len(machine.rounds) == k + 1


def test_early_messages_within_the_window_are_held_and_beyond_it_refused():
    machine = client_machine(1)
    machine.handle(m.RunSteps(1, ((0, (0,)),), 1))  # round 1 begins (its Prepare is on the thread)
    machine.handle(m.GradientArrived(3, "bottom", "top", 0, 0))  # k + 1 rounds ahead: held
    with pytest.raises(ProtocolError) as caught:
        machine.handle(m.GradientArrived(4, "bottom", "top", 0, 0))
    assert caught.value.reason == "future_round"
    with pytest.raises(ProtocolError):
        machine.handle(m.GradientArrived(3, "bottom", "top", 0, 0))  # the same message twice


# ---- in-process runs ----------------------------------------------------------------------------
def stale_chain(k: int, hops: int, micro_batches: int, schedule: str, optimizer: str, steps: int = 10) -> dict:
    document = chain(hops, micro_batches, schedule, optimizer)
    document["training"].update(staleness=k, steps=steps)
    return document


def simulated_weights(topology) -> dict:
    summary, runtimes = asyncio.run(simulate(topology, RunOptions(evaluate=False)))
    return {name: {key: value.clone() for key, value in module.state_dict().items()}
            for runtime in runtimes.values() for name, module in runtime.worker.modules.items()}


@pytest.mark.parametrize("k,hops,micro_batches,schedule,optimizer", [
    (1, 2, 1, "gpipe", "sgd"), (3, 4, 8, "1f1b", "adam"),
])
def test_split_run_equals_the_unsplit_stale_reference_and_is_bit_identical_run_to_run(
        k, hops, micro_batches, schedule, optimizer):
    topology = topology_of(stale_chain(k, hops, micro_batches, schedule, optimizer))
    reference, _ = train_reference(topology)
    first, second = simulated_weights(topology), simulated_weights(topology)
    for segment, state in reference.items():
        for key, value in state.items():
            torch.testing.assert_close(first[segment][key], value, rtol=1e-4, atol=1e-5)
            assert torch.equal(first[segment][key], second[segment][key]), f"{segment}.{key} not deterministic"
    synchronous, _ = train_reference(topology_of(stale_chain(0, hops, micro_batches, schedule, optimizer)))
    assert any(not torch.allclose(synchronous["s0"][key], reference["s0"][key]) for key in reference["s0"])


def test_stale_training_still_learns_digits():
    """A weak, robust version of the benchmark's accuracy figure (benchmarks/staleness_accuracy.py, which
    reports the honest cost): with k = 1 the two-party model still learns (chance is 0.1; synchronous
    training of the same 3 epochs reaches 0.88)."""
    document = yaml.safe_load((ROOT / "topologies" / "vanilla.yaml").read_text())
    document["training"].update(epochs=3, eval_every=0, staleness=1)
    summary, _ = asyncio.run(simulate(topology_of(document), RunOptions()))
    assert summary["tasks"]["digit"]["eval"]["accuracy"] > 0.6


@pytest.mark.parametrize("change,where", [
    (lambda d: d.update(clients={"count": 2, "replicate": ["client"], "mode": "splitfed"}), "clients"),
    (lambda d: d["segments"][0]["layers"].insert(1, ["Dropout", 0.1]), "segments[0](bottom).layers[1]"),
    (lambda d: d["training"].update(label_dp={"epsilon": 2.0}), "training.label_dp"),
])
def test_what_staleness_cannot_support_is_refused_by_name(change, where):
    document = yaml.safe_load((ROOT / "topologies" / "vanilla.yaml").read_text())
    document["training"]["staleness"] = 2
    change(document)
    with pytest.raises(ConfigErrors) as caught:
        topology_of(document)
    assert "training.staleness" in str(caught.value) and where in str(caught.value)


# ---- real processes -----------------------------------------------------------------------------
def test_sigkill_of_a_middle_hop_with_staleness_replays_exactly(tmp_path):
    """Five processes on real sockets, k = 2: the run with relay_2 killed (restored from a checkpoint with its
    stashed versions) ends with the weights of the uninterrupted run, and those equal the in-process run's."""
    path = chaos_topology(tmp_path, "multi_hop.yaml", every=2, steps=14, timeout_s=60,
                          heartbeat_timeout_s=10.0)  # generous: a starved CI machine is not a lost node
    document = yaml.safe_load(path.read_text())
    document["training"]["staleness"] = 2
    path.write_text(yaml.safe_dump(document))
    train(path, tmp_path / "clean")
    summary, run = train(path, tmp_path / "chaos", kill_at("relay_2", 6, signal.SIGKILL))
    assert run.restarts.get("relay_2") == 1 and summary["failovers"] == 1
    clean = weights(tmp_path / "clean")
    assert_same_weights(weights(tmp_path / "chaos"), clean)
    simulated = simulated_weights(topology_of(document))
    assert_same_weights({s: dict(w) for s, w in clean.items() if s in simulated},
                        {s: simulated[s] for s in clean if s in simulated})
