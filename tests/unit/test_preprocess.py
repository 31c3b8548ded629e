"""Per-party preprocessing (issue 25): fitted on the party's own training rows, applied as the first layer
of its segment, listed as kept at the party by `meshsl plan`."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from meshsl.models.layers import Preprocess
from meshsl.compute.preprocessing import fitted_values
from meshsl.compute.worker import SegmentWorker
from meshsl.config.specs import PreprocessSpec
from meshsl.plans.explain import plan_document
from meshsl.schedule.steps import sample_pools
from meshsl.topology.model import load_topology

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
WINE = ROOT / "topologies" / "vertical_wine.yaml"


def test_fitted_values_ignore_missing_cells_and_use_only_the_given_rows():
    x = torch.tensor([[1.0, 10.0], [3.0, float("nan")], [5.0, 30.0], [100.0, 100.0]])
    rows = np.array([0, 1, 2])  # row 3 is held out: it must not move the statistics
    fill, shift, scale = fitted_values(x, rows, PreprocessSpec(impute="mean", scale="standard"))
    assert fill.tolist() == [3.0, 20.0] and shift.tolist() == [3.0, 20.0]
    assert torch.allclose(scale, torch.tensor([1 / np.std([1, 3, 5]), 1 / np.std([10, 30])], dtype=torch.float32))
    _, shift, scale = fitted_values(x, rows, PreprocessSpec(scale="minmax"))
    assert shift.tolist() == [1.0, 10.0] and torch.allclose(scale, torch.tensor([0.25, 0.05]))
    constant = torch.ones(4, 1)
    assert fitted_values(constant, rows, PreprocessSpec(scale="standard"))[2].tolist() == [1.0]  # no division by 0


def test_the_layer_fills_then_scales():
    layer = Preprocess(2, impute=True)
    layer.fill.copy_(torch.tensor([7.0, 0.0]))
    layer.shift.copy_(torch.tensor([1.0, 2.0]))
    layer.scale.copy_(torch.tensor([2.0, 0.5]))
    out = layer(torch.tensor([[float("nan"), 4.0]]))
    assert out.tolist() == [[12.0, 1.0]]
    assert set(layer.state_dict()) == {"fill", "shift", "scale"}  # saved with the segment's weights


def test_each_party_fits_on_its_own_training_rows_and_the_plan_says_it_stays():
    topology = load_topology(WINE)
    worker = SegmentWorker(topology, "cellar")
    layer = worker.modules["cellar_encoder"][0]
    assert isinstance(layer, Preprocess) and layer.impute
    features = worker.data.tensors["cellar_columns"]
    train = sample_pools(topology).train[0]
    expected = np.nanmean(features[torch.as_tensor(train)].numpy().astype(np.float64), axis=0)
    assert np.allclose(layer.shift.numpy(), expected, rtol=1e-6)
    everything = np.nanmean(features.numpy().astype(np.float64), axis=0)
    assert not np.allclose(layer.shift.numpy(), everything, rtol=1e-6)  # held-out rows are not used
    kept = plan_document(topology)["preprocessing"]
    assert {(r["party"], r["source"]) for r in kept} == {
        ("vineyard", "vineyard_columns"), ("cellar", "cellar_columns"), ("lab", "lab_columns")}
    assert all(r["sent"] == "never" for r in kept)


def test_a_prediction_worker_loads_no_training_table():
    """`meshsl predict` reads each party's input file only: a 100 GB training table is not loaded to predict
    a thousand new rows (the fitted preprocessing comes with the saved weights)."""
    worker = SegmentWorker(load_topology(WINE), "cellar", training=False)
    assert "cellar_columns" in worker.data.tensors and worker.data.tensors.loaded == {}
    assert worker.data.tensors["cellar_columns"].shape == (178, 4)  # still there if a round asks for it
