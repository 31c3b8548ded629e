"""A SplitFed simulation with many clients on one event loop: it completes, and after the averaging step
every client holds exactly the sample-weighted average of the weights the clients reported."""
from __future__ import annotations

import asyncio

import torch

from benchmarks.common import splitfed_document, topology_from_document
from meshsl.schedule.steps import sample_pools
from meshsl.protocol.envelope import Kind
from meshsl.protocol.frames import decode_message
from meshsl.coordinator.runtime import RunOptions
from meshsl.launch.simulate import simulate

CLIENTS = 200


def test_many_clients_splitfed_averages_every_client_to_the_same_weights():
    # Two steps, averaging after the second: the clients' weights differ (their own data) until then.
    topology = topology_from_document(splitfed_document(CLIENTS, steps=2, average_every=2))
    reported: dict[str, list[torch.Tensor]] = {}  # client node -> the bottom weights it sent for averaging

    def hook(sender, peer, frames) -> None:
        envelope, tensors = decode_message([bytes(f) for f in frames], 1 << 30)
        if envelope.kind == Kind.WEIGHTS and peer == topology.coordinator:
            assert sender not in reported, "one pull per client"
            reported[sender] = [parts[0].reshape(d.shape).clone() for parts, d in zip(tensors, envelope.tensors)]

    summary, runtimes = asyncio.run(simulate(topology, RunOptions(evaluate=False), traffic_hook=hook))

    assert summary["steps"] == 2 and summary["samples"] == 2 * CLIENTS * topology.spec.training.batch_size
    clients = [topology.node_of("bottom", lane) for lane in range(CLIENTS)]
    assert len(set(clients)) == CLIENTS and set(reported) == set(clients)
    # Before averaging every client trained on its own shard: the reported weights are not all equal.
    assert not all(torch.equal(reported[c][0], reported[clients[0]][0]) for c in clients[1:])

    pools = sample_pools(topology).train
    total = sum(len(p) for p in pools)
    expected = None
    for lane, client in enumerate(clients):
        scaled = [w.double() * (len(pools[lane]) / total) for w in reported[client]]
        expected = scaled if expected is None else [a + s for a, s in zip(expected, scaled)]
    expected = [e.to(w.dtype) for e, w in zip(expected, reported[clients[0]])]

    for client in clients:
        final = [p.detach() for p in runtimes[client].worker.modules["bottom"].state_dict().values()]
        assert len(final) == len(expected)
        for got, want in zip(final, expected):
            assert torch.equal(got, want), f"{client}: weights after averaging differ from the FedAvg"
    assert not any(rt.failure for rt in runtimes.values())
