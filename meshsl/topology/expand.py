"""Expand `clients:` into concrete nodes: each replicated node becomes one node per client (lane)."""
from __future__ import annotations

import re

from meshsl.config.schema import NodeSpec, TopologySpec


def lane_endpoint(endpoint: str, lane: int) -> str:
    if endpoint.startswith("tcp://"):
        host, port = endpoint[len("tcp://"):].rsplit(":", 1)
        return f"tcp://{host}:{int(port) + lane}"
    return f"{endpoint}-{lane}"


def lane_node_name(name: str, lane: int) -> str:
    return f"{name}{lane}" if not re.search(r"\d$", name) else f"{name}-{lane}"


def replicate_node(node: NodeSpec, lane: int) -> NodeSpec:
    return node.model_copy(update={
        "name": lane_node_name(node.name, lane),
        "endpoint": None if node.endpoint is None else lane_endpoint(node.endpoint, lane),
        "party": f"{node.party}-{lane}",  # every client is its own privacy domain
        "metrics_port": None if node.metrics_port is None else (node.metrics_port + lane if node.metrics_port else 0),
        "standby": [lane_endpoint(e, lane) for e in node.standby],
    })


def expand_nodes(spec: TopologySpec) -> tuple[int, dict[str, NodeSpec], dict[str, tuple[str, ...]]]:
    """Returns (lanes, concrete nodes by name, declared node name -> concrete node per lane)."""
    lanes = spec.clients.count if spec.clients else 1
    replicated = set(spec.clients.replicate) if spec.clients else set()
    nodes: dict[str, NodeSpec] = {}
    by_lane: dict[str, tuple[str, ...]] = {}
    for node in spec.nodes:
        if node.name in replicated:
            copies = [replicate_node(node, lane) for lane in range(lanes)]
        else:
            copies = [node]
        for copy in copies:
            nodes[copy.name] = copy
        names = tuple(c.name for c in copies)
        by_lane[node.name] = names if len(names) == lanes else names * lanes
    return lanes, nodes, by_lane
