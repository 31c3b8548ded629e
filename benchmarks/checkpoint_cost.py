"""What failover-by-default costs: ms per training step with checkpoints every 10 steps (the `meshsl
run` default), every step, and never, with real node processes (rounds interleaved, medians).

    python -m benchmarks.checkpoint_cost [--rounds 3] [--steps 80] [--topologies vanilla.yaml multi_hop.yaml]

Prints one JSON line per run and a summary: ms/step per setting and the ratio to no checkpoints."""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import yaml

import tempfile
import time

from meshsl.launch.launcher import LocalRun
from meshsl.topology.model import load_topology

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {"never": 0, "every_10": 10, "every_step": 1}


def document(name: str, steps: int, every: int) -> dict:
    doc = yaml.safe_load((ROOT / "topologies" / name).read_text())
    doc["training"].update(steps=steps, eval_every=0)
    doc["checkpoint"] = {"every": every}
    for node in doc["nodes"]:
        node.pop("metrics_port", None)
    for data in doc.get("data", []):  # data paths are relative to topologies/
        path = data.get("dataset", {}).get("path")
        if path and not Path(path).is_absolute():
            data["dataset"]["path"] = str((ROOT / "topologies" / path).resolve())
    return doc


def ms_per_step(doc: dict, warmup_steps: int = 5, timeout: float = 900.0) -> float:
    """Steady-state wall time per committed step, from the coordinator's progress rows."""
    with tempfile.TemporaryDirectory(prefix="meshsl-bench-") as tmp:
        path = Path(tmp) / "topology.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        launcher = LocalRun(path, Path(tmp) / "run", free_ports=True, evaluate=False)
        resolved = launcher.prepare()
        topology = load_topology(resolved)
        stamps: list[float] = []
        launcher.on_progress = lambda row: stamps.append(time.perf_counter()) if "step" in row and not row.get("event") else None
        launcher.start(topology, resolved)
        try:
            launcher.follow(topology, timeout)
        finally:
            launcher.stop()
    steady = stamps[warmup_steps:]
    return 1000.0 * (steady[-1] - steady[0]) / (len(steady) - 1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--topologies", nargs="+", default=["vanilla.yaml", "multi_hop.yaml"])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    per_step: dict = {}
    for round_ in range(args.rounds):
        for name in args.topologies:
            for setting, every in SETTINGS.items():
                doc = document(name, args.steps, every)
                ms = ms_per_step(doc)
                per_step.setdefault(name, {}).setdefault(setting, []).append(ms)
                print(json.dumps({"round": round_, "topology": name, "checkpoint": setting,
                                  "ms_per_step": round(ms, 2)}), flush=True)
    summary = {}
    for name, settings in per_step.items():
        base = statistics.median(settings["never"])
        summary[name] = {s: {"median_ms_per_step": round(statistics.median(v), 2),
                             "ratio_to_never": round(statistics.median(v) / base, 3)} for s, v in settings.items()}
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.write_text(json.dumps({"summary": summary, "runs": per_step}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
