"""CommitBook: which steps get checkpoints, which step and lanes are in progress, which recovery was applied."""
from __future__ import annotations

import pytest

from meshsl.protocol import control
from meshsl.machines.commit_book import CommitBook

pytestmark = pytest.mark.unit


def test_checkpoints_fall_every_n_steps():
    book = CommitBook(every=3)
    assert [book.checkpoint_after(s) for s in range(6)] == [None, None, 3, None, None, 6]


def test_no_checkpoints_when_disabled():
    book = CommitBook(every=0)
    assert not book.enabled
    assert book.checkpoint_after(0) is None
    assert book.deferred_checkpoint(control.Run(first_step=0, count=2, micro_batches=1, checkpoint=4)) is None


def test_the_last_step_of_a_run_holding_its_checkpoint_leaves_it_to_the_next_run():
    book = CommitBook(every=2)
    run = control.Run(first_step=2, count=2, micro_batches=1, hold_checkpoint=True)
    book.run_started(run, now=1.0)
    assert book.round_started == 1.0
    assert book.checkpoint_after(3) is None  # held: the barrier changes weights first
    assert book.checkpoint_after(1) == 2  # not the run's last step
    book.run_dropped()
    assert book.checkpoint_after(3) == 4
    assert book.deferred_checkpoint(control.Run(first_step=4, count=1, micro_batches=1, checkpoint=4)) == 4
    assert book.deferred_checkpoint(control.Run(first_step=4, count=1, micro_batches=1)) is None


def test_rounds_record_lanes_step_and_start():
    book = CommitBook(every=1)
    book.round_began((0, 1), now=2.0)
    assert book.lanes == [0, 1] and book.round_started == 2.0 and book.train_step is None
    book.step_prepared(7, (1,))
    assert book.lanes == (1,) and book.train_step == 7
    book.step_applied(now=3.0)
    assert book.round_started == 3.0


def test_a_recovery_is_applied_once():
    book = CommitBook(every=1)
    assert not book.already_restored(4)
    book.restored(4)
    assert book.already_restored(4) and not book.already_restored(5)


def test_staleness_keeps_enough_checkpoints_for_nodes_lag_apart():
    assert CommitBook(every=2).extra_kept(lag=5) == 0
    assert CommitBook(every=2, staleness=2).extra_kept(lag=5) == 3
    assert CommitBook(every=0, staleness=1).extra_kept(lag=4) == 5
