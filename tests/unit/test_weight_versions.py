"""Weight stashing under staleness k, without a node: step s runs on W_{s-k}; applying step s stashes
W_{s+1} and forgets what no later step uses; a checkpoint round-trips the versions."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from meshsl.compute.weight_versions import WeightVersions


def context(round_: int, step: int):
    return SimpleNamespace(round=round_, step=step)


def test_step_s_runs_on_version_s_minus_k_and_old_versions_are_dropped():
    torch.manual_seed(0)
    modules = {"bottom": torch.nn.Linear(2, 1)}
    optimizer = torch.optim.SGD(modules["bottom"].parameters(), lr=0.1)
    versions = WeightVersions(staleness=1)
    w0 = modules["bottom"].weight.detach().clone()
    for step in range(3):
        state = versions.begin(context(step + 1, step), {}, modules)
        x = torch.ones(1, 2)
        torch.func.functional_call(modules["bottom"], state.params["bottom"], (x,)).sum().backward()
        if step <= 1:  # steps 0 and 1 both run on W_0
            assert torch.equal(state.params["bottom"]["weight"].detach(), w0)
        assert versions.take_gradients(step + 1, modules) is state
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        versions.applied(state, modules)
        assert sorted(versions.versions) == [step, step + 1]  # W_{s+1} stashed; W_s kept for step s+1
        assert state.params == {}
    assert sorted(versions.versions) == [2, 3]
    assert torch.equal(versions.versions[3]["bottom"]["weight"], modules["bottom"].weight.detach())


def test_a_version_not_stashed_is_an_error():
    versions = WeightVersions(staleness=2)
    with pytest.raises(RuntimeError, match="weight version 3 for step 5 is not stashed"):
        versions.begin(context(6, 5), {}, {"bottom": torch.nn.Linear(1, 1)})


def test_checkpoint_round_trip():
    modules = {"bottom": torch.nn.Linear(2, 1)}
    versions = WeightVersions(staleness=1)
    versions.begin(context(1, 0), {}, modules)
    restored = WeightVersions(staleness=1)
    restored.restore({str(v): seg for v, seg in versions.checkpoint().items()}, torch.device("cpu"))
    assert list(restored.versions) == [0]
    assert torch.equal(restored.versions[0]["bottom"]["bias"], modules["bottom"].bias.detach())
