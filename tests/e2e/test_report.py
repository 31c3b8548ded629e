"""`meshsl run --report DIR`: plots (loss, accuracy, samples/s, bytes per hop) and summary.json."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from meshsl.apps.report import write_report

REPO = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOTS = ("loss.png", "accuracy.png", "throughput.png", "edge_bytes.png")
STEPS = 6


def assert_real_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    with Image.open(path) as image:
        image.verify()  # checks the chunks and their CRCs
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("L"))
    assert pixels.shape[0] >= 200 and pixels.shape[1] >= 300, pixels.shape
    assert pixels.std() > 1.0, f"{path} is blank"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("report")
    report = work / "report"
    result = subprocess.run(
        [sys.executable, "-m", "meshsl", "run", str(REPO / "topologies" / "vanilla.yaml"), "--free-ports",
         "--steps", str(STEPS), "--no-progress", "--run-dir", str(work / "run"), "--report", str(report)],
        capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return report, result.stdout


def test_report_writes_valid_plots_and_summary(finished_run):
    report, stdout = finished_run
    for name in PLOTS:
        assert_real_png(report / name)
        assert str(report / name) in stdout  # the command says where the report went
    summary = json.loads((report / "summary.json").read_text())
    assert summary["steps"] == STEPS
    assert summary["samples"] == STEPS * 64  # vanilla: batch_size 64, one lane
    assert summary["edges"]["bottom->top"]["forward_bytes"] > 0
    assert summary["edges"]["bottom->top"]["backward_bytes"] > 0
    evaluated = summary["tasks"]["digit"]["eval"]
    assert 0.0 <= evaluated["accuracy"] <= 1.0
    history = summary["history"]
    assert [row["step"] for row in history] == list(range(STEPS))
    assert all(row["samples_per_s"] > 0 for row in history)
    assert "eval" in history[-1], "the last step is evaluated"


def test_report_from_a_partial_history(tmp_path):
    """A run cut short (no eval row, a malformed row) still gets the plots its data supports."""
    history = [{"step": 0, "epoch": 0, "tasks": {"digit": {"loss": 2.3, "accuracy": 0.1}}, "samples_per_s": 100.0},
               {"step": 1, "epoch": 0, "tasks": {"digit": {"loss": float("nan")}}},
               "not a row",
               {"step": 2, "epoch": 0, "tasks": {"digit": {"loss": 2.1, "accuracy": 0.3}}, "samples_per_s": 120.0}]
    paths = write_report({"edges": {}}, history, tmp_path / "out")
    names = sorted(p.name for p in paths)
    assert names == ["accuracy.png", "loss.png", "summary.json", "throughput.png"]  # no edges: no bytes plot
    for path in paths:
        if path.suffix == ".png":
            assert_real_png(path)
