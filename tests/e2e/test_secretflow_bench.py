"""The SecretFlow side-by-side section: it skips cleanly, naming why, when SecretFlow is not at hand (the
default: it lives in its own venv, see benchmarks/secretflow_peer/INSTALL.md); its memory probe counts
every process of a tree; its ratios come from runs of the same rounds."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import secretflow_compare as sfc

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.unit
def test_skips_without_the_variable(monkeypatch):
    monkeypatch.delenv(sfc.ENV_VAR, raising=False)
    result = sfc.measure(quick=True)
    assert set(result) == {"skipped"} and sfc.ENV_VAR in result["skipped"] and "INSTALL.md" in result["skipped"]
    assert sfc.table(result).startswith("SecretFlow comparison | skipped: SecretFlow not configured")


@pytest.mark.unit
def test_skips_with_a_missing_interpreter(monkeypatch, tmp_path):
    missing = tmp_path / "no-venv" / "bin" / "python"
    monkeypatch.setenv(sfc.ENV_VAR, str(missing))
    assert sfc.measure(quick=True) == {"skipped": f"{sfc.ENV_VAR}={missing}: no executable there "
                                                  f"({sfc.INSTALL_HINT})"}


@pytest.mark.integration
def test_skips_with_an_interpreter_lacking_secretflow(monkeypatch):
    try:
        import secretflow  # noqa: F401
        pytest.skip("this interpreter has SecretFlow")
    except ImportError:
        pass
    monkeypatch.setenv(sfc.ENV_VAR, sys.executable)
    skipped = sfc.measure(quick=True)["skipped"]
    assert "cannot import SecretFlow's SLModel" in skipped and "ModuleNotFoundError" in skipped


@pytest.mark.integration
def test_runner_names_the_section_and_skips():
    env = {k: v for k, v in os.environ.items() if k != sfc.ENV_VAR}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--only", "secretflow"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "SecretFlow comparison | skipped: SecretFlow not configured" in proc.stdout


@pytest.mark.integration
def test_tree_memory_counts_every_process():
    # a parent whose child holds 64 MiB and says so, then waits for our stdin to close
    child = "b = bytearray(64 << 20); print('ready', flush=True); import sys; sys.stdin.read()"
    parent = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}])"
    proc = subprocess.Popen([sys.executable, "-c", parent], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    memory = sfc.TreeMemory(proc.pid, interval=3600)  # sampled by hand below
    try:
        assert proc.stdout.readline().strip() == "ready"
        assert len(memory.sample()) == 2
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
    result = memory.stop()
    assert result["processes"] == 2 and result["peak_rss_sum_mib"] >= 64 and result["peak_pss_sum_mib"] >= 64
    assert result["cpu_s"] > 0 and result["runqueue_wait_s"] >= 0


@pytest.mark.unit
def test_ratios_pair_runs_of_the_same_round():
    mine = [{"samples_per_s": 1000.0, "wall_s": 5.0, "peak_rss_sum_mib": 900.0, "peak_pss_sum_mib": 600.0,
             "accuracy": 0.95, "processes": 3, "cpu_s": 4.0},
            {"samples_per_s": 2000.0, "wall_s": 4.0, "peak_rss_sum_mib": 900.0, "peak_pss_sum_mib": 600.0,
             "accuracy": 0.95, "processes": 3, "cpu_s": 4.0}]
    theirs = [{"samples_per_s": 100.0, "wall_s": 50.0, "peak_rss_sum_mib": 7000.0, "peak_pss_sum_mib": 3900.0,
               "accuracy": 0.9472, "processes": 15, "test_rows": 359, "cpu_s": 40.0},
              {"error": "SecretFlow exited 1: boom"}]
    (row,) = sfc.summarise("vanilla", {"M=4 1f1b": mine}, theirs)
    assert row["per_round_speedup"] == [10.0]  # the failed round pairs with nothing
    assert row["speedup_samples_per_s"] == pytest.approx(10.0)  # from the one round with both sides
    assert row["ratio_of_median_samples_per_s"] == pytest.approx(15.0)  # median 1500 against 100: not quoted
    assert row["speedup_wall"] == pytest.approx(10.0) and row["cpu_ratio"] == pytest.approx(10.0)
    assert row["accuracy_gap_held_out_samples"] == pytest.approx(1.0, abs=0.05)
    assert row["errors"] == ["SecretFlow exited 1: boom"]
    assert "errors: 1" in sfc.table({"rows": [row], "rounds": 2, "load_avg_1m": None})


@pytest.mark.unit
def test_steady_rate_reads_the_coordinators_commits():
    line = "2026-12-02T10:00:{:06.3f}Z INFO meshsl.coordinator node=lab step committed step={} epoch={} samples_per_s=1.0"
    lines = [line.format(0.5 * i, i, i // 4) for i in range(12)] + ["2026-12-02T10:00:09.000Z INFO other line"]
    # epoch 0 ends at 1.5 s; epochs 1-2 commit 8 steps of 32 samples until 5.5 s
    assert sfc.steady_rate(lines, 32) == pytest.approx(8 * 32 / 4.0)
    assert sfc.steady_rate(lines[:4], 32) is None
