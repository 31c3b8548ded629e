"""The data a node holds: its feature and label sources, and the batches of every round."""
from __future__ import annotations

import warnings

import numpy as np
import torch

from meshsl.align.outcomes import aligned_rows
from meshsl.data import batch_indices, eval_batches, load_source
from meshsl.errors import DataError
from meshsl.plan.steps import sample_pools


def feature_tensor(features: np.ndarray) -> torch.Tensor:
    """float32 features as a tensor sharing their memory: a read-only memory map stays one (rows are
    gathered per micro-batch, never written), so torch's warning about non-writable arrays is moot."""
    if features.dtype != np.float32:
        raise DataError(f"features must be float32 by now, got {features.dtype}", "data")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(features if features.flags.c_contiguous else np.ascontiguousarray(features))


class NodeData:
    def __init__(self, topology, node: str) -> None:
        self.topology = topology
        self.training = topology.spec.training
        self.pools = sample_pools(topology)
        self.tensors: dict[str, torch.Tensor] = {}
        for name, spec in topology.data.items():
            if node not in topology.placement[name]:
                continue
            table = load_source(spec, topology.base_dir)
            if spec.kind == "labels":
                self.tensors[name] = torch.as_tensor(np.asarray(table.labels))
            else:
                self.tensors[name] = feature_tensor(table.features)
            rows = aligned_rows(topology, node, name)
            if rows is not None:  # sample ids matched by PSI: row i is the i-th common sample
                self.tensors[name] = self.tensors[name][torch.as_tensor(rows)].contiguous()
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
