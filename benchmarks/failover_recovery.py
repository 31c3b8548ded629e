"""Time from SIGKILL of a node to training resuming (median over runs), with real processes.

    python -m benchmarks.failover_recovery --runs 5 [--victim client]
    python -m benchmarks.failover_recovery --topology multi_hop.yaml --victim relay_2 --runs 3 --compare

For each run: the topology with checkpoints every step; the victim is killed right after step 8 is
reported; we time kill -> the coordinator declaring it lost (`nodes_lost`: detection), kill -> the
coordinator's `recovered` event, and kill -> the next training step reported, and check the final
weights equal an uninterrupted run's. `--warm-standby`: `meshsl run --warm-standby` (a waiting process
per node takes over); `--compare`: cold restart and warm standby runs interleaved, a summary for each."""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from meshsl.config.loader import load_spec
from meshsl.launch.launcher import LocalRun
from meshsl.topology.model import topology_from_spec

ROOT = Path(__file__).resolve().parent.parent


def topology(tmp: Path, steps: int, name: str = "vanilla.yaml", every: int = 1, startup_s: float = 30) -> Path:
    document = yaml.safe_load((ROOT / "topologies" / name).read_text())
    document["training"].update(steps=steps, eval_every=0)
    document["checkpoint"] = {"every": every}
    document["training"].pop("epochs", None)
    document["retry"] = {"heartbeat_interval_s": 0.2, "heartbeat_timeout_s": 2.0, "timeout_s": 20,
                         "startup_timeout_s": startup_s, "max_restarts": 3}
    for node in document["nodes"]:
        node.pop("metrics_port", None)
    path = tmp / name
    path.write_text(yaml.safe_dump(document))
    return path


def one_run(path: Path, run_dir: Path, victim: str | None, kill_step: int, warm_standby: bool = False) -> dict:
    run = LocalRun(path, run_dir, free_ports=True, weights_out=run_dir / "weights", evaluate=False,
                   warm_standby=warm_standby)
    resolved = run.prepare()
    topo = topology_from_spec(load_spec(resolved), str(resolved), path.parent)
    marks: dict = {}

    def on_progress(row: dict) -> None:
        now = time.monotonic()
        if victim and row.get("step") == kill_step and "kill" not in marks:
            marks["kill"] = time.monotonic()
            os.kill(run.processes[victim].pid, signal.SIGKILL)
        elif "kill" not in marks:
            return  # (a loss before the kill, e.g. a node starved on a busy machine, is not this one)
        elif row.get("event") == "nodes_lost":
            marks.setdefault("detected", now)
        elif row.get("event") == "recovered":
            marks.setdefault("recovered", now)
            marks.setdefault("coordinator_recovery_s", row.get("seconds"))
        elif "kill" in marks and "step" in row and "resumed" not in marks and row["step"] != kill_step:
            marks["resumed"] = now

    run.on_progress = on_progress
    run.start(topo, resolved)
    try:
        run.follow(topo, timeout=300)
    finally:
        run.stop()
    weights = {p.stem: load_file(str(p)) for p in (run_dir / "weights").glob("*.safetensors")}
    return {"marks": marks, "weights": weights}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--victim", default="client")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--topology", default="vanilla.yaml", help="e.g. multi_hop.yaml --victim relay_2")
    parser.add_argument("--every", type=int, default=1, help="checkpoint interval")
    parser.add_argument("--startup-timeout", type=float, default=30, help="retry.startup_timeout_s (busy machines)")
    parser.add_argument("--warm-standby", action="store_true", help="meshsl run --warm-standby")
    parser.add_argument("--compare", action="store_true", help="cold restart and warm standby, interleaved")
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="meshsl-failover-"))
    path = topology(tmp, args.steps, args.topology, args.every, args.startup_timeout)
    clean = one_run(path, tmp / "clean", None, 0)["weights"]
    modes = [False, True] if args.compare else [args.warm_standby]
    rows = []
    for i in range(args.runs):
        for warm in modes:  # interleaved: load swings hit both alike
            result = one_run(path, tmp / f"chaos{i}-{'warm' if warm else 'cold'}", args.victim, 8, warm)
            identical = all(torch.equal(result["weights"][s][k], clean[s][k]) for s in clean for k in clean[s])
            marks = result["marks"]
            rows.append({"run": i, "warm_standby": warm, "identical_weights": identical,
                         "kill_to_detected_s": marks.get("detected", float("nan")) - marks["kill"],
                         "kill_to_recovered_s": marks.get("recovered", float("nan")) - marks["kill"],
                         "kill_to_next_step_s": marks.get("resumed", float("nan")) - marks["kill"],
                         "detection_to_restored_s": marks.get("coordinator_recovery_s"),
                         "load_avg_1m": round(os.getloadavg()[0], 1)})
            print(json.dumps(rows[-1]), flush=True)
    summary = {"topology": args.topology, "victim": args.victim, "heartbeat_timeout_s": 2.0}
    for warm in modes:
        mine = [r for r in rows if r["warm_standby"] == warm]
        summary["warm_standby" if warm else "cold_restart"] = {
            "runs": len(mine), "all_identical": all(r["identical_weights"] for r in mine),
            **{f"median_{key}": statistics.median(r[key] for r in mine)
               for key in ("kill_to_detected_s", "kill_to_recovered_s", "kill_to_next_step_s")}}
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.write_text(json.dumps({"summary": summary, "runs": rows}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
