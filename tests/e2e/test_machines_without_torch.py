"""The I/O-free state machines import without torch (issue 30): they are rules, not compute, and a newcomer
reading or testing them should not wait 3 s for torch. Each import runs in a fresh interpreter."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# every module of meshsl/machines/, plus the typed control messages and the sites' job board they exchange
MACHINES = sorted(f"meshsl.machines.{p.stem}" for p in (ROOT / "meshsl" / "machines").glob("*.py")
                  if p.stem != "__init__") + ["meshsl.protocol.control", "meshsl.apps.sites.board"]


@pytest.mark.unit
@pytest.mark.parametrize("module", MACHINES)
def test_a_state_machine_imports_without_torch(module):
    probe = f"import sys, {module}; print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"{module} pulls in torch"
