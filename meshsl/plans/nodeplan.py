"""Compile a Topology into one NodePlan per node: hosted segments, edges in and out, the privacy contract."""
from __future__ import annotations

from typing import Union

import math
from dataclasses import asdict, dataclass, field

from meshsl.protocol.compression import CompressionSpec
from meshsl.schedule.steps import edge_name  # noqa: F401  (where plans name their edges)
from meshsl.topology.shapes import count_flops

FLOAT_BYTES = 4


@dataclass(frozen=True)
class EdgePlan:
    """A segment output feeding another segment; activations go forward, gradients backward."""

    name: str
    producer: str
    consumer: str
    shape: tuple[int, ...]  # per sample
    cross_party: bool
    remote: bool  # crosses nodes in at least one lane
    forward_codec: CompressionSpec = field(default_factory=CompressionSpec)
    backward_codec: CompressionSpec = field(default_factory=CompressionSpec)
    tokens: bool = False  # hidden states of an LLM part: generation sends 1..shape[0] tokens per sequence

    @property
    def bytes_per_sample(self) -> int:
        return math.prod(self.shape) * FLOAT_BYTES


@dataclass(frozen=True)
class Transfer:
    """One line of the privacy contract: a tensor a node sends to or receives from a peer."""

    edge: str
    direction: str  # "activation" (forward) or "gradient" (backward)
    peer: str
    peer_party: str
    shape: tuple[Union[int, str], ...]  # ("micro_batch", *the edge's shape)
    dtype: str
    codec: str


@dataclass(frozen=True)
class NodePlan:
    node: str
    party: str
    endpoint: str
    is_coordinator: bool
    segments: tuple[str, ...]
    lanes: dict[str, tuple[int, ...]]  # hosted segment -> lanes it runs for on this node
    data: tuple[str, ...]
    tasks: tuple[str, ...]
    peers: tuple[str, ...]
    sends: tuple[Transfer, ...]
    receives: tuple[Transfer, ...]
    parameters: int
    forward_flops_per_sample: int

    def to_dict(self) -> dict:
        return asdict(self)


def build_edges(topology) -> dict[str, EdgePlan]:
    privacy = {p.segment: p for p in topology.spec.privacy}
    edges = {}
    for seg in topology.spec.segments:
        for src in seg.inputs:
            if src not in topology.segments:
                continue
            lanes = range(topology.lanes)
            spec = privacy.get(src)
            edges[edge_name(src, seg.name)] = EdgePlan(
                name=edge_name(src, seg.name), producer=src, consumer=seg.name,
                shape=topology.shapes.get(src, ()),
                cross_party=any(topology.party_of(src, l) != topology.party_of(seg.name, l) for l in lanes),
                remote=any(topology.node_of(src, l) != topology.node_of(seg.name, l) for l in lanes),
                forward_codec=spec.forward if spec else CompressionSpec(),
                backward_codec=spec.backward if spec else CompressionSpec(),
                tokens=topology.segments[src].llm is not None,
            )
    return edges


def build_plans(topology) -> dict[str, NodePlan]:
    count_flops(topology)
    edges = build_edges(topology)
    plans = {}
    for name, node in topology.nodes.items():
        segments = tuple(s for s in topology.segment_order if name in topology.placement[s])
        sends, receives, peers = [], [], set()
        for edge in edges.values():
            for lane in range(topology.lanes):
                src_node, dst_node = topology.node_of(edge.producer, lane), topology.node_of(edge.consumer, lane)
                if src_node == dst_node:
                    continue
                shape: tuple[Union[int, str], ...] = ("micro_batch", *edge.shape)
                if src_node == name:
                    peers.add(dst_node)
                    party = topology.nodes[dst_node].party
                    sends.append(Transfer(edge.name, "activation", dst_node, party, shape, "float32",
                                          edge.forward_codec.codec))
                    receives.append(Transfer(edge.name, "gradient", dst_node, party, shape, "float32",
                                             edge.backward_codec.codec))
                if dst_node == name:
                    peers.add(src_node)
                    party = topology.nodes[src_node].party
                    receives.append(Transfer(edge.name, "activation", src_node, party, shape, "float32",
                                             edge.forward_codec.codec))
                    sends.append(Transfer(edge.name, "gradient", src_node, party, shape, "float32",
                                          edge.backward_codec.codec))
        info = topology.segment_info
        plans[name] = NodePlan(
            node=name, party=node.party, endpoint=node.endpoint,
            is_coordinator=(name == topology.coordinator),
            segments=segments,
            lanes={s: tuple(topology.lanes_of(s, name)) for s in segments},
            data=tuple(d for d in topology.data if name in topology.placement[d]),
            tasks=tuple(t.name for t in topology.spec.tasks if t.output in segments),
            peers=tuple(sorted(peers)),
            sends=tuple(dict.fromkeys(sends)), receives=tuple(dict.fromkeys(receives)),
            parameters=sum(info[s].parameters for s in segments if s in info),
            forward_flops_per_sample=sum(info[s].forward_flops for s in segments if s in info),
        )
    return plans
