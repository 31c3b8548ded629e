"""Restoring a checkpoint restores the optimizer's state, not only the weights (issue 30: before this test
only the e2e tier noticed a restore that skipped the optimizer)."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from meshsl.compute.worker import SegmentWorker
from meshsl.topology.model import load_topology

pytestmark = pytest.mark.unit
VANILLA = Path(__file__).resolve().parents[2] / "topologies" / "vanilla.yaml"


def _step(worker: SegmentWorker, seed: int) -> None:
    module, optimizer = worker.modules["bottom"], worker.optimizers["bottom"]
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(seed))
    module(x).square().sum().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def test_restore_brings_back_adam_moments_and_step_count():
    worker = SegmentWorker(load_topology(VANILLA), "client")
    _step(worker, 1)
    saved = copy.deepcopy(worker.state())  # what a checkpoint file holds
    _step(worker, 2)
    _step(worker, 3)
    worker.restore(saved)
    state = worker.optimizers["bottom"].state_dict()["state"]
    assert state, "Adam has state after a step"
    for index, entry in saved["optimizers"]["bottom"]["state"].items():
        assert torch.equal(state[index]["exp_avg"], entry["exp_avg"])
        assert torch.equal(state[index]["exp_avg_sq"], entry["exp_avg_sq"])
        assert torch.equal(torch.as_tensor(state[index]["step"]), torch.as_tensor(entry["step"]))
    for key, value in saved["modules"]["bottom"].items():
        assert torch.equal(worker.modules["bottom"].state_dict()[key], value)
    # and the next step from the restored state equals the step taken from the saved one the first time
    replay = SegmentWorker(load_topology(VANILLA), "client")
    replay.restore(copy.deepcopy(saved))
    _step(worker, 2)
    _step(replay, 2)
    for key, value in replay.modules["bottom"].state_dict().items():
        assert torch.equal(worker.modules["bottom"].state_dict()[key], value)
