"""Topology documents built in code for the equivalence tests (a chain of hops over digits)."""
from __future__ import annotations

from pathlib import Path

from meshsl.config.loader import parse_spec
from meshsl.topology.model import topology_from_spec


def chain(hops: int, micro_batches: int, schedule: str, optimizer: str = "sgd") -> dict:
    """A `hops`-node chain over digits, each node of its own party; labels on the last node."""
    nodes = [{"name": f"n{i}", "endpoint": f"tcp://127.0.0.1:{6100 + i}", "party": f"p{i}"} for i in range(hops)]
    widths = [64] + [32] * (hops - 1) + [10]
    segments = []
    for i in range(hops):
        layers = [["Linear", widths[i], 48], ["Tanh"], ["Linear", 48, widths[i + 1]]]
        if i < hops - 1:
            layers.append(["Tanh"])
        segments.append({"name": f"s{i}", "node": f"n{i}", "inputs": ["x" if i == 0 else f"s{i - 1}"], "layers": layers})
    return {
        "name": f"chain{hops}",
        "nodes": nodes,
        "data": [{"name": "x", "node": "n0", "dataset": {"name": "digits"}},
                 {"name": "y", "node": f"n{hops - 1}", "dataset": {"name": "digits"}, "kind": "labels"}],
        "segments": segments,
        "tasks": [{"name": "digit", "output": f"s{hops - 1}", "labels": "y"}],
        "training": {"steps": 6, "batch_size": 48, "micro_batches": micro_batches, "schedule": schedule,
                     "optimizer": {"name": optimizer, "lr": 0.05 if optimizer == "sgd" else 0.01,
                                   "momentum": 0.9 if optimizer == "sgd" else 0.0}, "seed": 3},
    }


def topology_of(document: dict):
    return topology_from_spec(parse_spec(document), "<test>", Path("."))
