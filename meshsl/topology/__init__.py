"""A validated topology: the spec expanded per client, its networkx graph, checks and shape inference."""
from meshsl.topology.model import Topology, load_topology

__all__ = ["Topology", "load_topology"]
