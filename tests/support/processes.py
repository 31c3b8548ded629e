"""Training with real node processes, for the chaos, failover and dropout tests: a small topology with
fast heartbeats, a run whose progress stream can kill or pause nodes, and the final weights compared.

Imported as `support.processes` (tests/ is on the path: [tool.pytest] pythonpath)."""
from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Callable, Optional

import torch
import yaml
from safetensors.torch import load_file

from meshsl.config.loader import load_spec
from meshsl.launch.launcher import LocalRun
from meshsl.topology.model import topology_from_spec

ROOT = Path(__file__).resolve().parents[2]
TOPOLOGIES = ROOT / "topologies"

Fault = Callable[[LocalRun, dict], None]  # called with every progress row

# The launcher tells the coordinator at once when a node's process ends (launcher.ExitReports), so a test
# of killed processes needs no heartbeat detection: with this timeout, which no load on a CI machine
# reaches, no healthy node is ever declared lost and failover counts are exactly those of the faults.
NO_HEARTBEAT_DETECTION = {"heartbeat_timeout_s": 60.0}


def chaos_topology(tmp_path: Path, name: str = "vanilla.yaml", every: int = 1, standby: bool = False,
                   steps: int = 16, **retry) -> Path:
    """An example topology cut to `steps`, checkpointing every `every` steps, with fast failure detection;
    `standby`: every node declares a standby endpoint (rewritten to a free port)."""
    document = yaml.safe_load((TOPOLOGIES / name).read_text())
    document["training"]["steps"] = steps
    document["training"]["eval_every"] = 0
    document["checkpoint"] = {"every": every}
    # A restarted process imports torch: at load average 30 on two cores that took 33-54 s this session.
    document["retry"] = {"heartbeat_interval_s": 0.2, "heartbeat_timeout_s": 2.0, "timeout_s": 20,
                         "startup_timeout_s": 120, "max_restarts": 3, **retry}
    for node in document["nodes"]:
        node.pop("metrics_port", None)
        if standby:
            node["standby"] = [node["endpoint"].rsplit(":", 1)[0] + ":1"]  # rewritten to a free port
    path = tmp_path / name
    path.write_text(yaml.safe_dump(document))
    return path


def train(path: Path, run_dir: Path, fault: Optional[Fault] = None, warm_standby: bool = False,
          runs: Optional[list] = None, timeout: float = 240, exit_reports: bool = True) -> tuple[dict, LocalRun]:
    """Run with real node processes; `fault(launcher, row)` may kill or pause nodes from the progress
    stream; `runs` receives the launcher before it starts (to inspect it after a failure); `exit_reports`:
    the launcher tells the coordinator when a process ends (off: it learns from the replacement's hello)."""
    run = LocalRun(path, run_dir, free_ports=True, weights_out=run_dir / "weights", evaluate=False,
                   warm_standby=warm_standby, exit_reports=exit_reports)
    if runs is not None:
        runs.append(run)
    resolved = run.prepare()
    topology = topology_from_spec(load_spec(resolved), str(resolved), path.parent)
    if fault:
        run.on_progress = lambda row: fault(run, row)
    run.start(topology, resolved)
    try:
        return run.follow(topology, timeout=timeout), run
    finally:
        run.stop()


def kill_at(node: str, step: int, sig=signal.SIGKILL, skip_events: bool = False) -> Fault:
    """A fault that sends `sig` to `node` once, at the first progress row of `step`;
    `skip_events`: only at a step's row, not at an event row (a drop, a failover) naming that step."""
    fired = threading.Event()

    def fault(run: LocalRun, row: dict) -> None:
        if row.get("step") == step and not (skip_events and "event" in row) and not fired.is_set():
            fired.set()
            os.kill(run.processes[node].pid, sig)
    return fault


def saved_weights(run_dir: Path) -> dict:
    """{weights file stem: state dict} the nodes wrote at the end of a run."""
    return {p.stem: load_file(str(p)) for p in sorted((run_dir / "weights").glob("*.safetensors"))}


def assert_same_weights(got: dict, want: dict) -> None:
    """Bit-identical: the same files, the same tensors in each."""
    assert got.keys() == want.keys() and got
    for stem in want:
        assert got[stem].keys() == want[stem].keys(), stem
        for key in want[stem]:
            assert torch.equal(got[stem][key], want[stem][key]), f"{stem}.{key} differs"
