"""Divide training rows between replicated clients: iid, Dirichlet label skew, or k classes per client.

Every node computes the same shards from the same (indices, labels, num_clients, spec, seed), so
the coordinator never has to ship shard lists around.
"""
from __future__ import annotations

import numpy as np

from meshsl.data.specs import PartitionSpec
from meshsl.errors import DataError

DIRICHLET_REDRAWS = 10  # redraws before moving rows by hand to reach min_samples


def partition(indices: np.ndarray, labels: np.ndarray | None, num_clients: int, spec: PartitionSpec,
              seed: int) -> list[np.ndarray]:
    """Disjoint, sorted int64 shards that together cover `indices`, one per client.

    `labels` holds the labels of all rows, indexed by row id (`labels[indices]` are the rows to
    share out); only the non-iid kinds need it. Each shard gets at least `spec.min_samples` rows."""
    where = f"partition '{spec.kind}'"
    idx = np.asarray(indices)
    if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "iu"):
        raise DataError(f"indices must be a 1-D integer array, got shape {idx.shape} dtype {idx.dtype}", where)
    idx = idx.astype(np.int64)
    if len(np.unique(idx)) != len(idx):
        raise DataError("indices contain duplicates", where)
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise DataError(f"num_clients must be a positive integer, got {num_clients!r}", where)
    if len(idx) < num_clients * spec.min_samples:
        raise DataError(f"{len(idx)} rows cannot give {num_clients} clients min_samples={spec.min_samples} each; "
                        f"use fewer clients or a smaller min_samples", where)
    rng = _rng(seed, where)
    if spec.kind == "iid":
        return [np.sort(s) for s in np.array_split(rng.permutation(idx), num_clients)]
    y = _labels_of(idx, labels, where)
    if spec.kind == "dirichlet":
        shards = _dirichlet(idx, y, num_clients, spec, rng)
    else:
        shards = _label_skew(idx, y, num_clients, spec.classes_per_client, rng, where)
    shards = _repair(shards, idx, y, spec.min_samples)
    return [np.sort(s) for s in shards]


def label_counts(shards: list[np.ndarray], labels: np.ndarray, num_classes: int) -> np.ndarray:
    """[clients, classes] row counts, to report how skewed a partition is."""
    return np.stack([np.bincount(labels[s], minlength=num_classes) for s in shards])


def _rng(seed: int, where: str) -> np.random.Generator:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"seed must be an integer >= 0, got {seed!r}", where)
    return np.random.default_rng(int(seed))


def _labels_of(idx: np.ndarray, labels: np.ndarray | None, where: str) -> np.ndarray:
    if labels is None:
        raise DataError("non-iid partitions need labels; the dataset has none (use kind: iid)", where)
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataError(f"non-iid partitions need integer class labels [N], got {labels.dtype} {labels.shape}", where)
    if len(idx) and (idx.min() < 0 or idx.max() >= len(labels)):
        raise DataError(f"indices reach row {int(idx.max())} but there are {len(labels)} labels", where)
    return labels[idx]


def _dirichlet(idx: np.ndarray, y: np.ndarray, num_clients: int, spec: PartitionSpec,
               rng: np.random.Generator) -> list[np.ndarray]:
    """Each class is split between clients by proportions drawn from Dirichlet(alpha)."""
    shards: list[np.ndarray] = []
    for _ in range(DIRICHLET_REDRAWS):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for c in np.unique(y):
            members = rng.permutation(idx[y == c])
            share = np.nan_to_num(rng.dirichlet(np.full(num_clients, spec.alpha)))
            share = share / share.sum() if share.sum() > 0 else np.full(num_clients, 1.0 / num_clients)
            cuts = np.minimum((np.cumsum(share)[:-1] * len(members)).round().astype(int), len(members))
            for client, piece in enumerate(np.split(members, cuts)):
                parts[client].append(piece)
        shards = [np.concatenate(p) for p in parts]
        if min(len(s) for s in shards) >= spec.min_samples:
            break
    return shards


def _label_skew(idx: np.ndarray, y: np.ndarray, num_clients: int, per_client: int, rng: np.random.Generator,
                where: str) -> list[np.ndarray]:
    """Client i holds `per_client` consecutive classes of a shuffled class list; a class's rows are
    shared evenly between the clients holding it."""
    classes = rng.permutation(np.unique(y))
    if per_client > len(classes):
        raise DataError(f"classes_per_client={per_client} but only {len(classes)} classes are present", where)
    if num_clients * per_client < len(classes):
        raise DataError(f"{num_clients} clients x {per_client} classes cannot cover all {len(classes)} classes; "
                        f"raise classes_per_client or the client count", where)
    holders: dict[int, list[int]] = {int(c): [] for c in classes}
    for client in range(num_clients):
        for j in range(per_client):
            holders[int(classes[(client * per_client + j) % len(classes)])].append(client)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c, owners in holders.items():
        for client, piece in zip(owners, np.array_split(rng.permutation(idx[y == c]), len(owners))):
            parts[client].append(piece)
    return [np.concatenate(p) if p else np.empty(0, np.int64) for p in parts]


def _repair(shards: list[np.ndarray], idx: np.ndarray, y: np.ndarray, min_samples: int) -> list[np.ndarray]:
    """Top up small shards from the largest ones, preferring rows of classes the small shard already
    has (keeps the skew). Always succeeds when len(idx) >= clients * min_samples (checked earlier)."""
    label_of = np.zeros(int(idx.max()) + 1, dtype=np.int64)
    label_of[idx] = y
    shards = [s.astype(np.int64) for s in shards]
    for r in sorted(range(len(shards)), key=lambda k: (len(shards[k]), k)):
        need = min_samples - len(shards[r])
        if need <= 0:
            continue
        own = np.unique(label_of[shards[r]])
        for d in sorted(range(len(shards)), key=lambda k: (-len(shards[k]), k)):
            spare = len(shards[d]) - min_samples
            if d == r or spare <= 0:
                continue
            take = min(spare, need)
            familiar = np.isin(label_of[shards[d]], own)
            order = np.argsort(~familiar, kind="stable")  # rows of familiar classes first
            moved, kept = order[:take], np.sort(order[take:])
            shards[r] = np.concatenate([shards[r], shards[d][moved]])
            shards[d] = shards[d][kept]
            need -= take
            if need == 0:
                break
    return shards
