"""Failure detection in the coordinator (no processes; the clock is driven by the test): a coordinator
that was starved or paused declares nobody lost for its own silence; a round that times out names only
the nodes that are really silent, not the healthy ones waiting behind them (fault schedule seed 6: a
frozen first hop of the chain, on a loaded machine, got all four hops named and replaced)."""
from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from meshsl.coordinator import runtime as coordinator_module
from meshsl.coordinator.runtime import Coordinator, NodesLost
from meshsl.topology.model import load_topology

ROOT = Path(__file__).resolve().parents[2]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def chain(tmp_path, monkeypatch):
    clock = Clock()
    fake_time = SimpleNamespace(monotonic=clock, time=time.time, perf_counter=time.perf_counter)
    monkeypatch.setattr(coordinator_module, "time", fake_time)  # the coordinator's clock only, not asyncio's
    topology = load_topology(ROOT / "topologies" / "multi_hop.yaml")
    node = SimpleNamespace(topology=topology, node=topology.coordinator, checkpoint_dir=tmp_path, metrics=None)
    coordinator = Coordinator(node)
    for name in topology.nodes:
        coordinator.seen(name)
    return coordinator, clock


def lost_nodes(coordinator) -> set[str]:
    """Who the coordinator's machine would declare lost at the coordinator's clock now."""
    machine = coordinator.machine
    return machine.liveness.lost(coordinator_module.time.monotonic(), machine.node_set, coordinator.node.node)


def test_a_paused_coordinator_declares_nobody_lost_before_reading_the_queue(chain):
    coordinator, clock = chain
    clock.now += 3 * coordinator.policy.heartbeat_timeout_s  # we were paused (SIGSTOP) past the timeout
    assert lost_nodes(coordinator) == set()  # the peers' heartbeats are still unread in the socket
    for name in coordinator.nodes:
        coordinator.seen(name)  # ... and now read
    clock.now += 0.6
    assert lost_nodes(coordinator) == set()


def test_a_round_timeout_names_only_the_silent_nodes(chain):
    import asyncio
    coordinator, clock = chain
    coordinator.policy = coordinator.policy.model_copy(update={"timeout_s": 1.0, "heartbeat_timeout_s": 60.0})
    clock.now += 61.0
    for name in ("relay_1", "relay_2", "relay_3"):
        coordinator.seen(name)  # alive, waiting for the clinic's activations
    coordinator.machine.liveness.last_check = clock.now - 40.0  # we were starved: no heartbeat judgement for now

    class Ticking(Clock):  # every look at the clock costs half a second
        def __call__(self) -> float:
            self.now += 0.5
            return self.now
    ticking = Ticking()
    ticking.now = clock.now
    coordinator_module.time.monotonic = ticking  # (restored by monkeypatch)

    async def collect():
        await coordinator.collect(coordinator_module.Kind.DONE, {"clinic", "relay_1", "relay_2", "relay_3"}, 1,
                                   "finish its step", timeout=1.0)

    with pytest.raises(NodesLost) as raised:
        asyncio.run(collect())
    assert raised.value.nodes == {"clinic"}
    assert "no heartbeat either" in raised.value.why


def test_a_standby_sees_the_endpoint_free_only_once_the_primary_socket_is_gone():
    import socket
    from meshsl.node.standby import endpoint_free
    with socket.socket() as primary:
        primary.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        primary.bind(("127.0.0.1", 0))
        primary.listen(1)
        endpoint = f"tcp://127.0.0.1:{primary.getsockname()[1]}"
        assert not endpoint_free(endpoint)
    assert endpoint_free(endpoint)
    assert endpoint_free("ipc:///tmp/anything")  # only tcp endpoints are probed


def test_a_slow_round_of_live_nodes_gets_one_more_timeout_and_never_names_the_coordinator(chain):
    """Every node heartbeats but the round is slow (a loaded machine): wait once more; then name the
    others, never the coordinator's own node (its own recovery cannot replace it)."""
    import asyncio
    coordinator, clock = chain
    coordinator.policy = coordinator.policy.model_copy(update={"heartbeat_timeout_s": 60.0})
    looks = []

    class Ticking(Clock):  # every look at the clock costs half a second; everyone keeps heartbeating
        def __call__(self) -> float:
            self.now += 0.5
            looks.append(self.now)
            for name in coordinator.nodes:
                coordinator.heard[name] = self.now
            return self.now
    ticking = Ticking()
    ticking.now = clock.now
    coordinator_module.time.monotonic = ticking

    async def collect():
        await coordinator.collect(coordinator_module.Kind.DONE, set(coordinator.nodes), 1, "finish its step",
                                   timeout=3.0)

    with pytest.raises(NodesLost) as raised:
        asyncio.run(collect())
    assert raised.value.nodes == set(coordinator.nodes) - {coordinator.node.node}
    assert looks[-1] - looks[0] >= 6.0  # two timeouts of 3 s, not one
