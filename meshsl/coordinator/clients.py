"""Many clients at the coordinator's barriers: FedAvg (splitfed), the sequential hand-off, readmitting
dropped clients that came back, and releasing the ones that never did (docs/failover.md). Drives the
nodes through the coordinator (its `broadcast`, `collect` and host); the arithmetic is policies.FedAvg."""
from __future__ import annotations

from typing import Optional

import torch

from meshsl.schedule.steps import StepInfo, sample_pools
from meshsl.protocol import control
from meshsl.protocol.envelope import Kind
from meshsl.protocol.frames import describe_all
from meshsl.machines.policies import FedAvg


def pull_batches(node_of, lanes, size: int = 64) -> list[list[int]]:
    """Lanes in order, cut into batches of at most `size` lanes on distinct nodes (`node_of(lane)`),
    pulled together, so at most `size` clients' weights are held at once."""
    batches: list[list[int]] = []
    current: list[int] = []
    nodes: set[str] = set()
    for lane in lanes:
        node = node_of(lane)
        if len(current) >= size or node in nodes:
            batches.append(current)
            current, nodes = [], set()
        current.append(lane)
        nodes.add(node)
    if current:
        batches.append(current)
    return batches


class ClientSync:
    """Client weights at the barriers of `coordinator` (the async driver)."""

    def __init__(self, coordinator) -> None:
        self.coordinator = coordinator
        self.topology = coordinator.topology
        self.roster = coordinator.roster
        self.handed_over_for: Optional[int] = None  # sequential: the step the last hand-off prepared
        self._client_names: Optional[list[str]] = None

    # -- who is who -------------------------------------------------------------------------------
    def client_node(self, lane: int) -> str:
        """The node that is client `lane` (hosts the lane's replicated segment or data)."""
        if self._client_names is None:
            self._client_names = [n for n in [*self.replicated_segments(), *self.topology.data]
                                  if self.topology.is_replicated(n)]
        names = self._client_names
        return self.topology.node_of(names[0], lane) if names else f"lane{lane}"

    def replicated_segments(self) -> list[str]:
        return [s for s in self.topology.segment_order if self.topology.is_replicated(s)]

    def nodes_of(self, lanes) -> list[str]:
        return [n for lane in lanes for n in self.roster.nodes_of_lane[lane]]

    # -- barriers ---------------------------------------------------------------------------------
    async def sync(self, info: StepInfo, planner) -> bool:
        """FedAvg or sequential hand-off after this step, if due; True when weights changed. Dropped
        clients that came back are readmitted here (docs/failover.md): they get the global client weights
        (the FedAvg result, or the weights the hand-off passes on) and a fresh optimizer."""
        clients = self.topology.spec.clients
        if clients is None or not (planner.sync_due(info) or planner.turn_ends(info)):
            return False
        coordinator = self.coordinator
        rejoining = self.rejoining(info.step + 1)
        if rejoining:
            await coordinator.broadcast(control.Abort(), targets=self.nodes_of(rejoining), step=coordinator.round)
        if clients.mode == "splitfed":
            await self.federated_average(rejoining)
        else:
            following = self.roster.next_active(planner.step_lanes, info.step + 1, rejoining)  # may be a rejoiner
            to_lane = planner.steps[following].lanes[0] if following is not None else None
            await self.hand_over(info.lanes[0], to_lane if to_lane != info.lanes[0] else None, rejoining)
            self.handed_over_for = following
        if rejoining:
            coordinator.readmitted(rejoining, self.nodes_of(rejoining), info.step + 1)
        return True

    async def hand_over_past_dropped(self, planner, index: int) -> None:
        """Sequential: a turn that begins after skipped steps (a client dropped in or before its turn)
        starts from the weights of the last client taking part that trained before it (the hand-off
        skips the dropped client; what it trained in its unfinished turn is lost with it)."""
        clients, steps = self.topology.spec.clients, planner.steps
        if clients is None or clients.mode != "sequential" or index == 0 or not self.roster.dropped \
                or self.roster.active_lanes(steps[index - 1].lanes) or self.handed_over_for == index:
            return
        source = self.roster.hand_off_source(planner.step_lanes, index)
        if source is not None and source != steps[index].lanes[0]:
            await self.hand_over(source, steps[index].lanes[0])
        self.handed_over_for = index

    def rejoining(self, step: int) -> tuple[int, ...]:
        """Dropped clients to readmit at the barrier before `step`: every node of theirs announced itself
        again (or, replaying a run, the recorded rejoins at `step`)."""
        planned = self.coordinator.planned
        if planned is not None:
            return tuple(sorted(lane for nodes in planned["rejoin"].pop(step, [])
                                for lane in {self.roster.lane_of_node[n] for n in nodes}))
        return self.roster.ready_to_rejoin()

    async def release_dropped(self) -> None:
        """The end: clients dropped and not readmitted hold no final weights; those still running (back,
        or never gone: a false alarm) are told so and exit 0 without writing weights."""
        left_out = [n for n in self.topology.nodes if n in self.roster.dropped_nodes()]
        for name in left_out:
            lane = self.roster.lane_of_node[name]
            await self.coordinator.node.send_message(name, control.Shutdown(
                dropped=f"client {name} was dropped from step {self.roster.dropped[lane]} and not readmitted "
                        f"before the end; it holds no final weights"))

    # -- weights ----------------------------------------------------------------------------------
    async def federated_average(self, rejoining: tuple[int, ...] = ()) -> None:
        """FedAvg of every replicated (client) segment over the clients taking part, weighted by each
        client's sample count (machines/policies.py); `rejoining` clients get the result too."""
        pools = sample_pools(self.topology).train
        lanes = self.roster.active_lanes(range(self.topology.lanes))
        for segment in self.replicated_segments():
            average = FedAvg({lane: len(pools[lane]) for lane in lanes})
            for batch in pull_batches(lambda lane: self.topology.node_of(segment, lane), lanes):
                for lane, weights in zip(batch, await self.pull_many(segment, batch)):  # summed in lane order
                    average.add(lane, weights)
            typed = average.result()
            await self.push(segment, lanes, typed)
            await self.push(segment, rejoining, typed, fresh_optimizer=True)

    async def hand_over(self, from_lane: int, to_lane: Optional[int], rejoining: tuple[int, ...] = ()) -> None:
        """Sequential split learning: the next client starts from the previous client's weights; readmitted
        clients get them too (with a fresh optimizer)."""
        if to_lane is None and not rejoining:
            return
        for segment in self.replicated_segments():
            weights = (await self.pull_many(segment, [from_lane]))[0]
            if to_lane is not None and to_lane not in rejoining:
                await self.push(segment, [to_lane], weights)
            await self.push(segment, rejoining, weights, fresh_optimizer=True)

    async def pull_many(self, segment: str, lanes: list[int]) -> list[list[torch.Tensor]]:
        """The weights of `segment` from the node of each lane (distinct nodes), asked all at once."""
        coordinator = self.coordinator
        nodes = [self.topology.node_of(segment, lane) for lane in lanes]
        for node in nodes:
            await coordinator.node.send_message(node, control.WeightsPull(segment=segment), step=coordinator.round)
        got = await coordinator.collect(Kind.WEIGHTS, set(nodes), coordinator.round, f"send weights of {segment}")
        return [[parts[0].reshape(d.shape).clone() for parts, d in zip(got[node].tensors, got[node].envelope.tensors)]
                for node in nodes]

    async def push(self, segment: str, lanes, weights: list[torch.Tensor], fresh_optimizer: bool = False) -> None:
        """`fresh_optimizer`: a readmitted client also starts its optimizer afresh (docs/failover.md)."""
        coordinator = self.coordinator
        nodes = {self.topology.node_of(segment, lane) for lane in lanes}
        if not nodes:
            return
        message = control.Weights(segment=segment, load=True, fresh_optimizer=fresh_optimizer)
        for node in nodes:
            await coordinator.node.send_message(node, message, parts=[[w] for w in weights],
                                                tensors=tuple(describe_all(weights)), step=coordinator.round)
        await coordinator.collect(Kind.ACK, nodes, coordinator.round, f"load weights of {segment}")
