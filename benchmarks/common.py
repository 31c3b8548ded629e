"""Shared helpers: generated topologies, running meshsl nodes as real processes, peak RSS, timing."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

import yaml

ROOT = Path(__file__).resolve().parent.parent


def mlp_stages(stages: int, width: int = 1024, layers_per_stage: int = 2, in_dim: int = 784,
               classes: int = 10) -> list[list]:
    """Layer lists of an MLP cut into `stages` equal-cost stages (each `layers_per_stage` Linear(width) + ReLU;
    the first takes `in_dim` inputs, the last ends with a Linear to `classes`)."""
    out = []
    for s in range(stages):
        layers = []
        for k in range(layers_per_stage):
            fan_in = in_dim if (s == 0 and k == 0) else width
            layers += [["Linear", fan_in, width], ["ReLU"]]
        if s == stages - 1:
            layers.append(["Linear", width, classes])
        out.append(layers)
    return out


def chain_document(stages: int, micro_batches: int, schedule: str = "gpipe", steps: int = 20,
                   batch_size: int = 256, width: int = 1024, layers_per_stage: int = 2, in_dim: int = 784,
                   threads: int = 1, num_samples: int = 4096, name: str = "bench-chain") -> dict:
    """A `stages`-node chain, one segment per node, synthetic data on the first, labels on the last."""
    layer_lists = mlp_stages(stages, width, layers_per_stage, in_dim)
    nodes = [{"name": f"n{i}", "endpoint": f"tcp://127.0.0.1:{7100 + i}", "party": f"p{i}", "threads": threads}
             for i in range(stages)]
    synthetic = {"name": "synthetic", "options": {"shape": [in_dim], "num_samples": num_samples, "num_classes": 10}}
    segments = [{"name": f"s{i}", "node": f"n{i}", "inputs": ["x" if i == 0 else f"s{i - 1}"], "layers": layers}
                for i, layers in enumerate(layer_lists)]
    return {
        "name": name,
        "nodes": nodes,
        "data": [{"name": "x", "node": "n0", "dataset": synthetic},
                 {"name": "y", "node": f"n{stages - 1}", "dataset": synthetic, "kind": "labels"}],
        "segments": segments,
        "tasks": [{"name": "cls", "output": f"s{stages - 1}", "labels": "y"}],
        "training": {"steps": steps, "batch_size": batch_size, "micro_batches": micro_batches,
                     "schedule": schedule, "optimizer": {"name": "sgd", "lr": 0.01}, "seed": 0},
    }


def splitfed_document(clients: int, steps: int = 4, batch_size: int = 16, micro_batches: int = 1,
                      hidden: int = 64, num_samples: Optional[int] = None, average_every: int = 2,
                      name: str = "bench-splitfed") -> dict:
    """SplitFed: `clients` replicated client nodes (bottom segment) against one server (top + labels)."""
    n = num_samples or max(2048, clients * batch_size * 2)
    synthetic = {"name": "synthetic", "options": {"shape": [32], "num_samples": n, "num_classes": 10}}
    return {
        "name": name,
        "nodes": [{"name": "client", "endpoint": "tcp://127.0.0.1:7300", "party": "client"},
                  {"name": "server", "endpoint": "tcp://127.0.0.1:7299", "party": "server"}],
        "clients": {"count": clients, "replicate": ["client"], "mode": "splitfed", "average_every": average_every,
                    "partition": {"kind": "iid"}},
        "data": [{"name": "x", "node": "client", "dataset": synthetic},
                 {"name": "y", "node": "server", "dataset": synthetic, "kind": "labels"}],
        "segments": [
            {"name": "bottom", "node": "client", "inputs": ["x"], "layers": [["Linear", 32, hidden], ["ReLU"]]},
            {"name": "top", "node": "server", "inputs": ["bottom"],
             "layers": [["Linear", hidden, hidden], ["ReLU"], ["Linear", hidden, 10]]}],
        "tasks": [{"name": "cls", "output": "top", "labels": "y"}],
        "training": {"steps": steps, "batch_size": batch_size, "micro_batches": micro_batches, "schedule": "1f1b",
                     "optimizer": {"name": "sgd", "lr": 0.05}, "seed": 0},
    }


def topology_from_document(document: dict, base_dir: Path = ROOT):
    from meshsl.config.loader import parse_spec
    from meshsl.topology.model import topology_from_spec
    return topology_from_spec(parse_spec(document), "<bench>", base_dir)


class PeakRss:
    """Polls VmHWM (peak resident set) of a set of live processes; keeps the last value seen per name."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.pids: dict[str, int] = {}
        self.peak_kib: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> "PeakRss":
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            for name, pid in list(self.pids.items()):
                kib = read_hwm_kib(pid)
                if kib:
                    self.peak_kib[name] = max(self.peak_kib.get(name, 0), kib)
            self._stop.wait(self.interval)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join(timeout=2)
        return {n: round(k / 1024, 1) for n, k in self.peak_kib.items()}


def kill_left(procs: dict) -> None:
    """Kill and reap the processes (of a dict name -> Popen) still running, e.g. after an error."""
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def read_hwm_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def self_peak_rss_mib() -> float:
    return round(read_hwm_kib(os.getpid()) / 1024, 1)


def run_processes(document: dict, warmup_steps: int, timeout: float = 240.0) -> dict:
    """Run `document` with one OS process per node (meshsl's launcher, real ZeroMQ on loopback).

    Steady-state samples/s is measured from the coordinator's per-step progress rows after `warmup_steps`;
    peak RSS per node is polled from /proc."""
    from meshsl.launch.launcher import LocalRun
    from meshsl.topology.model import load_topology

    with tempfile.TemporaryDirectory(prefix="meshsl-bench-") as tmp:
        path = Path(tmp) / "topology.yaml"
        path.write_text(yaml.safe_dump(document, sort_keys=False))
        launcher = LocalRun(path, Path(tmp) / "run", free_ports=True, evaluate=False)
        resolved = launcher.prepare()
        topology = load_topology(resolved)
        stamps: list[tuple[float, int]] = []

        def on_progress(row: dict) -> None:
            if "step" in row and not row.get("event"):
                stamps.append((time.perf_counter(), row["step"]))

        launcher.on_progress = on_progress
        rss = PeakRss().start()
        launcher.start(topology, resolved)
        for name, proc in launcher.processes.items():
            rss.pids[name] = proc.pid
        try:
            summary = launcher.follow(topology, timeout)
        finally:
            peaks = rss.stop()
            launcher.stop()
    batch = document["training"]["batch_size"] * (document.get("clients") or {}).get("count", 1)
    steady = stamps[warmup_steps:]
    if len(steady) >= 2:
        rate = (len(steady) - 1) * batch / (steady[-1][0] - steady[0][0])
    else:
        rate = summary.get("samples_per_s", 0.0)
    return {"samples_per_s": rate, "peak_rss_mib": peaks, "steps": len(stamps),
            "loss": summary["tasks"]["cls"]["train"].get("loss")}


def run_python(module: str, args: list[str], timeout: float = 300.0, env: Optional[dict] = None) -> dict:
    """Run `python -m module args` in a fresh process; it prints one JSON line last."""
    full_env = dict(os.environ, **(env or {}))
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{module} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def median(values) -> float:
    return statistics.median(values) if values else 0.0
