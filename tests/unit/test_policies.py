"""The coordinator's pure round policies (machines/policies.py), without processes or sockets."""
from __future__ import annotations

import pytest
import torch
import yaml

from meshsl.config.loader import parse_spec
from meshsl.errors import ConfigError, PeerFailed, ProtocolError
from meshsl.protocol import control
from meshsl.protocol.envelope import Envelope, Kind
from meshsl.machines.policies import ClientRoster, FedAvg, aggregate

pytestmark = pytest.mark.unit


def test_aggregate_is_the_sample_weighted_mean_over_the_clients_given():
    weights = {0: [torch.tensor([1.0, 2.0])], 1: [torch.tensor([3.0, 6.0])], 2: [torch.tensor([100.0, 100.0])]}
    counts = {0: 10, 1: 30, 2: 60}
    survivors = {lane: weights[lane] for lane in (0, 1)}  # client 2 dropped: it weighs nothing
    (average,) = aggregate(survivors, counts)
    assert torch.equal(average, torch.tensor([2.5, 5.0]))
    (everyone,) = aggregate(weights, counts)
    assert torch.allclose(everyone, torch.tensor([0.1 + 0.9 + 60.0, 0.2 + 1.8 + 60.0]))


def test_fedavg_keeps_dtype_and_is_order_exact():
    """Summed in float64 in client order, then cast back: the bits do not depend on how clients are batched."""
    torch.manual_seed(0)
    weights = {lane: [torch.randn(7, 3), torch.randn(3)] for lane in range(5)}
    counts = {lane: 11 + lane * 7 for lane in range(5)}
    streamed = FedAvg(counts)
    for lane in range(5):
        streamed.add(lane, weights[lane])
    at_once = aggregate(weights, counts)
    assert all(a.dtype == torch.float32 for a in at_once)
    assert all(torch.equal(a, b) for a, b in zip(streamed.result(), at_once))
    total = sum(counts.values())  # the arithmetic the coordinator always used
    expected = None
    for lane in range(5):
        scaled = [w.double() * (counts[lane] / total) for w in weights[lane]]
        expected = scaled if expected is None else [e + s for e, s in zip(expected, scaled)]
    assert all(torch.equal(a, e.to(torch.float32)) for a, e in zip(at_once, expected))


def test_fedavg_of_no_client_is_an_error():
    with pytest.raises(ValueError):
        FedAvg({}).result()


def roster(on_loss: str = "drop", min_clients: int = 1, lanes: int = 4) -> ClientRoster:
    return ClientRoster({lane: [f"c{lane}"] for lane in range(lanes)}, on_loss, min_clients)


def test_only_client_nodes_drop_and_only_in_drop_mode():
    assert roster().can_drop({"c1"}) and roster().can_drop({"c1", "c2"})
    assert not roster().can_drop({"server"}) and not roster().can_drop({"c1", "server"})
    assert not roster("wait").can_drop({"c1"})


def test_drop_then_rejoin_at_a_barrier():
    r = roster()
    change = r.drop({"c1"}, step=4, cause="heartbeat")
    assert change.to_dict() == {"event": "drop", "nodes": ["c1"], "lanes": [1], "step": 4, "cause": "heartbeat"}
    assert r.active_lanes(range(4)) == (0, 2, 3) and r.dropped_lanes() == (1,)
    assert r.active_nodes(["server", "c0", "c1", "c2", "c3"]) == ["server", "c0", "c2", "c3"]
    assert r.ready_to_rejoin() == ()
    assert not r.note_return("c2")  # not dropped: nothing to note
    assert r.note_return("c1") and r.ready_to_rejoin() == (1,)
    rejoin = r.readmit((1,), step=6)
    assert (rejoin.event, rejoin.lanes, rejoin.step) == ("rejoin", (1,), 6)
    assert r.active_lanes(range(4)) == (0, 1, 2, 3) and not r.dropped
    assert [c.event for c in r.changes] == ["drop", "rejoin"]


def test_losing_a_dropped_client_again_changes_nothing_but_its_return():
    r = roster()
    r.drop({"c1"}, 4, "timeout")
    r.note_return("c1")
    assert r.drop({"c1"}, 8, "timeout") is None
    assert r.dropped == {1: 4} and r.ready_to_rejoin() == ()


def test_below_min_clients_fails_naming_the_floor():
    r = roster(min_clients=3)
    r.drop({"c0"}, 2, "heartbeat")  # 3 left
    with pytest.raises(PeerFailed, match=r"1 of 4 clients left, below clients.min_clients = 3"):
        r.drop({"c1", "c2"}, 2, "heartbeat")


def test_a_lane_of_several_nodes_drops_whole_and_rejoins_when_all_are_back():
    r = ClientRoster({0: ["a0", "b0"], 1: ["a1", "b1"]}, "drop", 1)
    change = r.drop({"a1"}, 3, "restarted")
    assert change.nodes == ("a1", "b1") and r.active_nodes(["a0", "b0", "a1", "b1"]) == ["a0", "b0"]
    assert r.ready_to_rejoin() == ()  # b1 is alive and counted back; a1 must announce itself
    r.note_return("a1")
    assert r.ready_to_rejoin() == (1,)


def test_rewind_undoes_readmissions_after_the_restored_step():
    r = roster()
    r.drop({"c2"}, 2, "heartbeat")
    r.note_return("c2")
    r.readmit((2,), 6)
    assert r.rewind(4) == [2] and r.dropped == {2: 4} and r.ready_to_rejoin() == (2,)
    assert r.rewind(4) == []


def test_sequential_hand_off_skips_dropped_clients():
    r = roster()
    turns = [(0,), (0,), (1,), (1,), (2,), (3,)]
    assert r.next_active(turns, 2) == 2
    r.drop({"c1"}, 2, "heartbeat")
    assert r.next_active(turns, 2) == 4
    r.drop({"c2"}, 2, "heartbeat")
    assert r.next_active(turns, 2) == 5
    r.drop({"c3"}, 2, "heartbeat")
    assert r.next_active(turns, 2) is None


SPLITFED = """
name: s
nodes:
  - {name: clinic, endpoint: "tcp://127.0.0.1:5760", party: clinic}
  - {name: server, endpoint: "tcp://127.0.0.1:5769", party: lab}
clients: {count: 3, replicate: [clinic], mode: splitfed, average_every: 2, on_loss: drop, min_clients: 2}
data:
  - {name: pixels, node: clinic, dataset: {name: digits}}
  - {name: digit_labels, node: server, dataset: {name: digits}, kind: labels}
segments:
  - {name: bottom, node: clinic, inputs: [pixels], layers: [[Linear, 64, 8], [ReLU]]}
  - {name: top, node: server, inputs: [bottom], layers: [[Linear, 8, 10]]}
tasks:
  - {name: digit, output: top, labels: digit_labels}
training: {steps: 2, batch_size: 16}
"""


def test_roster_from_a_topology():
    from meshsl.topology.model import topology_from_spec
    topology = topology_from_spec(parse_spec(yaml.safe_load(SPLITFED)), "s.yaml", ".", infer_shapes=False)
    r = ClientRoster.from_topology(topology)
    assert r.nodes_of_lane == {0: ("clinic0",), 1: ("clinic1",), 2: ("clinic2",)}
    assert r.on_loss == "drop" and r.min_clients == 2
    assert not r.can_drop({"server"})


@pytest.mark.parametrize("clients,message", [
    ({"min_clients": 4}, "min_clients 4 is more than the 3 clients"),
    ({"min_clients": 0}, "greater than or equal to 1"),
    ({"on_loss": "wait", "min_clients": 2}, "applies to `on_loss: drop` only"),
    ({"on_loss": "skip"}, "'wait' or 'drop'"),
])
def test_clients_schema_errors_name_the_key(clients, message):
    document = yaml.safe_load(SPLITFED)
    document["clients"].update(clients)
    with pytest.raises(ConfigError) as failure:
        parse_spec(document, "s.yaml")
    text = str(failure.value)
    assert message in text and "clients." in text, text


# ---- the wire fields a drop adds ------------------------------------------------------------------
@pytest.mark.parametrize("message", [
    control.Run(first_step=4, count=2, micro_batches=2, dropped_lanes=(1, 3)),
    control.Shutdown(dropped="client clinic1 was dropped from step 4"),
])
def test_drop_fields_round_trip_through_meta(message):
    envelope = Envelope(kind=message.kind, topology="t", sender="server", meta=message.to_meta())
    assert control.parse(envelope) == message


@pytest.mark.parametrize("kind,meta,named", [
    (Kind.RUN, {"first_step": 0, "count": 1, "micro_batches": 1, "dropped_lanes": [-1]}, "dropped_lanes"),
    (Kind.RUN, {"first_step": 0, "count": 1, "micro_batches": 1, "dropped_lanes": "1"}, "dropped_lanes"),
    (Kind.SHUTDOWN, {"dropped": 3}, "dropped"),
])
def test_malformed_drop_fields_are_protocol_errors(kind, meta, named):
    with pytest.raises(ProtocolError) as caught:
        control.MESSAGES[kind].from_meta(meta)
    assert caught.value.reason == "bad_control" and named in str(caught.value)


def test_sequential_turn_after_a_dropped_client_starts_from_the_last_client_taking_part():
    r = roster()
    turns = [(0,), (0,), (1,), (1,), (2,), (3,)]
    assert r.hand_off_source(turns, 0) is None
    r.drop({"c1"}, 3, "heartbeat")
    assert r.hand_off_source(turns, 4) == 0  # clinic1's unfinished turn is lost with it
    assert r.next_active(turns, 2) == 4 and r.next_active(turns, 2, rejoining=(1,)) == 2


def test_a_recorded_schedule_replays_by_step():
    from meshsl.machines.policies import planned_changes
    assert planned_changes(None) is None
    planned = planned_changes([{"event": "drop", "nodes": ["c1"], "step": 4, "cause": "heartbeat"},
                               {"event": "drop", "nodes": ["c2"], "step": 4, "cause": "timeout"},
                               {"event": "rejoin", "nodes": ["c1"], "step": 8, "cause": "rejoined"}])
    assert planned == {"drop": {4: [("c1",), ("c2",)]}, "rejoin": {8: [("c1",)]}}
