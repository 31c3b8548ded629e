"""What a party received over a cut edge, step by step, kept at that party (`privacy[].record`).

The receiving node records every training gradient (at the producer's node) and activation (at the
consumer's node) of a recorded edge exactly as it decoded it from the wire, with the sample id of each row
(its position in the shared, aligned sample order, which every party derives from the shared seed). Nothing
is sent anywhere: `save` writes the node's own recordings under `<dir>/<node>/`, one `.npz` per edge and
direction (numeric arrays only, read back with `allow_pickle=False`) and a `meta.json`.
`meshsl audit --run DIR` attacks them (meshsl.apps.audit_trajectory).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch

RECORD_FORMAT = 1


def recorded_directory(topology) -> Optional[Path]:
    """The directory named by `privacy[].record` (relative to the topology file), None when not recording."""
    named = {p.record for p in topology.spec.privacy if p.record is not None}
    if not named:
        return None
    return (Path(topology.base_dir) / sorted(named)[0]).resolve()


def recorded_edges(topology) -> set[str]:
    """Cut edges "producer->consumer" whose producer's privacy entry asks for recording."""
    producers = {p.segment for p in topology.spec.privacy if p.record is not None}
    return {f"{p}->{c}" for p, c in topology.cut_edges() if p in producers}


def file_name(edge: str, direction: str) -> str:
    return f"{edge.replace('->', '__')}.{direction}.npz"


class TrajectoryRecorder:
    """Rows received per (edge, direction), keyed by (step, lane, micro-batch): a replayed step overwrites."""

    def __init__(self, topology, node: str) -> None:
        self.topology = topology
        self.node = node
        self.edges = recorded_edges(topology)
        self.directory = recorded_directory(topology)
        self._rows: dict[tuple[str, str], dict[tuple[int, int, int], tuple]] = {}

    @property
    def active(self) -> bool:
        return bool(self.edges)

    def received(self, edge: str, direction: str, context, lane: int, micro_batch: int, rows,
                 value: torch.Tensor) -> None:
        """One training micro-batch as this node received it (`direction`: "gradient" or "activation")."""
        if edge not in self.edges or context.phase != "train":
            return
        flat = value.detach().reshape(value.shape[0], -1).float().cpu().numpy().copy()
        ids = np.asarray(rows, dtype=np.int64).reshape(-1)
        self._rows.setdefault((edge, direction), {})[(context.step, lane, micro_batch)] = (context.epoch, ids, flat)

    def gradients(self, segment: str, context, lane: int, micro_batch: int, rows, grads: list) -> None:
        """The gradients (consumer, tensor) of one micro-batch that came from another node."""
        for consumer, grad in grads:
            if self.topology.node_of(consumer, lane) != self.node:
                self.received(f"{segment}->{consumer}", "gradient", context, lane, micro_batch, rows, grad)

    def save(self, directory: Optional[Path] = None) -> list[Path]:
        """Write this node's recordings under `<directory>/<node>/`; returns the files written."""
        target = directory or self.directory
        if target is None:
            raise ValueError("no directory to save the recordings in")
        base = Path(target) / self.node
        base.mkdir(parents=True, exist_ok=True)
        written = []
        for (edge, direction), entries in sorted(self._rows.items()):
            keys = sorted(entries)
            epochs, ids, values = zip(*(entries[k] for k in keys))
            counts = [len(i) for i in ids]
            path = base / file_name(edge, direction)
            np.savez(path, rows=np.concatenate(values).astype(np.float32), sample=np.concatenate(ids),
                     step=np.repeat([k[0] for k in keys], counts).astype(np.int64),
                     lane=np.repeat([k[1] for k in keys], counts).astype(np.int64),
                     micro_batch=np.repeat([k[2] for k in keys], counts).astype(np.int64),
                     epoch=np.repeat(epochs, counts).astype(np.int64))
            written.append(path)
        meta = {"format": RECORD_FORMAT, "node": self.node, "party": self.topology.nodes[self.node].party,
                "topology": self.topology.spec.name, "topology_hash": self.topology.hash,
                "topology_file": str(Path(self.topology.source).resolve()) if self.topology.source else None,
                "files": {f"{edge}|{direction}": file_name(edge, direction) for edge, direction in sorted(self._rows)}}
        (base / "meta.json").write_text(json.dumps(meta, indent=2))
        return written
