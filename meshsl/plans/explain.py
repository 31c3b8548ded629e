"""Human and JSON descriptions of a topology's plan (`meshsl plan`)."""
from __future__ import annotations

import math

from meshsl.align.ids import alignment_step
from meshsl.protocol.compression import make_codec
from meshsl.plans.nodeplan import build_edges, build_plans
from meshsl.schedule.accounting import budget as privacy_budget
from meshsl.privacy.contract import control_figures


def wire_bytes_per_sample(shape: tuple[int, ...], codec_spec) -> int:
    """Bytes one sample of a float32 tensor of `shape` takes on the wire after the edge's codec (headers aside)."""
    import torch  # `meshsl plan` explains a topology without loading torch unless a codec is measured


    samples = 64  # per-sample overhead (int8 scales, top-k indices) is averaged over a typical micro-batch
    layout = make_codec(codec_spec).part_layout((samples, *shape), torch.float32)
    total = sum(count * torch.empty(0, dtype=dtype).element_size() for dtype, count in layout)
    return int(math.ceil(total / samples))


def _span(values: list[str]) -> str:
    """['clinic-0', 'clinic-1', 'clinic-2'] -> 'clinic-0..clinic-2'."""
    return values[0] if len(values) == 1 else f"{values[0]}..{values[-1]}"


def plan_document(topology) -> dict:
    edges = build_edges(topology)
    plans = build_plans(topology)
    budget = None
    if topology.spec.privacy or topology.spec.training.label_dp:
        budget = privacy_budget(topology)
    return {
        "control_contract": control_figures(topology),
        "privacy_budget": budget,
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
                   "forward_wire_bytes_per_sample": wire_bytes_per_sample(e.shape, e.forward_codec),
                   "backward_wire_bytes_per_sample": wire_bytes_per_sample(e.shape, e.backward_codec),
                   "forward_codec": e.forward_codec.codec, "backward_codec": e.backward_codec.codec}
            for name, e in edges.items()
        },
        "segments": {
            name: {"node": topology.placement[name][0] if not topology.is_replicated(name) else list(topology.placement[name]),
                   "parameters": info.parameters, "forward_flops_per_sample": info.forward_flops,
                   "output_shape": list(info.output_shape)}
            for name, info in topology.segment_info.items()
        },
        "alignment": alignment_step(topology),  # PSI on sample ids before training (None: rows match by position)
        "preprocessing": kept_preprocessing(topology),
    }


def kept_preprocessing(topology) -> list[dict]:
    """Each data source's `preprocess`: fitted where the data is, the first layer of the segment reading it;
    its values go into that party's checkpoints and exports, never into a message."""
    rows = []
    for name, spec in topology.data.items():
        if spec.preprocess is None:
            continue
        readers = [s for s in topology.segment_order if name in topology.segments[s].inputs]
        for node in topology.placement[name]:
            rows.append({"source": name, "node": node, "party": topology.nodes[node].party,
                         "impute": spec.preprocess.impute, "scale": spec.preprocess.scale, "segments": readers,
                         "fitted_on": "this party's own training rows", "sent": "never"})
    return rows


def ascii_graph(topology) -> str:
    """One line per data source / segment / task with its placement, arrows for inputs."""
    lines = []
    for name in topology.graph.nodes:
        kind = topology.graph.nodes[name]["kind"]
        if kind == "task":
            task = topology.tasks[name]
            lines.append(f"  [{task.output}] ==({task.loss} with {task.labels})==> task {name}")
            continue
        nodes = list(dict.fromkeys(topology.placement[name]))  # lane order: clinic0, clinic1, ..., clinic10
        where = nodes[0] if len(nodes) == 1 else f"{_span(nodes)} ({len(nodes)} clients)"
        party = _span(list(dict.fromkeys(topology.nodes[n].party for n in nodes)))
        shape = topology.shapes.get(name, ())
        if kind == "data":
            lines.append(f"  (data {name}) @{where}/{party} {list(shape)}")
        else:
            inputs = topology.segments[name].inputs
            arrows = []
            for source in inputs:
                crossing = any(topology.party_of(source, lane) != topology.party_of(name, lane)
                               for lane in range(topology.lanes))
                arrows.append(f"{source} {'~~>' if crossing else '-->'}")
            merge = f" merge={topology.segments[name].merge}" if len(inputs) > 1 else ""
            lines.append(f"  {' + '.join(arrows)} [{name}] @{where}/{party} -> {list(shape)}{merge}")
    lines.append("  (--> stays inside a party, ~~> crosses a party boundary)")
    return "\n".join(lines)
