"""Clients that drop out, in one process: a replayed schedule of drops and rejoins (RunOptions.client_schedule)
drives the same coordinator code as a real loss. What goes over the wire is checked against the rules of
docs/failover.md: FedAvg over the survivors only, a rejoining client gets the global weights with a fresh
optimizer, the sequential hand-off skips the dropped client."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
import yaml

from meshsl.config.loader import parse_spec
from meshsl.errors import MeshslError
from meshsl.schedule.steps import sample_pools, training_steps
from meshsl.protocol.envelope import Kind
from meshsl.protocol.frames import decode_message
from meshsl.coordinator.runtime import RunOptions
from meshsl.machines.policies import aggregate
from meshsl.launch.simulate import simulate
from meshsl.topology.model import topology_from_spec

pytestmark = pytest.mark.integration
TOPOLOGIES = Path(__file__).resolve().parents[2] / "topologies"


def topology(name: str, **training):
    document = yaml.safe_load((TOPOLOGIES / name).read_text())
    document["clients"].update(count=3, on_loss="drop")
    document["training"].pop("epochs", None)
    document["training"].update(eval_every=0, **training)
    return topology_from_spec(parse_spec(document), name, TOPOLOGIES)


def run(topo, schedule, evaluate=False):
    """The summary, the runtimes, and the WEIGHTS messages in order: (sender, peer, round, meta, tensors)."""
    weights = []

    def hook(sender, peer, frames):
        envelope, tensors = decode_message([bytes(f) for f in frames], 1 << 30)
        if envelope.kind == Kind.WEIGHTS:
            weights.append((sender, peer, envelope.step, envelope.meta,
                            [parts[0].reshape(d.shape).clone() for parts, d in zip(tensors, envelope.tensors)]))

    summary, runtimes = asyncio.run(simulate(topo, RunOptions(evaluate=evaluate, client_schedule=schedule),
                                             traffic_hook=hook))
    return summary, runtimes, weights


def test_splitfed_averages_the_survivors_and_readmits_with_the_average():
    topo = topology("splitfed.yaml", steps=8)
    schedule = [{"event": "drop", "nodes": ["clinic1"], "step": 2},
                {"event": "rejoin", "nodes": ["clinic1"], "step": 6}]
    summary, runtimes, weights = run(topo, schedule, evaluate=True)
    lanes = {row["step"]: row["lanes"] for row in summary["history"]}
    assert lanes == {0: [0, 1, 2], 1: [0, 1, 2], 2: [0, 2], 3: [0, 2], 4: [0, 2], 5: [0, 2],
                     6: [0, 1, 2], 7: [0, 1, 2]}
    assert [(e["event"], e["step"]) for e in summary["client_events"]] == [("drop", 2), ("rejoin", 6)]
    pools = sample_pools(topo).train
    batch = topo.spec.training.batch_size
    assert summary["samples"] == batch * (3 * 4 + 2 * 4)

    # The FedAvg after step 5 (barrier before 6): pulled from the survivors only, their weighted mean pushed
    # to them and, with a fresh optimizer, to the rejoining client.
    barriers: dict[int, dict] = {}  # round -> {"pulled": {client: weights}, "pushed": [(client, meta, weights)]}
    for sender, peer, round_, meta, w in weights:
        entry = barriers.setdefault(round_, {"pulled": {}, "pushed": []})
        if meta.get("load"):
            entry["pushed"].append((peer, meta, w))
        elif peer == topo.coordinator:
            entry["pulled"][sender] = w
    rounds = sorted(barriers)
    assert [sorted(barriers[r]["pulled"]) for r in rounds] == [  # FedAvg after steps 1, 3, 5, 7
        ["clinic0", "clinic1", "clinic2"], ["clinic0", "clinic2"], ["clinic0", "clinic2"],
        ["clinic0", "clinic1", "clinic2"]]
    at_rejoin = barriers[rounds[2]]
    survivors = {0: at_rejoin["pulled"]["clinic0"], 2: at_rejoin["pulled"]["clinic2"]}
    expected = aggregate(survivors, {lane: len(pools[lane]) for lane in survivors})
    at_rejoin = at_rejoin["pushed"]
    assert sorted(peer for peer, _, _ in at_rejoin) == ["clinic0", "clinic1", "clinic2"]
    for peer, meta, pushed in at_rejoin:
        assert all(torch.equal(a, b) for a, b in zip(pushed, expected))
        assert meta.get("fresh_optimizer", False) == (peer == "clinic1")
    # Evaluation after the rejoin covers every client; the final FedAvg leaves all three equal.
    assert set(summary["tasks"]["digit"]["eval"]["by_client"]) == {"clinic0", "clinic1", "clinic2"}
    final = [list(runtimes[c].worker.modules["bottom"].state_dict().values()) for c in ("clinic0", "clinic1")]
    assert all(torch.equal(a, b) for a, b in zip(*final))


def test_sequential_hand_off_skips_the_dropped_client_and_it_rejoins_at_a_turn_end():
    topo = topology("sequential.yaml", batch_size=128, steps=None)
    one_epoch = training_steps(topo, epochs=1)
    turns = {lane: [s.step for s in one_epoch if s.lanes == (lane,)] for lane in range(3)}
    end_of_first_epoch = len(one_epoch)
    topo = topology("sequential.yaml", batch_size=128, steps=2 * end_of_first_epoch)
    drop_at = turns[1][1]  # in the middle of clinic1's turn
    schedule = [{"event": "drop", "nodes": ["clinic1"], "step": drop_at},
                {"event": "rejoin", "nodes": ["clinic1"], "step": end_of_first_epoch}]  # clinic2's turn end
    summary, runtimes, weights = run(topo, schedule)
    lanes = {row["step"]: row["lanes"] for row in summary["history"]}
    assert all(step not in lanes for step in turns[1][1:])  # the rest of its first turn is skipped
    assert all(lanes[end_of_first_epoch + s] == [1] for s in turns[1])  # its next turn trains again
    assert [(e["event"], e["step"]) for e in summary["client_events"]] == [("drop", drop_at),
                                                                          ("rejoin", end_of_first_epoch)]
    # clinic2's turn starts from clinic0's weights (the last client taking part that finished a turn),
    # not from what clinic1 trained in its unfinished turn.
    pulls = [(s, w) for s, peer, _, meta, w in weights if peer == topo.coordinator and not meta.get("load")]
    pushes = [(peer, meta, w) for s, peer, _, meta, w in weights if meta.get("load")]
    to_clinic2 = next(i for i, (peer, _, _) in enumerate(pushes) if peer == "clinic2")
    assert pulls[to_clinic2][0] == "clinic0"
    assert all(torch.equal(a, b) for a, b in zip(pushes[to_clinic2][2], pulls[to_clinic2][1]))
    # At the end of the first epoch clinic1 is readmitted: fresh optimizer, the weights handed on.
    rejoin = next((peer, meta, w) for peer, meta, w in pushes if meta.get("fresh_optimizer"))
    assert rejoin[0] == "clinic1"


def test_a_schedule_naming_a_node_that_is_no_client_is_a_config_error():
    topo = topology("splitfed.yaml", steps=2)
    with pytest.raises(MeshslError, match=r"client_schedule: not client nodes of this topology: server"):
        run(topo, [{"event": "drop", "nodes": ["server"], "step": 1}])
