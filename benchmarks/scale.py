"""Scale: hops (real node processes) and clients (SplitFed, every logical node hosted in one process over
the in-process transport: `meshsl.launch.simulate.simulate`). `python -m benchmarks.scale sim --clients N`
runs one simulation and prints a JSON line (a fresh process, so its peak RSS is its own).

On Ray (`meshsl.launch.ray_engine`): `python -m benchmarks.scale ray --clients N` starts a two-raylet
Ray cluster on this machine (one CPU each), runs the same SplitFed simulation with the clients' logical
nodes on one actor and the server on the other (every client message crosses the ZeroMQ link), stops
the cluster and prints a JSON line (full mode of the runner: 300 clients, next to the in-process row
of the same size). `python -m benchmarks.scale big --clients 10000` runs both."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import chain_document, run_processes, run_python, self_peak_rss_mib, splitfed_document, \
    topology_from_document


def _document(clients: int, steps: int) -> dict:
    document = splitfed_document(clients, steps=steps)
    if clients >= 2000:
        # One event loop hosting thousands of nodes on a loaded 2-core machine answers heartbeats late;
        # liveness at the defaults (1 s interval, 5 s timeout) would declare healthy nodes lost and
        # re-announce storms would follow. A simulation has no network to watch: relax it.
        document["retry"] = {"heartbeat_interval_s": 30, "heartbeat_timeout_s": 900, "timeout_s": 900,
                             "startup_timeout_s": 1800}
    return document


def simulate_splitfed(clients: int, steps: int) -> dict:
    from meshsl.coordinator.runtime import RunOptions
    from meshsl.launch.simulate import simulate
    started = time.perf_counter()
    topology = topology_from_document(_document(clients, steps))
    built = time.perf_counter()
    # Building 10,000 nodes on a loaded 2-core machine takes minutes: wait for them, not the default 60 s.
    summary, runtimes = asyncio.run(simulate(topology, RunOptions(evaluate=False, startup_timeout_s=1800)))
    wall = time.perf_counter() - started
    return {"clients": clients, "logical_nodes": len(runtimes), "steps": summary["steps"],
            "samples_per_s": summary["samples_per_s"], "wall_s": wall, "topology_s": built - started,
            "peak_rss_mib": self_peak_rss_mib(), "loss": summary["tasks"]["cls"]["train"].get("loss")}


@contextlib.contextmanager
def two_raylets(cpus_each: int = 1):
    """A local Ray cluster: `ray start --head` plus a second raylet; yields its address; `ray stop` after."""
    ray_cli = str(Path(sys.executable).parent / "ray")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0",
               PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent),
                                                         os.environ.get("PYTHONPATH")])))
    common = ["--num-cpus", str(cpus_each), "--disable-usage-stats"]
    subprocess.run([ray_cli, "start", "--head", "--port", str(port), "--include-dashboard=false", *common], env=env,
                   check=True, capture_output=True, timeout=300)
    try:
        subprocess.run([ray_cli, "start", "--address", f"127.0.0.1:{port}", *common], env=env, check=True,
                       capture_output=True, timeout=300)
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([ray_cli, "stop", "--force"], env=env, capture_output=True, timeout=300)


def simulate_splitfed_on_ray(clients: int, steps: int, address: str) -> dict:
    """The `sim` case on a Ray cluster: clients' nodes on one actor, the server on another (1 CPU each)."""
    from meshsl.coordinator.runtime import RunOptions
    from meshsl.launch.ray_engine import simulate_on_ray
    started = time.perf_counter()
    document = _document(clients, steps)
    for node in document["nodes"]:
        node["ray"] = {"num_cpus": 1}
    document["ray"] = {"placement": "STRICT_SPREAD", "ready_timeout_s": 600}
    topology = topology_from_document(document)
    built = time.perf_counter()
    result = simulate_on_ray(topology, document, RunOptions(evaluate=False, startup_timeout_s=1800), address=address,
                             timeout=3600)
    summary = result["summary"]
    return {"clients": clients, "engine": "ray (2 raylets)", "logical_nodes": sum(a["nodes"] for a in result["actors"]),
            "steps": summary["steps"], "samples_per_s": summary["samples_per_s"],
            "wall_s": time.perf_counter() - started, "topology_s": built - started,
            "raylets_used": len({a["ray_node"] for a in result["actors"]}),
            "actors": [{k: a[k] for k in ("name", "nodes", "wall_s", "peak_rss_mib")} for a in result["actors"]],
            "driver_peak_rss_mib": self_peak_rss_mib(), "loss": summary["tasks"]["cls"]["train"].get("loss")}


def measure(quick: bool = False, smoke: bool = False) -> dict:
    """`smoke`: 2 hops for 3 steps of a 32-wide chain, 4 simulated clients for 2 steps in this process, no
    larger count, no Ray (does it still run?)."""
    hops = [2] if smoke else [2, 4] if quick else [2, 4, 6, 8]
    steps, warm = (3, 1) if smoke else (6, 2) if quick else (16, 4)
    width, batch = (32, 32) if smoke else (256, 128)
    hop_rows = []
    for n in hops:
        doc = chain_document(n, 4, "1f1b", steps=steps, width=width, layers_per_stage=1, batch_size=batch,
                             num_samples=2048)
        result = run_processes(doc, warmup_steps=warm)
        rss = result["peak_rss_mib"]
        hop_rows.append({"hops": n, "samples_per_s": result["samples_per_s"],
                         "peak_rss_mib_max_node": max(rss.values()) if rss else 0.0,
                         "peak_rss_mib_total": sum(rss.values())})
    for row in hop_rows:
        row["relative_to_2_hops"] = row["samples_per_s"] / hop_rows[0]["samples_per_s"]
    # Small counts: 4 steps; large ones: 2 steps (one FedAvg round). Quick: about 20 s in all on 2 cores.
    client_counts = [1] if quick else [1, 8, 64]
    client_rows = [simulate_splitfed(4, 2)] if smoke else \
        [run_python("benchmarks.scale", ["sim", "--clients", str(c), "--steps", "4"], timeout=300) for c in client_counts]
    for big, limit in ([] if smoke else [(200, 90)] if quick else [(100, 120), (300, 150), (1000, 240)]):
        try:
            client_rows.append(run_python("benchmarks.scale", ["sim", "--clients", str(big), "--steps", "2"],
                                          timeout=limit))
        except Exception as exc:  # noqa: BLE001 - reported in the table, the suite goes on
            client_rows.append({"clients": big, "error": f"did not finish within {limit}s ({type(exc).__name__})"})
    ray_rows = []
    try:
        import ray  # noqa: F401
    except ImportError:
        ray_rows.append({"clients": 0, "error": "ray not installed (pip install 'meshsl[ray]')"})
    else:
        if not quick and not smoke:
            try:
                ray_rows.append(run_python("benchmarks.scale", ["ray", "--clients", "300", "--steps", "2"], timeout=600))
            except Exception as exc:  # noqa: BLE001 - reported in the table, the suite goes on
                ray_rows.append({"clients": 300, "error": f"{type(exc).__name__}: {str(exc)[-300:]}"})
    return {"hops": hop_rows, "clients_simulated": client_rows, "clients_on_ray": ray_rows}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["sim", "ray", "big"])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--address", help="ray: an already running cluster instead of a fresh two-raylet one")
    args = parser.parse_args()
    if args.mode == "sim":
        print(json.dumps(simulate_splitfed(args.clients, args.steps)))
    elif args.mode == "ray":
        if args.address:
            print(json.dumps(simulate_splitfed_on_ray(args.clients, args.steps, args.address)))
        else:
            with two_raylets() as address:
                print(json.dumps(simulate_splitfed_on_ray(args.clients, args.steps, address)))
    else:  # both engines, one after the other, each in a fresh process
        rows = [run_python("benchmarks.scale", ["sim", "--clients", str(args.clients), "--steps", str(args.steps)],
                           timeout=3600),
                run_python("benchmarks.scale", ["ray", "--clients", str(args.clients), "--steps", str(args.steps)],
                           timeout=3600)]
        print(json.dumps({"clients": args.clients, "load_avg_1m": os.getloadavg()[0], "runs": rows}))
