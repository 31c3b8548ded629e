"""topologies/vertical_wine.yaml: three parties' raw CSV exports (ids, a text label, empty cells), each
standardising (and one imputing) its own columns. Trained across real node processes, it reaches the
accuracy issue 25 asks for, and the assembled export predicts exactly what the distributed model does."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.csv as pa_csv
import pytest
import torch
from typer.testing import CliRunner

from meshsl.cli import app
from meshsl.apps.export import load_assembled
from meshsl.apps.predict import load_predictions

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
WINE = ROOT / "topologies" / "vertical_wine.yaml"
DATA = ROOT / "topologies" / "data" / "wine"
runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def columns(path: Path, drop: tuple[str, ...]) -> tuple[list[str], np.ndarray]:
    table = pa_csv.read_csv(path)
    ids = [str(v) for v in table.column("sample_id").to_pylist()]
    names = [n for n in table.column_names if n not in ("sample_id", *drop)]
    values = np.stack([table.column(n).to_numpy(zero_copy_only=False).astype(np.float32) for n in names], axis=1)
    return ids, values  # empty cells are NaN, as the node reads them


def test_wine_standardised_per_party_trains_and_the_assembled_export_predicts_the_same(tmp_path):
    weights = tmp_path / "weights"
    result = cli("run", WINE, "--free-ports", "--no-progress", "--weights-out", weights, "--run-dir",
                 tmp_path / "train", "--timeout", "240")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "train" / "summary.json").read_text())
    assert summary["tasks"]["wine"]["eval"]["accuracy"] >= 0.95

    lab_ids, lab = columns(DATA / "lab.csv", drop=("cultivar",))
    header = "sample_id," + ",".join(f"x{j}" for j in range(lab.shape[1]))
    rows = [",".join([i, *(f"{v:.9g}" for v in row)]) for i, row in zip(lab_ids, lab)]
    (tmp_path / "lab_input.csv").write_text("\n".join([header, *rows]) + "\n")  # the rows to predict, no label
    out = tmp_path / "predictions"
    result = cli("predict", WINE, "--weights", weights, "--input", f"vineyard={DATA / 'vineyard.csv'}",
                 "--input", f"cellar={DATA / 'cellar.csv'}", "--input", f"lab={tmp_path / 'lab_input.csv'}",
                 "--output", out, "--free-ports", "--run-dir", tmp_path / "predict", "--timeout", "240")
    assert result.exit_code == 0, result.output
    distributed = load_predictions(out / "wine.csv")

    exports = []
    for node in ("vineyard", "cellar", "lab"):
        exports.append(tmp_path / f"export_{node}")
        assert cli("export", WINE, "--weights", weights, "--node", node, "--out", exports[-1]).exit_code == 0
    spec = json.loads((exports[1] / "cellar_encoder.json").read_text())
    assert spec["preprocess"]["sources"]["cellar_columns"] == {"impute": "mean", "scale": "standard"}
    result = cli("assemble", WINE, *exports, "--out", tmp_path / "model.pt")
    assert result.exit_code == 0, result.output
    model = load_assembled(tmp_path / "model.pt")

    inputs = {}
    for name, file, drop in (("vineyard_columns", "vineyard.csv", ()), ("cellar_columns", "cellar.csv", ()),
                             ("lab_columns", "lab.csv", ("cultivar",))):
        ids, values = columns(DATA / file, drop)
        position = {v: i for i, v in enumerate(ids)}
        inputs[name] = torch.from_numpy(values[[position[str(i)] for i in distributed["id"]]])
    assert torch.isnan(inputs["cellar_columns"]).any()  # the assembled model imputes, as the cellar's node did
    probs = model.predict_proba(inputs)["wine"].numpy()
    assert len(probs) == 178
    for k in range(3):
        assert np.allclose(probs[:, k], distributed[f"prob_{k}"], atol=1e-6, rtol=0)
    assert (probs.argmax(1) == distributed["prediction"]).all()
