"""The live leakage gauge: dCor(raw input, what leaves) per cut edge, sampled on every N-th training step."""
from __future__ import annotations

from collections import defaultdict

import networkx as nx
import torch

from meshsl.privacy.dcor import distance_correlation


def raw_upstream(topology, data, phase: str, device, segment: str, leaves: dict, rows) -> list[torch.Tensor]:
    """Raw features this node holds (`data`, its NodeData) that feed `segment`, directly (in `leaves`)
    or through local segments."""
    raw = [v for k, v in leaves.items() if k in topology.data]
    if raw or rows is None:
        return raw
    upstream = nx.ancestors(topology.graph, segment)
    return [data.get(name, rows, phase).to(device) for name, d in topology.data.items()
            if name in upstream and d.kind == "features" and name in data.tensors]


class LeakageGauge:
    """Samples (raw, activation) of the segments whose output crosses a party boundary."""

    def __init__(self, topology, segments, max_samples: int) -> None:
        self.max_samples = max_samples
        self.gauged: dict[str, list[str]] = defaultdict(list)  # segment -> its cut edges
        for producer, consumer in topology.cut_edges():
            if producer in segments:
                self.gauged[producer].append(f"{producer}->{consumer}")
        self.samples: dict[str, tuple[list, list]] = {}

    def add(self, segment: str, raw: list[torch.Tensor], output: torch.Tensor) -> None:
        """Keep one micro-batch's (raw, activation) until `max_samples` rows are kept."""
        flat = torch.cat([r.reshape(r.shape[0], -1) for r in raw], dim=1).detach().cpu()
        raws, outs = self.samples.setdefault(segment, ([], []))
        if sum(len(r) for r in raws) < self.max_samples:
            raws.append(flat)
            outs.append(output.detach().reshape(output.shape[0], -1).cpu())

    def measure(self) -> dict[str, float]:
        """dCor per cut edge from the samples kept; empties them."""
        result = {}
        for segment, (raws, outs) in self.samples.items():
            if sum(len(r) for r in raws) < 4:
                continue
            raw, out = torch.cat(raws)[:self.max_samples], torch.cat(outs)[:self.max_samples]
            with torch.no_grad():
                value = float(distance_correlation(raw.double(), out.double()))
            for edge in self.gauged[segment]:
                result[edge] = value
        self.samples.clear()
        return result
