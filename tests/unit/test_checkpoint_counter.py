"""The coordinator's incarnation counter: an unwritable checkpoint directory is a typed error, not a traceback."""
from __future__ import annotations

import pytest

from meshsl.compute import checkpoint
from meshsl.errors import CheckpointError

pytestmark = pytest.mark.unit


def test_counter_round_trips(tmp_path):
    checkpoint.write_counter(tmp_path / "ckpt", "coordinator", 3)
    assert checkpoint.read_counter(tmp_path / "ckpt", "coordinator") == 3


def test_unwritable_directory_is_a_checkpoint_error_naming_the_path(tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the checkpoint directory should be")
    with pytest.raises(CheckpointError, match="not-a-directory"):
        checkpoint.write_counter(blocker / "ckpt", "coordinator", 1)
