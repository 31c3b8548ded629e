"""An oracle that shares no code with meshsl's data, batching, loss or training loop (issue 30: the
equivalence reference in meshsl/apps/reference.py uses the runtime's own `training_steps`, `NodeData` and
`task_loss`, so a batching bug would hit both sides). Here the digits file is read with numpy, the split,
the batches, the initial weights, the loss and the optimizer follow the rules as documented, written
again in plain numpy and torch; meshsl trains vanilla.yaml split over two real node processes with
micro-batches, and the two sets of weights must agree."""
from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np
import pytest
import sklearn
import torch
import yaml
from safetensors.torch import load_file
from torch import nn

import meshsl

ROOT = Path(__file__).resolve().parents[2]
STEPS = 40  # 28 steps per epoch (1437 rows / 64, rounded up): the second epoch's reshuffle is included


def _digits() -> tuple[np.ndarray, np.ndarray]:
    path = Path(sklearn.__file__).parent / "datasets" / "data" / "digits.csv.gz"
    with gzip.open(path, "rt") as f:
        raw = np.loadtxt(f, delimiter=",")
    return (raw[:, :-1] / 16.0).astype(np.float32), raw[:, -1].astype(np.int64)  # pixels scaled to [0, 1]


def _oracle(document: dict, steps: int) -> dict[str, dict[str, torch.Tensor]]:
    training = document["training"]
    seed, batch = training["seed"], training["batch_size"]
    x, y = _digits()
    n = len(x)
    n_test = min(max(int(round(n * 0.2)), 1), n - 1)  # test_fraction 0.2 (the default)
    train = np.sort(np.random.default_rng(seed).permutation(n)[n_test:])
    per_epoch = math.ceil(len(train) / batch)
    models = {}
    for index, segment in enumerate(document["segments"]):  # initial weights: seeded by (seed, segment index)
        torch.manual_seed(seed * 1_000_003 + index)
        models[segment["name"]] = nn.Sequential(*[getattr(nn, layer[0])(*layer[1:]) for layer in segment["layers"]])
    parameters = [p for m in models.values() for p in m.parameters()]
    optimizer = torch.optim.Adam(parameters, lr=training["optimizer"]["lr"])  # one optimizer each = the same
    for step in range(steps):
        epoch, k = divmod(step, per_epoch)
        order = np.random.default_rng([seed, epoch, 0]).permutation(train)  # reshuffled per (seed, epoch, lane)
        rows = order[(k * batch + np.arange(batch)) % len(train)]  # a short last batch wraps to the start
        hidden = torch.from_numpy(x[rows])
        for segment in document["segments"]:
            hidden = models[segment["name"]](hidden)
        loss = nn.functional.cross_entropy(hidden, torch.from_numpy(y[rows]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {name: {k: v.detach() for k, v in model.state_dict().items()} for name, model in models.items()}


@pytest.mark.e2e
@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
def test_split_training_equals_an_independent_plain_torch_oracle(tmp_path, schedule):
    document = yaml.safe_load((ROOT / "topologies" / "vanilla.yaml").read_text())
    document["training"]["schedule"] = schedule
    for node in document["nodes"]:
        node.pop("metrics_port", None)
    path = tmp_path / "vanilla.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    result = meshsl.run(path, steps=STEPS, free_ports=True, run_dir=tmp_path / "run")
    expected = _oracle(document, STEPS)
    for segment, state in expected.items():
        got = load_file(str(Path(result.weights_dir) / f"{segment}.safetensors"))
        assert got.keys() == state.keys()
        for key, value in state.items():
            torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-5)
    # the oracle is not vacuous: one step fewer moves the weights by more than the tolerance
    earlier = _oracle(document, STEPS - 1)
    assert any(not torch.allclose(earlier[s][k], v, rtol=1e-4, atol=1e-5) for s, st in expected.items()
               for k, v in st.items())
