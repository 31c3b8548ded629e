"""A node's step and checkpoint bookkeeping, free of I/O: which steps get a checkpoint, which training
step and lanes the round in progress has, which recovery was already applied.

The node's shell and its compute thread read and write the files; this decides what they are.
"""
from __future__ import annotations

from typing import Optional, Sequence

from meshsl.protocol import control


class CommitBook:
    """`every`: checkpoint every this many training steps (0: never, e.g. prediction); `staleness`: training
    steps in flight at once (their nodes may be apart by the machine's lag, and must still share a checkpoint)."""

    def __init__(self, every: int, staleness: int = 0) -> None:
        self.every = every
        self.staleness = staleness
        self.run: Optional[control.Run] = None  # the self-driven training steps in progress (docs/wan.md)
        self.lanes: Sequence[int] = ()  # lanes of the round in progress
        self.train_step: Optional[int] = None  # last training step begun (eval rounds follow it)
        self.restored_round: Optional[int] = None  # the last recovery applied
        self.round_started = 0.0

    @property
    def enabled(self) -> bool:
        return self.every > 0

    # -- rounds ------------------------------------------------------------------------------------
    def round_began(self, lanes: Sequence[int], now: float) -> None:
        """An evaluation or prediction round began (the coordinator drives those)."""
        self.lanes = list(lanes)
        self.round_started = now

    def step_prepared(self, step: int, lanes: Sequence[int]) -> None:
        """A self-driven training step is prepared (shared tuple: a copy per node would be clients squared)."""
        self.lanes = lanes
        self.train_step = step

    def run_started(self, run: control.Run, now: float) -> None:
        self.run = run
        self.round_started = now

    def run_dropped(self) -> None:
        """An abort or a recovery: no self-driven steps are in progress."""
        self.run = None

    # -- checkpoints -------------------------------------------------------------------------------
    def deferred_checkpoint(self, run: control.Run) -> Optional[int]:
        """The checkpoint a Run asks for first (one the coordinator deferred past a barrier), if any is kept."""
        return run.checkpoint if run.checkpoint is not None and self.enabled else None

    def checkpoint_after(self, step: int) -> Optional[int]:
        """The checkpoint due once training step `step` is applied (None: none). A step ending at a
        weight-changing barrier (the last of a Run holding its checkpoint) leaves it to the next Run."""
        run = self.run
        held = run is not None and run.hold_checkpoint and step == run.first_step + run.count - 1
        if self.enabled and (step + 1) % self.every == 0 and not held:
            return step + 1
        return None

    def step_applied(self, now: float) -> None:
        self.round_started = now

    def extra_kept(self, lag: int) -> int:
        """Checkpoints kept beyond the usual: with staleness, nodes up to `lag` steps apart must share one."""
        return lag // max(1, self.every) + 1 if self.staleness else 0

    # -- recovery ----------------------------------------------------------------------------------
    def already_restored(self, base: int) -> bool:
        """A retried RESTORE (our ack was lost): acknowledge again, load once."""
        return self.restored_round == base

    def restored(self, base: int) -> None:
        self.restored_round = base
