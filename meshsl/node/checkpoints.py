"""A node's checkpoint files (on the compute thread): the step-0 start, periodic saves, loads on recovery.

What is saved when is decided by the CommitBook; this reads and writes.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Optional

from meshsl.compute import checkpoint
from meshsl.machines.commit_book import CommitBook

log = logging.getLogger("meshsl.node")


class NodeCheckpoints:
    """`metrics`: returns the node's metrics (None: none); `lag`: returns how many steps apart nodes may be."""

    def __init__(self, topology, node: str, directory: Path, book: CommitBook, resume: bool,
                 metrics: Callable[[], Any], lag: Callable[[], int]) -> None:
        self.topology = topology
        self.node = node
        self.directory = directory
        self.book = book
        self.resume = resume
        self._metrics = metrics
        self._lag = lag
        self._model_hash: Optional[str] = None

    @property
    def model_hash(self) -> str:
        """What this node's checkpoints hold (checkpoint.model_hash), computed once."""
        if self._model_hash is None:
            self._model_hash = checkpoint.model_hash(self.topology)
        return self._model_hash

    def steps(self) -> list[int]:
        return checkpoint.available_steps(self.directory, self.node) if self.book.enabled else []

    def prepare(self, worker) -> None:
        """Fresh runs start from a step-0 checkpoint (a point every node has); resumed ones load the newest."""
        if not self.book.enabled:
            return
        steps = checkpoint.available_steps(self.directory, self.node)
        if self.resume and steps:
            newest, state = checkpoint.load_newest(self.directory, self.node, self.model_hash)
            worker.restore(state)
            log.warning("%s: resumed from checkpoint of step %d", self.node, newest)
            metrics = self._metrics()
            if metrics:
                metrics.restart()
            return
        for step in steps:  # a fresh run must not mix with an earlier run's files
            (checkpoint.node_dir(self.directory, self.node) / f"step-{step}.pt").unlink(missing_ok=True)
        checkpoint.save(self.directory, self.node, 0, worker.state(), self.model_hash)

    def save(self, step: int, worker) -> None:
        keep = checkpoint.KEEP + self.book.extra_kept(self._lag())
        checkpoint.save(self.directory, self.node, step, worker.state(), self.model_hash, keep=keep)

    def timed_save(self, step: int, worker) -> None:
        started = time.perf_counter()
        self.save(step, worker)
        metrics = self._metrics()
        if metrics:
            metrics.checkpoint(time.perf_counter() - started, step)

    def load(self, step: int) -> dict:
        return checkpoint.load(self.directory, self.node, step, self.model_hash)
