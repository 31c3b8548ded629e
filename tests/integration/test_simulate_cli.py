"""`meshsl simulate`: the in-process engine from the command line, and its errors for bad options."""
import json
from pathlib import Path

from typer.testing import CliRunner

from meshsl.cli import app

ROOT = Path(__file__).resolve().parents[2]


def test_simulate_in_process(tmp_path):
    out = tmp_path / "summary.json"
    result = CliRunner().invoke(app, ["simulate", str(ROOT / "topologies" / "splitfed.yaml"), "--steps", "2",
                                      "--no-eval", "--summary-json", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads(out.read_text())
    assert summary["steps"] == 2 and summary["engine"] == {"name": "inprocess"}
    assert summary["tasks"]["digit"]["train"]["loss"] > 0


def test_simulate_rejects_bad_options():
    topology = str(ROOT / "topologies" / "splitfed.yaml")
    bad = CliRunner().invoke(app, ["simulate", topology, "--engine", "spark"])
    assert bad.exit_code == 2 and "--engine 'spark': expected one of inprocess, ray" in bad.output
    stray = CliRunner().invoke(app, ["simulate", topology, "--ray-address", "127.0.0.1:1"])
    assert stray.exit_code == 2 and "--ray-address needs --engine ray" in stray.output
