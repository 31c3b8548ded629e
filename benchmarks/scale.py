"""Scale: hops (real node processes) and clients (SplitFed, every logical node hosted in one process over
the in-process transport: `meshsl.runtime.simulate.simulate`). `python -m benchmarks.scale sim --clients N`
runs one simulation and prints a JSON line (a fresh process, so its peak RSS is its own)."""
from __future__ import annotations

import argparse
import asyncio
import json
import time

from benchmarks.common import chain_document, run_processes, run_python, self_peak_rss_mib, splitfed_document, \
    topology_from_document


def simulate_splitfed(clients: int, steps: int) -> dict:
    from meshsl.runtime.coordinator import RunOptions
    from meshsl.runtime.simulate import simulate
    started = time.perf_counter()
    topology = topology_from_document(splitfed_document(clients, steps=steps))
    built = time.perf_counter()
    # Building 10,000 nodes on a loaded 2-core machine takes minutes: wait for them, not the default 60 s.
    summary, runtimes = asyncio.run(simulate(topology, RunOptions(evaluate=False, startup_timeout_s=1800)))
    wall = time.perf_counter() - started
    return {"clients": clients, "logical_nodes": len(runtimes), "steps": summary["steps"],
            "samples_per_s": summary["samples_per_s"], "wall_s": wall, "topology_s": built - started,
            "peak_rss_mib": self_peak_rss_mib(), "loss": summary["tasks"]["cls"]["train"].get("loss")}


def measure(quick: bool = False) -> dict:
    hops = [2, 4] if quick else [2, 4, 6, 8]
    steps, warm = (6, 2) if quick else (16, 4)
    hop_rows = []
    for n in hops:
        doc = chain_document(n, 4, "1f1b", steps=steps, width=256, layers_per_stage=1, batch_size=128,
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
    client_rows = [run_python("benchmarks.scale", ["sim", "--clients", str(c), "--steps", "4"], timeout=300)
                   for c in client_counts]
    for big, limit in ([(200, 90)] if quick else [(100, 120), (300, 150), (1000, 240)]):
        try:
            client_rows.append(run_python("benchmarks.scale", ["sim", "--clients", str(big), "--steps", "2"],
                                          timeout=limit))
        except Exception as exc:  # noqa: BLE001 - reported in the table, the suite goes on
            client_rows.append({"clients": big, "error": f"did not finish within {limit}s ({type(exc).__name__})"})
    return {"hops": hop_rows, "clients_simulated": client_rows}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["sim"])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    print(json.dumps(simulate_splitfed(args.clients, args.steps)))
