"""Seeded random fault schedules on the 5-party chain and on SplitFed, with real node processes:
every run must end bit-identical to the uninterrupted run, or fail loudly on every party (no
process exits 0, nobody writes final weights). Never a hang, never exit 0 with wrong weights.

    python -m benchmarks.fault_schedules --seeds 0-19 [--out results.json]

A schedule (from its seed): topology, checkpoint interval, victim node, step, and one fault:
`kill` (SIGKILL), `pause` (SIGSTOP for 2-3x the heartbeat timeout, then SIGCONT), `freeze`
(SIGSTOP for good), `disk_full` (the checkpoint file system fills up; needs `mount`)."""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from meshsl.config.loader import load_spec
from meshsl.errors import MeshslError
from meshsl.launch.launcher import LocalRun
from meshsl.topology.model import topology_from_spec

ROOT = Path(__file__).resolve().parent.parent
TOPOLOGIES = {"chain": "multi_hop.yaml", "splitfed": "splitfed.yaml"}
FAULTS = ("kill", "pause", "freeze", "disk_full")
STEPS = 14
RETRY = {"heartbeat_interval_s": 0.2, "heartbeat_timeout_s": 2.0, "timeout_s": 20, "startup_timeout_s": 45,
         "max_restarts": 3}


def schedule(seed: int) -> dict:
    rng = random.Random(seed)
    which = rng.choice(sorted(TOPOLOGIES))
    nodes = {"chain": ["clinic", "relay_1", "relay_2", "relay_3", "lab"],
             "splitfed": ["clinic0", "clinic1", "clinic2", "clinic3", "server"]}[which]
    return {"seed": seed, "topology": which, "every": rng.choice([1, 2, 3]), "fault": rng.choice(FAULTS),
            "victim": rng.choice(nodes), "step": rng.randint(2, STEPS - 4),
            "pause_s": round(rng.uniform(4.0, 6.0), 1)}


def topology_file(tmp: Path, which: str, every: int) -> Path:
    document = yaml.safe_load((ROOT / "topologies" / TOPOLOGIES[which]).read_text())
    document["training"].update(steps=STEPS, eval_every=0)
    document["training"].pop("epochs", None)
    document["checkpoint"] = {"every": every}
    document["retry"] = dict(RETRY)
    for node in document["nodes"]:
        node.pop("metrics_port", None)
    path = tmp / f"{which}-{every}.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def _fill(directory: Path) -> None:
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        for chunk in (1 << 16, 1 << 12, 1):
            try:
                while True:
                    os.write(fd, b"\0" * chunk)
            except OSError:
                pass
    finally:
        os.close(fd)


def run_once(path: Path, run_dir: Path, plan: dict | None, timeout: float = 900.0) -> dict:
    run = LocalRun(path, run_dir, free_ports=True, weights_out=run_dir / "weights", evaluate=False)
    resolved = run.prepare()
    topology = topology_from_spec(load_spec(resolved), str(resolved), path.parent)
    mounted = False
    if plan and plan["fault"] == "disk_full":
        run.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(run.checkpoint_dir)],
                                 capture_output=True).returncode == 0
        if not mounted:
            return {"outcome": "skipped", "why": "cannot mount a tmpfs"}
    fired = threading.Event()

    def fault(launched: LocalRun, row: dict) -> None:
        if not plan or row.get("step") != plan["step"] or fired.is_set():
            return
        fired.set()
        pid = launched.processes[plan["victim"]].pid
        if plan["fault"] == "kill":
            os.kill(pid, signal.SIGKILL)
        elif plan["fault"] in ("pause", "freeze"):
            os.kill(pid, signal.SIGSTOP)
            if plan["fault"] == "pause":
                threading.Timer(plan["pause_s"], lambda: _signal(pid, signal.SIGCONT)).start()
        elif plan["fault"] == "disk_full":
            _fill(launched.checkpoint_dir)

    run.on_progress = lambda row: fault(run, row)
    started = time.monotonic()
    result: dict = {}
    try:
        run.start(topology, resolved)
        try:
            summary = run.follow(topology, timeout=timeout)
            result.update(ended="ok", failovers=summary.get("failovers"),
                          causes=[e["cause"] for e in summary.get("failover_events", [])])
        except MeshslError as exc:
            result.update(ended="error", error=str(exc)[:300], hang="did not finish within" in str(exc))
    finally:
        run.stop()
        if mounted:
            subprocess.run(["umount", "-l", str(run.checkpoint_dir)], check=False)
    result["seconds"] = round(time.monotonic() - started, 1)
    result["exit_codes"] = {n: p.returncode for n, p in run.processes.items()}
    result["weights"] = {p.stem: load_file(str(p)) for p in sorted((run_dir / "weights").glob("*.safetensors"))}
    return result


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def same(a: dict, b: dict) -> bool:
    return bool(a) and a.keys() == b.keys() and all(
        a[s].keys() == b[s].keys() and all(torch.equal(a[s][k], b[s][k]) for k in a[s]) for s in a)


def judge(result: dict, reference: dict) -> str:
    if result.get("outcome") == "skipped":
        return "skipped"
    if result["ended"] == "ok":
        return "identical" if same(result["weights"], reference) else "WRONG_WEIGHTS"
    if result.get("hang"):
        return "HANG"
    quiet = [n for n, code in result["exit_codes"].items() if code == 0]
    if quiet or result["weights"]:
        return "QUIET_FAILURE"  # some party exited 0 or wrote final weights although the run failed
    return "loud_failure"


def seeds(text: str) -> list[int]:
    if "-" in text:
        low, high = text.split("-")
        return list(range(int(low), int(high) + 1))
    return [int(s) for s in text.split(",")]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0-19")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--startup-timeout", type=float, default=RETRY["startup_timeout_s"],
                        help="retry.startup_timeout_s (a loaded machine starts node processes slowly)")
    parser.add_argument("--round-timeout", type=float, default=RETRY["timeout_s"], help="retry.timeout_s")
    args = parser.parse_args(argv)
    RETRY.update(startup_timeout_s=args.startup_timeout, timeout_s=args.round_timeout)
    tmp = Path(tempfile.mkdtemp(prefix="meshsl-faults-"))
    references: dict = {}
    rows = []
    for seed in seeds(args.seeds):
        plan = schedule(seed)
        path = topology_file(tmp, plan["topology"], plan["every"])
        for attempt in range(3):  # checkpoint interval does not change the weights
            if plan["topology"] in references:
                break
            clean = run_once(path, tmp / f"clean-{plan['topology']}-{attempt}", None)
            if clean["ended"] == "ok":
                references[plan["topology"]] = clean["weights"]
            else:  # no fault: a busy machine (a false loss and a slow restart); it is no verdict on a seed
                print(json.dumps({"reference_failed": plan["topology"], "error": clean.get("error")}), flush=True)
        assert plan["topology"] in references, "no uninterrupted reference run succeeded"
        result = run_once(path, tmp / f"seed-{seed}", plan)
        verdict = judge(result, references[plan["topology"]])
        row = {**plan, "verdict": verdict, **{k: v for k, v in result.items() if k != "weights"}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    counts: dict = {}
    for row in rows:
        counts[row["verdict"]] = counts.get(row["verdict"], 0) + 1
    bad = [r["seed"] for r in rows if r["verdict"] in ("WRONG_WEIGHTS", "HANG", "QUIET_FAILURE")]
    summary = {"schedules": len(rows), "verdicts": counts, "bad_seeds": bad}
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.write_text(json.dumps({"summary": summary, "runs": rows}, indent=2, default=str))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
