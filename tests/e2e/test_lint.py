"""ruff over the code (its correctness rules, [tool.ruff] in pyproject.toml): undefined and unused names,
bugbear, asyncio misuse. A finding fails the suite with ruff's own report."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_ruff_finds_nothing():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    done = subprocess.run([ruff, "check", "--output-format", "concise", "meshsl", "tests", "benchmarks", "examples",
                           "nodes"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
