"""mypy over meshsl/ ([tool.mypy] in pyproject.toml): the whole package, and the I/O-free machines and the
control/envelope wire format with --strict's flags. A finding fails the suite with mypy's own report; a
planted type error in a machine shows the check is live."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.unit


def _mypy(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    mypy = shutil.which("mypy") or str(Path(sys.executable).parent / "mypy")
    return subprocess.run([mypy, "--no-error-summary", *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_mypy_finds_nothing():
    done = _mypy()
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_strict_machines_refuse_an_unannotated_function(tmp_path):
    """The strict override is in force: a machine module with an unannotated function fails."""
    planted = tmp_path / "meshsl" / "machines"
    planted.mkdir(parents=True)
    (tmp_path / "meshsl" / "__init__.py").write_text("")
    (planted / "__init__.py").write_text("")
    (planted / "probe.py").write_text("def rule(event):\n    return event\n")
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    done = _mypy("meshsl/machines/probe.py", cwd=tmp_path)
    assert done.returncode != 0 and "no-untyped-def" in done.stdout, done.stdout + done.stderr
