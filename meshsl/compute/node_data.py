"""The data a node holds: its feature and label sources, and the batches of every round."""
from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator, Mapping

import numpy as np
import torch

from meshsl.align.outcomes import aligned_rows
from meshsl.data import batch_indices, eval_batches, load_source
from meshsl.errors import DataError
from meshsl.schedule.steps import sample_pools


def feature_tensor(features: np.ndarray) -> torch.Tensor:
    """float32 features as a tensor sharing their memory: a read-only memory map stays one (rows are
    gathered per micro-batch, never written), so torch's warning about non-writable arrays is moot."""
    if features.dtype != np.float32:
        raise DataError(f"features must be float32 by now, got {features.dtype}", "data")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(features if features.flags.c_contiguous else np.ascontiguousarray(features))


class NodeSources(Mapping):
    """The data sources placed on a node, each loaded on first use (and kept). Membership and keys need
    no loading, so a prediction run, which reads only its input file, never loads the training tables."""

    def __init__(self, topology, node: str, eager: bool) -> None:
        self.topology, self.node = topology, node
        self.names = [name for name in topology.data if node in topology.placement[name]]
        self.loaded: dict[str, torch.Tensor] = {}
        self.lock = threading.Lock()  # the compute thread and the event loop may both ask
        if eager:
            for name in self.names:
                self[name]

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.names:
            raise KeyError(name)
        with self.lock:
            if name not in self.loaded:
                self.loaded[name] = self._load(name)
            return self.loaded[name]

    def _load(self, name: str) -> torch.Tensor:
        spec = self.topology.data[name]
        table = load_source(spec, self.topology.base_dir)
        tensor = torch.as_tensor(np.asarray(table.labels)) if spec.kind == "labels" else feature_tensor(table.features)
        rows = aligned_rows(self.topology, self.node, name)
        if rows is not None:  # sample ids matched by PSI: row i is the i-th common sample
            tensor = tensor[torch.as_tensor(rows)].contiguous()
        return tensor

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


class NodeData:
    def __init__(self, topology, node: str, eager: bool = True) -> None:
        """`eager`: load every source now (training: before the node says hello); else on first use."""
        self.topology = topology
        self.training = topology.spec.training
        self.pools = sample_pools(topology)
        self.tensors = NodeSources(topology, node, eager)
        self.predict_inputs: dict[str, torch.Tensor] = {}
        # Micro-batch row ids are asked for by every forward and backward; computing them means a
        # permutation of the lane's pool, so the split of the current batches is kept (bounded).
        self._splits: dict[tuple, list[np.ndarray]] = {}
        self._splits_limit = 4 * max(1, topology.lanes) + 8

    def rows(self, phase: str, lane: int, epoch: int, step_in_epoch: int, micro_batch: int,
             micro_batches: int, offset: int = 0, count: int = 0) -> np.ndarray:
        """Sample ids (rows) of one micro-batch of a round.

        Predict rounds cover rows [offset, offset + count) of every party's own input file (rows are
        aligned by position across parties); the owner of a task output needs no input to know them."""
        key = (phase, lane, epoch, step_in_epoch, micro_batches, offset, count)
        splits = self._splits.get(key)
        if splits is None:
            if len(self._splits) >= self._splits_limit:
                self._splits.clear()
            splits = self._splits[key] = self._split(phase, lane, epoch, step_in_epoch, micro_batches, offset, count)
        return splits[micro_batch]

    def _split(self, phase: str, lane: int, epoch: int, step_in_epoch: int, micro_batches: int, offset: int,
               count: int) -> list[np.ndarray]:
        if phase == "train":
            batch = batch_indices(self.pools.train[lane], self.training.batch_size, self.training.seed,
                                  epoch, step_in_epoch, lane)
            return np.array_split(batch, micro_batches)
        if phase == "eval":
            return eval_batches(self.pools.test, self.training.eval_batch_size)
        return np.array_split(np.arange(offset, offset + count, dtype=np.int64), micro_batches)

    def get(self, name: str, rows: np.ndarray, phase: str) -> torch.Tensor:
        if phase == "predict":
            if name not in self.predict_inputs:
                raise DataError(f"no prediction input for data source {name!r} on this node", "predict")
            return self.predict_inputs[name][torch.as_tensor(rows)]
        return self.tensors[name][torch.as_tensor(rows)]

    def eval_micro_batches(self) -> int:
        return len(eval_batches(self.pools.test, self.training.eval_batch_size))
