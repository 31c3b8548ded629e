"""The public Python API: the notebook-style example runs vertical.yaml's three parties as real node
processes, cancels a run cleanly and trains to the same weights as `meshsl run` with the same override;
KeyboardInterrupt stops every node; topologies from dicts and overrides; the package is typed."""
from __future__ import annotations

import _thread
import re
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

import meshsl

ROOT = Path(__file__).resolve().parents[2]
VERTICAL = ROOT / "topologies" / "vertical.yaml"
EXAMPLE = ROOT / "examples" / "notebook_vertical.py"
STEPS = 8


def _example():
    spec = importlib.util.spec_from_file_location("notebook_vertical", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.e2e
def test_the_notebook_example_trains_like_meshsl_run(tmp_path, capsys):
    """The example cancels one run from its progress callback (every node stopped, RunCancelled), trains
    another, exports and assembles it; its weights equal `meshsl run --set` of the same topology."""
    result = _example().main(tmp_path / "api", steps=STEPS)
    printed = capsys.readouterr().out
    assert re.search(r"cancelled: run cancelled after step [1-7] ", printed), printed
    assert len(result.history) == STEPS and result.summary["steps"] == STEPS
    assert 0.0 <= result.metrics["cancer"]["accuracy"] <= 1.0
    assert set(result.weight_files) == {"encoder_a", "encoder_b", "classifier"}
    assert (tmp_path / "api" / "model.pt").is_file()
    cli_weights = tmp_path / "cli-weights"
    done = subprocess.run([sys.executable, "-m", "meshsl", "run", str(VERTICAL), "--steps", str(STEPS), "--free-ports",
                           "--no-progress", "--set", "training.optimizer.lr=0.01", "--weights-out", str(cli_weights),
                           "--run-dir", str(tmp_path / "cli-run")], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    for segment, path in result.weight_files.items():
        ours, theirs = load_file(str(path)), load_file(str(cli_weights / path.name))
        assert ours.keys() == theirs.keys()
        assert all((ours[k] == theirs[k]).all() for k in ours), segment
    for run_dir in (result.run_dir, tmp_path / "cli-run"):  # what the node processes were given
        assert yaml.safe_load((run_dir / "topology.yaml").read_text())["training"]["optimizer"]["lr"] == 0.01


@pytest.mark.e2e
def test_keyboard_interrupt_stops_every_node_process(tmp_path):
    """Ctrl-C in a notebook (here: interrupt_main from the progress thread) stops every node process before
    KeyboardInterrupt reaches the caller."""
    def interrupt(row: dict) -> None:
        if row.get("step", -1) >= 0:
            _thread.interrupt_main()

    handle = meshsl.start(VERTICAL, steps=200, run_dir=tmp_path / "run", free_ports=True, on_progress=interrupt)
    assert len(handle.pids) == 3
    with pytest.raises(KeyboardInterrupt):
        handle.wait(timeout=240)
    assert handle.running() == {"hospital_a": False, "hospital_b": False, "lab": False}
    assert 1 <= len(handle.history) < 200


def test_a_topology_from_a_dict_with_overrides_changes_the_hash():
    document = yaml.safe_load(VERTICAL.read_text())
    base = meshsl.load(document, base_dir=VERTICAL.parent)
    assert base.hash == meshsl.load(VERTICAL).hash
    changed = meshsl.load(document, base_dir=VERTICAL.parent, overrides={"training.optimizer.lr": 0.01}, device="cpu")
    assert changed.spec.training.optimizer.lr == 0.01 and changed.hash != base.hash
    assert document["training"]["optimizer"]["lr"] == 0.003  # the caller's dict is left alone


def test_an_override_with_a_typo_is_refused_with_a_suggestion():
    with pytest.raises(meshsl.ConfigError, match=r"training\.optimizer\.rl: unknown key \(did you mean 'lr'\?\)"):
        meshsl.load(VERTICAL, overrides={"training.optimizer.rl": 0.01})


def test_simulate_returns_history_and_weights(tmp_path):
    seen = []
    result = meshsl.simulate(VERTICAL, steps=3, weights_out=tmp_path / "w", on_progress=seen.append)
    assert [row["step"] for row in result.history] == [0, 1, 2]
    assert len([r for r in seen if "step" in r]) == 3
    assert set(result.weight_files) == {"encoder_a", "encoder_b", "classifier"}
    assert set(result.state_dict("classifier")) == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_simulate_stops_when_the_callback_returns_false():
    with pytest.raises(meshsl.RunCancelled, match="after step 1"):
        meshsl.simulate(VERTICAL, steps=50, on_progress=lambda row: row.get("step", 0) < 1)


def test_plan_and_validate_from_python():
    assert meshsl.validate(VERTICAL) == []
    document = meshsl.plan(VERTICAL)
    assert document["coordinator"] == "lab" and document["leakage_warnings"] == []


def test_the_package_is_typed_and_exports_its_api():
    assert (ROOT / "meshsl" / "py.typed").is_file()
    for name in ("load", "validate", "plan", "run", "start", "simulate", "predict", "evaluate", "export", "assemble",
                 "load_model", "RunResult", "Run", "Topology"):
        assert name in meshsl.__all__ and callable(getattr(meshsl, name)), name
        assert getattr(meshsl, name).__doc__, f"{name} has no docstring"
    assert meshsl.__version__ == "0.1.0"


def test_import_meshsl_does_not_import_torch():
    """A node process starts with `import meshsl`: the API comes in only when used."""
    code = "import sys, meshsl; assert 'torch' not in sys.modules and 'meshsl.api' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
