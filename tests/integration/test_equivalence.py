"""Split training with pipelined micro-batches equals unsplit one-process training on the same batches."""
import asyncio

import pytest
import torch
import yaml

from meshsl.apps.reference import train_reference
from support.documents import chain, topology_of
from meshsl.coordinator.runtime import RunOptions
from meshsl.launch.simulate import simulate


def distributed_weights(topology) -> dict:
    summary, runtimes = asyncio.run(simulate(topology, RunOptions(evaluate=False)))
    weights = {}
    for runtime in runtimes.values():
        for name, module in runtime.worker.modules.items():
            weights[name] = module.state_dict()
    return summary, weights


@pytest.mark.parametrize("hops,micro_batches,schedule,optimizer", [
    (2, 1, "gpipe", "sgd"), (2, 4, "gpipe", "sgd"), (2, 8, "1f1b", "adam"),
    (4, 1, "1f1b", "sgd"), (4, 6, "gpipe", "adam"), (4, 8, "1f1b", "sgd"),
])
def test_split_training_matches_single_process(hops, micro_batches, schedule, optimizer):
    topology = topology_of(chain(hops, micro_batches, schedule, optimizer))
    reference, ref_losses = train_reference(topology)
    summary, weights = distributed_weights(topology)
    assert set(weights) == set(reference)
    for segment, state in reference.items():
        for key, value in state.items():
            torch.testing.assert_close(weights[segment][key], value, rtol=1e-4, atol=1e-5)
    # the weights really moved (the comparison is not trivially true)
    initial = topology_of(chain(hops, micro_batches, schedule, optimizer))
    from meshsl.compute.worker import build_module
    first = build_module(initial, "s0").state_dict()
    assert any(not torch.allclose(first[k], reference["s0"][k]) for k in first)
    assert summary["tasks"]["digit"]["train"]["loss"] == pytest.approx(ref_losses[-1], rel=1e-3)


@pytest.mark.slow
def test_equivalence_over_real_processes(tmp_path):
    """The same check with every node its own OS process on real ZeroMQ tcp sockets."""
    from safetensors.torch import load_file
    from typer.testing import CliRunner
    from meshsl.cli import app

    document = chain(4, 4, "1f1b", "adam")
    path = tmp_path / "chain4.yaml"
    path.write_text(yaml.safe_dump(document))
    result = CliRunner().invoke(app, ["run", str(path), "--free-ports", "--no-progress", "--run-dir",
                                      str(tmp_path / "run"), "--weights-out", str(tmp_path / "w")])
    assert result.exit_code == 0, result.output
    reference, _ = train_reference(topology_of(document))
    for segment, state in reference.items():
        saved = load_file(str(tmp_path / "w" / f"{segment}.safetensors"))
        for key, value in state.items():
            torch.testing.assert_close(saved[key], value, rtol=1e-4, atol=1e-5)
