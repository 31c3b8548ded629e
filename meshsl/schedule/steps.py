"""Which samples every training step uses, computed identically on every node (no data exchanged)."""
from __future__ import annotations

import functools
import math
import weakref
from dataclasses import dataclass

import numpy as np

from meshsl.align.outcomes import aligned_size, alignment_version
from meshsl.data import dataset_rows, load_dataset, partition, train_test_indices


def edge_name(producer: str, consumer: str) -> str:
    """How plans, frames and metrics name the edge from one segment to another."""
    return f"{producer}->{consumer}"


@dataclass(frozen=True)
class StepInfo:
    step: int  # global training step, from 0
    epoch: int
    step_in_epoch: int
    lanes: tuple[int, ...]  # clients active in this step


@dataclass(frozen=True)
class SamplePools:
    train: tuple[np.ndarray, ...]  # per lane
    test: np.ndarray


def sample_pools(topology) -> SamplePools:
    """Train rows per lane (client shard) and the shared held-out rows, from the shared sample ids."""
    cached = _POOLS.get(topology)
    if cached is None or cached[0] != alignment_version(topology):  # pools depend on the intersection size
        pools = _pools(topology)  # may align locally first (the version read after it includes that)
        cached = _POOLS[topology] = (alignment_version(topology), pools)
    return cached[1]


# Derived data memoised beside the (frozen) topology, not on it; gone with the topology.
_POOLS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _pools(topology) -> SamplePools:
    first = topology.spec.data[0]
    size = aligned_size(topology)  # with sample ids: the common samples after PSI, in the agreed order
    if size is None:  # the file's metadata where it has any: a bank's table is not read to count its rows
        size = dataset_rows(first.source_dataset, topology.base_dir)
    seed = topology.spec.training.seed
    train, test = train_test_indices(size, first.dataset.test_fraction, seed)
    clients = topology.spec.clients
    if clients is None:
        return SamplePools(train=(train,), test=test)
    table = load_dataset(first.source_dataset, topology.base_dir)  # the shards follow its labels
    shards = partition(train, table.labels, clients.count, clients.partition, seed)
    return SamplePools(train=tuple(shards), test=test)


def epoch_steps(topology) -> list[StepInfo]:
    """The steps of one epoch (epoch and step numbers filled in by `training_steps`)."""
    batch = topology.spec.training.batch_size
    pools = sample_pools(topology).train
    clients = topology.spec.clients
    if clients is None:
        return [StepInfo(0, 0, i, (0,)) for i in range(math.ceil(len(pools[0]) / batch))]
    if clients.mode == "splitfed":
        total = sum(len(p) for p in pools)
        count = max(1, math.ceil(total / (batch * len(pools))))
        lanes = every_lane(len(pools))
        return [StepInfo(0, 0, i, lanes) for i in range(count)]
    steps: list[StepInfo] = []
    for lane, pool in enumerate(pools):  # sequential: clients take turns, each through its own shard
        steps.extend(StepInfo(0, 0, i, (lane,)) for i in range(math.ceil(len(pool) / batch)))
    return steps


@functools.lru_cache(maxsize=8)
def every_lane(count: int) -> tuple[int, ...]:
    """(0, ..., count - 1), one tuple per process: every node of a SplitFed simulation derives the steps,
    and each step names every lane; own copies per node grew memory with clients squared (10,000 clients:
    ~0.7 MiB per node in benchmarks/scale.py, about 7 GiB)."""
    return tuple(range(count))


def step_at(one_epoch: list[StepInfo], step: int) -> StepInfo:
    """Training step `step` (from 0) given one epoch's steps (`epoch_steps`): every node derives the same
    one on its own (self-driven steps, docs/wan.md)."""
    epoch, within = divmod(step, len(one_epoch))
    base = one_epoch[within]
    return StepInfo(step, epoch, base.step_in_epoch, base.lanes)


def training_steps(topology, max_steps: int | None = None, epochs: int | None = None) -> list[StepInfo]:
    training = topology.spec.training
    one_epoch = epoch_steps(topology)
    total = max_steps or training.steps
    n_epochs = epochs if epochs is not None else training.epochs
    if total is None:
        total = len(one_epoch) * n_epochs
    return [step_at(one_epoch, step) for step in range(total)]
