"""Deterministic batches: the samples of any (epoch, step, lane) are a pure function of the arguments.

Every node of a lane (feature parties, label holder) calls `batch_indices` with the same arguments
and gets the same row ids, so batches line up across parties without sending sample ids, and a
replayed step after a failure sees exactly the samples it saw the first time.
"""
from __future__ import annotations

import math

import numpy as np

from meshsl.errors import DataError

WHERE = "sampler"


def _check(pool_size: int, batch_size: int) -> None:
    if pool_size < 1:
        raise DataError("the sample pool is empty", WHERE)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise DataError(f"batch_size must be a positive integer, got {batch_size!r}", WHERE)


def steps_per_epoch(pool_size: int, batch_size: int) -> int:
    """Steps that visit every sample of the pool at least once."""
    _check(pool_size, batch_size)
    return math.ceil(pool_size / batch_size)


def batch_indices(pool: np.ndarray, batch_size: int, seed: int, epoch: int, step: int, lane: int = 0) -> np.ndarray:
    """Row ids of batch `step` of `epoch` on data lane `lane`; always exactly batch_size of them.

    Each (seed, epoch, lane) shuffles the pool once; step k takes positions [k*B, (k+1)*B) of that
    order, wrapping to its start, so the last batch of an epoch (and a pool smaller than B) is
    filled up with samples from the beginning instead of being short."""
    pool = np.asarray(pool)
    _check(len(pool), batch_size)
    for name, value in (("seed", seed), ("epoch", epoch), ("step", step), ("lane", lane)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise DataError(f"{name} must be an integer >= 0, got {value!r}", WHERE)
    order = np.random.default_rng([int(seed), int(epoch), int(lane)]).permutation(pool)
    positions = (int(step) * batch_size + np.arange(batch_size)) % len(pool)
    return order[positions].astype(np.int64, copy=False)


def eval_batches(pool: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Consecutive, unshuffled batches covering the pool once; the last may be short."""
    pool = np.asarray(pool)
    _check(len(pool), batch_size)
    return [pool[i:i + batch_size].astype(np.int64, copy=False) for i in range(0, len(pool), batch_size)]
