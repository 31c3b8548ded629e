"""Where memory goes with many simulated SplitFed clients (benchmarks/scale.py's topology, 2 steps).

    python -m benchmarks.clients_memory rss --clients 1000            # peak RSS of one simulation (JSON line)
    python -m benchmarks.clients_memory lines --clients 200 400       # tracemalloc, line by line, per count

`lines` runs one fresh process per count and prints, for every source line among the largest, what
the nodes hold after the run at each count and the growth factor between the last two: doubling the
clients quadruples a line that grows with their square. `--share-address-book` patches every
transport to use the simulation's address book instead of its own copy (the experiment in
docs/performance.md). Liveness is relaxed as in scale.py's large runs, so a loaded machine does not
turn late heartbeats into re-announcement storms.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import subprocess
import sys
import tracemalloc

from benchmarks.common import ROOT, self_peak_rss_mib, splitfed_document, topology_from_document

RELAXED = {"heartbeat_interval_s": 30, "heartbeat_timeout_s": 900, "timeout_s": 900, "startup_timeout_s": 1800}


def _share_address_book() -> None:
    from meshsl.transport import base

    def init(self, node, endpoint, address_book):
        self.node, self.endpoint, self.address_book = node, endpoint, address_book

    base.Transport.__init__ = init


def simulate(clients: int, trace: bool) -> dict:
    from meshsl.coordinator.runtime import RunOptions
    from meshsl.launch.simulate import simulate as run_all
    if trace:
        tracemalloc.start(1)
    document = dict(splitfed_document(clients, steps=2), retry=RELAXED)
    topology = topology_from_document(document)
    before = tracemalloc.take_snapshot() if trace else None
    summary, runtimes = asyncio.run(run_all(topology, RunOptions(evaluate=False, startup_timeout_s=1800)))
    row = {"clients": clients, "logical_nodes": len(runtimes), "peak_rss_mib": self_peak_rss_mib(),
           "loss": summary["tasks"]["cls"]["train"].get("loss")}
    if trace:  # what the nodes still hold (the runtimes are alive), minus topology and imports
        gc.collect()
        stats = tracemalloc.take_snapshot().compare_to(before, "lineno")
        row["lines"] = {str(s.traceback[0]): s.size_diff for s in stats[:60] if s.size_diff > 0}
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.clients_memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["rss", "lines", "one"])
    parser.add_argument("--clients", type=int, nargs="+", default=[200, 400])
    parser.add_argument("--share-address-book", action="store_true")
    args = parser.parse_args(argv)
    if args.share_address_book:
        _share_address_book()
    if args.mode in ("rss", "one"):
        print(json.dumps(simulate(args.clients[0], trace=args.mode == "one")))
        return 0
    rows = []
    for count in args.clients:
        cmd = [sys.executable, "-m", "benchmarks.clients_memory", "one", "--clients", str(count)]
        cmd += ["--share-address-book"] if args.share_address_book else []
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    last, prev = rows[-1]["lines"], rows[-2]["lines"] if len(rows) > 1 else {}
    print("KiB at " + " / ".join(str(r["clients"]) for r in rows) + " clients | growth | line")
    for line, size in sorted(last.items(), key=lambda item: -item[1])[:20]:
        sizes = " / ".join(f"{r['lines'].get(line, 0) / 1024:,.0f}" for r in rows)
        growth = f"{size / prev[line]:.1f}x" if prev.get(line) else "-"
        print(f"{sizes} | {growth} | {line}")
    print(json.dumps([{k: v for k, v in r.items() if k != "lines"} for r in rows]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
