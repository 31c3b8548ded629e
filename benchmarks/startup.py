"""Start-up: `meshsl node` process start -> first training step begun, per node, on vanilla.yaml.

End to end: both nodes of topologies/vanilla.yaml start at once as `python -m meshsl node NAME` (the
command `meshsl run` and the failover launcher use); a node's figure is the time from just before its
`Popen` to its "round begins" log line for the first training round (DEBUG log, millisecond stamps).
That includes waiting for the slower peer, as a real start does.

Breakdown (`python -m benchmarks.startup breakdown`, a fresh process doing what a node does before its
first step, stamping each phase): interpreter start, `import torch`, meshsl's command-line imports,
loading and checking the topology (shape inference runs every segment on two samples), building the
node (modules, optimizers, data), the first optimizer step, and whether `torch._dynamo` got imported.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.common import ROOT, median

TOPOLOGY = ROOT / "topologies" / "vanilla.yaml"


def _first_round_begun(log: Path) -> float | None:
    """Epoch seconds of the node's first training round (its DEBUG "round begins ... phase=train" line)."""
    for line in log.read_text(errors="replace").splitlines():
        if "round begins" in line and "phase=train" in line:
            stamp = line.split(" ", 1)[0].rstrip("Z")
            return datetime.fromisoformat(stamp).replace(tzinfo=timezone.utc).timestamp()
    return None


# The same command with torch._dynamo and rich imported first: what a node paid before they were avoided.
WITH_DYNAMO = ["-c", "import sys, runpy, torch._dynamo, rich.console, rich.table; "
                     "runpy.run_module('meshsl', run_name='__main__', alter_sys=True)"]


def node_processes(steps: int = 2, timeout: float = 120.0, topology: Path = TOPOLOGY, with_dynamo: bool = False) -> dict:
    """Start every node of `topology` as its own `meshsl node` process at once; seconds to first step each.
    `with_dynamo`: import torch._dynamo and rich first (the start-up before this change, for comparison)."""
    from meshsl.launch.launcher import LocalRun
    from meshsl.topology.model import load_topology

    with tempfile.TemporaryDirectory(prefix="meshsl-startup-") as tmp:
        run = LocalRun(topology, Path(tmp), free_ports=True, evaluate=False, steps=steps, log_level="DEBUG")
        resolved = run.prepare()
        topo = load_topology(resolved)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        started, procs = {}, {}
        for name in topo.nodes:
            cmd = run.command(resolved, name, name == topo.coordinator)
            if with_dynamo:  # [python, -m, meshsl, args...] -> [python, -c, <pre-import + run meshsl>, args...]
                cmd = [cmd[0], *WITH_DYNAMO, *cmd[3:]]
            log = open(Path(tmp) / f"{name}.log", "wb")
            started[name] = time.time()
            procs[name] = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)
            log.close()
        deadline = time.monotonic() + timeout
        for name, proc in procs.items():
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                for p in procs.values():
                    p.kill()
                raise RuntimeError(f"node {name} did not finish within {timeout:.0f}s") from None
        ended = time.time()
        out = {}
        for name, proc in procs.items():
            log = Path(tmp) / f"{name}.log"
            begun = _first_round_begun(log)
            if proc.returncode != 0 or begun is None:
                raise RuntimeError(f"node {name} exited {proc.returncode}: {log.read_text()[-1500:]}")
            out[name] = round(begun - started[name], 3)
        return {"first_step_s": out, "whole_run_s": round(ended - min(started.values()), 3)}


def breakdown(started: float, node: str = "server") -> dict:
    """What a node does before its first step, phase by phase (this process; `started`: parent's time.time()
    just before starting it)."""
    phases = {"interpreter": time.time() - started}
    t = time.perf_counter()

    def stamp(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        phases[name] = now - t
        t = now

    import torch  # noqa: F401
    stamp("import torch")
    import meshsl.cli  # noqa: F401  (what `python -m meshsl` imports before running a command)
    from meshsl.launch.entry import run_node  # noqa: F401
    stamp("import meshsl (cli, runtime)")
    from meshsl.topology.model import load_topology
    topology = load_topology(TOPOLOGY)
    stamp("load + check topology")
    from meshsl.compute.worker import SegmentWorker
    worker = SegmentWorker(topology, node)
    stamp("build node (modules, optimizers, data)")
    for module in worker.modules.values():
        for p in module.parameters():
            p.grad = torch.zeros_like(p)
    worker.apply_optimizer()
    stamp("first optimizer step")
    phases["total"] = time.time() - started
    return {"phases_s": {k: round(v, 3) for k, v in phases.items()},
            "torch_dynamo_imported": "torch._dynamo" in sys.modules,
            "sklearn_imported": "sklearn" in sys.modules}


def _breakdown_process() -> dict:
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.startup", "breakdown", "--started", repr(started)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"breakdown failed: {proc.stderr[-1500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _import_torch_alone() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True, timeout=120)
    return time.perf_counter() - started


def measure(quick: bool = False, smoke: bool = False) -> dict:
    """`smoke`: one run of each measurement but the start-up with torch._dynamo and rich imported first."""
    runs = 1 if quick or smoke else 3
    ends, parts, torch_alone, before = [], [], [], []
    for _ in range(runs):  # alternate the measurements so load swings hit each alike
        ends.append(node_processes())
        if not smoke:
            before.append(node_processes(with_dynamo=True))
        parts.append(_breakdown_process())
        torch_alone.append(_import_torch_alone())
    per_node = {name: median([e["first_step_s"][name] for e in ends]) for name in ends[0]["first_step_s"]}
    # Against `import torch` timed in the same round: what is left beyond torch, whatever the load.
    over_torch = [round(max(e["first_step_s"].values()) / t, 2) for e, t in zip(ends, torch_alone)]
    phases = {name: median([p["phases_s"][name] for p in parts]) for name in parts[0]["phases_s"]}
    return {"runs": runs, "first_step_s": per_node, "first_step_s_runs": [e["first_step_s"] for e in ends],
            "whole_run_s": median([e["whole_run_s"] for e in ends]), "breakdown_s": phases,
            "with_dynamo_and_rich_first_step_s": median([max(b["first_step_s"].values()) for b in before]) if before
            else None,
            "with_dynamo_and_rich_first_step_s_runs": [max(b["first_step_s"].values()) for b in before],
            "python_import_torch_s": median(torch_alone),
            "python_import_torch_s_runs": [round(t, 3) for t in torch_alone],
            "first_step_over_import_torch": median(over_torch), "first_step_over_import_torch_runs": over_torch,
            "torch_dynamo_imported": any(p["torch_dynamo_imported"] for p in parts),
            "sklearn_imported": any(p["sklearn_imported"] for p in parts),
            "load_avg_1m": os.getloadavg()[0]}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["breakdown", "nodes", "measure"])
    parser.add_argument("--started", type=float, default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if args.mode == "breakdown":
        print(json.dumps(breakdown(args.started if args.started is not None else time.time())))
    elif args.mode == "nodes":
        print(json.dumps(node_processes()))
    else:
        print(json.dumps(measure(args.quick, args.smoke), indent=1))
