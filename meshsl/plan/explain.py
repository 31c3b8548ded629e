"""Human and JSON descriptions of a topology's plan (`meshsl plan`)."""
from __future__ import annotations

from meshsl.plan.nodeplan import build_edges, build_plans


def plan_document(topology) -> dict:
    edges = build_edges(topology)
    plans = build_plans(topology)
    return {
        "topology": topology.spec.name,
        "hash": topology.hash,
        "configurations": topology.recognised_configurations(),
        "coordinator": topology.coordinator,
        "lanes": topology.lanes,
        "warnings": topology.warnings,
        "nodes": {name: plan.to_dict() for name, plan in plans.items()},
        "edges": {
            name: {"producer": e.producer, "consumer": e.consumer, "shape": list(e.shape),
                   "cross_party": e.cross_party, "remote": e.remote,
                   "forward_bytes_per_sample": e.bytes_per_sample, "backward_bytes_per_sample": e.bytes_per_sample,
                   "forward_codec": e.forward_codec.codec, "backward_codec": e.backward_codec.codec}
            for name, e in edges.items()
        },
        "segments": {
            name: {"node": topology.placement[name][0] if not topology.is_replicated(name) else list(topology.placement[name]),
                   "parameters": info.parameters, "forward_flops_per_sample": info.forward_flops,
                   "output_shape": list(info.output_shape)}
            for name, info in topology.segment_info.items()
        },
    }


def ascii_graph(topology) -> str:
    """One line per data source / segment / task with its placement, arrows for inputs."""
    lines = []
    for name in topology.graph.nodes:
        kind = topology.graph.nodes[name]["kind"]
        if kind == "task":
            task = topology.tasks[name]
            lines.append(f"  [{task.output}] ==({task.loss} with {task.labels})==> task {name}")
            continue
        nodes = sorted(set(topology.placement[name]))
        where = nodes[0] if len(nodes) == 1 else f"{nodes[0]}..{nodes[-1]} ({len(nodes)} clients)"
        party = topology.party_of(name)
        shape = topology.shapes.get(name, ())
        if kind == "data":
            lines.append(f"  (data {name}) @{where}/{party} {list(shape)}")
        else:
            inputs = topology.segments[name].inputs
            arrows = []
            for source in inputs:
                crossing = topology.party_of(source) != party
                arrows.append(f"{source} {'~~>' if crossing else '-->'}")
            merge = f" merge={topology.segments[name].merge}" if len(inputs) > 1 else ""
            lines.append(f"  {' + '.join(arrows)} [{name}] @{where}/{party} -> {list(shape)}{merge}")
    lines.append("  (--> stays inside a party, ~~> crosses a party boundary)")
    return "\n".join(lines)
