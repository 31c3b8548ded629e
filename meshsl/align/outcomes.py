"""The outcome of a sample-id alignment, per node, and what the rest of meshsl derives from it.

Kept per node in a registry keyed (weakly) by the topology, which stays frozen: the sample pools
(`meshsl.schedule.steps`) and a node's data (`meshsl.compute.node_data`) read it, the runner
(`meshsl.node.align_runner`) writes it. Without a node's outcome (local tools) every party's files are
intersected here in the clear.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from meshsl.align.ids import data_nodes, node_ids, uses_ids
from meshsl.align.session import AlignmentError, AlignmentOutcome, size_problem


def alignment_settings(topology) -> tuple[float, int]:
    spec = topology.spec.alignment
    return (spec.timeout_s, spec.min_intersection) if spec is not None else (600.0, 1)


@dataclass
class _Alignments:
    """What this process knows of one topology's alignment (runtime input, not derived data)."""
    training: dict[str, AlignmentOutcome] = field(default_factory=dict)
    predict: dict[str, AlignmentOutcome] = field(default_factory=dict)
    predict_mode: bool = False
    version: int = 0  # bumped on every outcome: what is derived from the intersection size is stale


_BY_TOPOLOGY: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _alignments(topology) -> _Alignments:
    found = _BY_TOPOLOGY.get(topology)
    if found is None:
        found = _BY_TOPOLOGY[topology] = _Alignments()
    return found


def remember(topology, node: str, outcome: AlignmentOutcome, predict: bool = False) -> None:
    """Keep a node's outcome; `predict`: of its prediction input (the training rows are then not used)."""
    book = _alignments(topology)
    (book.predict if predict else book.training)[node] = outcome
    if predict:
        book.predict_mode = True
    book.version += 1  # pools depend on the intersection size


def enter_predict_mode(topology) -> None:
    """From now on this process aligns (and reads) prediction inputs, not the training rows."""
    _alignments(topology).predict_mode = True


def predict_mode(topology) -> bool:
    found = _BY_TOPOLOGY.get(topology)
    return found is not None and found.predict_mode


def alignment_version(topology) -> int:
    """Changes whenever an outcome is kept: a cache of what depends on the alignment compares it."""
    found = _BY_TOPOLOGY.get(topology)
    return 0 if found is None else found.version


def outcome_of(topology, node: Optional[str] = None, predict: bool = False) -> Optional[AlignmentOutcome]:
    book = _BY_TOPOLOGY.get(topology)
    found = {} if book is None else (book.predict if predict else book.training)
    if node is not None:
        return found.get(node)
    return next(iter(found.values()), None)


def aligned_size(topology) -> Optional[int]:
    """Common samples after alignment (None: rows are matched by position). Without a node's PSI
    outcome (a local tool: the launcher's progress bar, reference training, audits) every party's
    files are read here and intersected directly: the same rows in the same order as the PSI gives."""
    if not uses_ids(topology):
        return None
    if predict_mode(topology):
        predicted = outcome_of(topology, predict=True)
        if predicted is None:
            raise AlignmentError("prediction inputs are matched by id, but no alignment was run for them")
        return predicted.size
    outcome = outcome_of(topology)
    if outcome is None:
        outcome = intersect_locally(topology)[data_nodes(topology)[0]]
    return outcome.size


def aligned_rows(topology, node: str, source: str) -> Optional[np.ndarray]:
    """Row of `source` (held by `node`) for each common sample, in the agreed order; None without ids."""
    if not uses_ids(topology) or predict_mode(topology):
        return None  # predicting: the training rows are loaded but not used
    outcome = outcome_of(topology, node)
    if outcome is None:
        outcome = intersect_locally(topology)[node]
    held = node_ids(topology, node)
    positions = held.rows[source]
    if outcome.ids is None:
        raise AlignmentError(f"node {node} holds data but learned no common ids (an observer's outcome)")
    return np.fromiter((positions[i] for i in outcome.ids), dtype=np.int64, count=len(outcome.ids))


def intersect_locally(topology) -> dict[str, AlignmentOutcome]:
    """Every party's files read here, intersected in the clear (no PSI: nothing leaves this process).
    Remembered like a node's outcome, so later calls in this process reuse it."""
    members = data_nodes(topology)
    held = {n: node_ids(topology, n) for n in members}
    common = sorted(set.intersection(*(set(h.ids) for h in held.values())))
    problem = size_problem(len(common), alignment_settings(topology)[1])
    if problem is not None:
        where = "; ".join(f"{n} ({topology.nodes[n].party}): {h.origin}" for n, h in held.items())
        raise AlignmentError(f"{problem} [{where}]", f"{topology.source}: alignment")
    outcomes = {n: AlignmentOutcome(len(common), common if n in held else None) for n in topology.nodes}
    for node, outcome in outcomes.items():
        remember(topology, node, outcome)
    return outcomes
