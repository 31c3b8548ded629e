"""Run every comparison side by side in one run, print a table of ratios, write JSON.

    python -m benchmarks --quick --out runs/bench-quick.json     (< 2 minutes)
    python -m benchmarks --out runs/bench.json                    (< 10 minutes on 2 cores)
    python -m benchmarks --smoke [--only SECTION ...]             (the tiniest sizes: does each section still
                                                                   run? its figures mean nothing; the test suite
                                                                   runs every section so: test_benchmarks_quick.py)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

SECTIONS = ("transport", "pipelining", "scale", "startup", "gpu")
# Run only when named: wan needs root, network namespaces and nft; psi at 10^6 ids takes minutes;
# secretflow needs SecretFlow in its own venv (MESHSL_SECRETFLOW_PYTHON) and takes 10+ minutes.
# bank needs root (namespaces, a memory cgroup) and generates ~30 GB of Parquet in full mode.
# llm needs the llm extra (transformers, peft, tokenizers) and takes ~5 minutes (issue 28).
OPTIONAL = ("wan", "psi", "secretflow", "bank", "llm")
MODULES = {"secretflow": "secretflow_compare"}  # a module named secretflow would shadow the peer's package


def machine() -> dict:
    import torch
    cpu = ""
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.cuda.is_available(), "load_avg_1m_at_start": load}


def table(results: dict) -> str:
    lines = []

    def add(*cols):
        lines.append(" | ".join(str(c) for c in cols))

    fmt = lambda v: f"{v:,.0f}" if isinstance(v, (int, float)) else str(v)
    if "transport" in results:
        add("transport (tcp loopback)", "raw PUSH/PULL MB/s", "raw DEALER/ROUTER MB/s", "meshsl MB/s", "ratio vs raw")
        for r in results["transport"]:
            if "meshsl_MBps" in r:
                add(f"{r['size_bytes'] >> 10} KiB", fmt(r["raw_push_pull_MBps"]), fmt(r["raw_dealer_router_MBps"]),
                    fmt(r["meshsl_MBps"]), f"{r['ratio_vs_push_pull']:.2f} / {r['ratio_vs_dealer_router']:.2f}")
            else:
                add(f"round trip {r['size_bytes'] >> 10} KiB", f"raw {r['raw_rtt_us']:.0f} us", "",
                    f"meshsl {r['meshsl_rtt_us']:.0f} us", f"{r['ratio']:.2f}")
    if "pipelining" in results:
        p = results["pipelining"]
        add("")
        add("pipelining (node processes; median of interleaved runs)", "samples/s", "x M=1", "bubble-only ideal", "x GEMM efficiency",
            "peak RSS MiB/node")
        for r in p["pipelining"]:
            runs = r.get("runs") or []
            spread = f" ({fmt(min(runs))}-{fmt(max(runs))}, {len(runs)} runs)" if len(runs) > 1 else ""
            add(f"{r['stages']} stages M={r['micro_batches']} {r['schedule']}", fmt(r["samples_per_s"]) + spread,
                f"{r['speedup_vs_m1']:.2f}" if r["speedup_vs_m1"] is not None else "-", f"{r['gpipe_ideal']:.2f}",
                f"{r['attainable']:.2f}" if r.get("attainable") else "",
                " ".join(f"{v:.0f}" for v in r["peak_rss_mib"].values()))
        add("micro-batch compute efficiency (1 thread)",
            ", ".join(f"M={m}: {e:.2f}" for m, e in p["micro_batch_efficiency"].items()))
        add("")
        add("vs torch.distributed.pipelining", "meshsl samples/s", "torch samples/s", "ratio")
        for r in p["vs_torch_pipelining"]:
            add(r["case"], fmt(r["meshsl"]), fmt(r["torch_pipelining"]), f"{r['ratio']:.2f}")
        add("")
        add("vs one process (2 threads)", "meshsl 2 nodes samples/s", "one process samples/s", "ratio")
        for r in p["vs_one_process"]:
            add(f"{r['model']} (M={r['micro_batches']})", fmt(r["meshsl_2_nodes"]), fmt(r["one_process_2_threads"]),
                f"{r['ratio']:.2f}")
    if "scale" in results:
        s = results["scale"]
        add("")
        add("hops (node processes)", "samples/s", "x 2 hops", "max RSS MiB/node", "total RSS MiB")
        for r in s["hops"]:
            add(r["hops"], fmt(r["samples_per_s"]), f"{r['relative_to_2_hops']:.2f}",
                fmt(r["peak_rss_mib_max_node"]), fmt(r["peak_rss_mib_total"]))
        add("")
        add("SplitFed clients (one process, simulated)", "logical nodes", "samples/s", "wall s", "peak RSS MiB")
        for r in s["clients_simulated"]:
            if "error" in r:
                add(r["clients"], "", "", "", r["error"])
            else:
                add(r["clients"], r["logical_nodes"], fmt(r["samples_per_s"]), f"{r['wall_s']:.1f}",
                    fmt(r["peak_rss_mib"]))
        for r in s.get("clients_on_ray", []):
            if "error" in r:
                add(f"{r['clients']} on Ray", "", "", "", r["error"])
            else:
                add(f"{r['clients']} on Ray ({r['raylets_used']} raylets)", r["logical_nodes"], fmt(r["samples_per_s"]),
                    f"{r['wall_s']:.1f}", " ".join(f"{a['peak_rss_mib']:.0f}" for a in r["actors"]) + " (per actor)")
    if "startup" in results:
        st = results["startup"]
        add("")
        add(f"start-up, vanilla.yaml (median of {st['runs']})", "s to first step", "all runs")
        for name, value in st["first_step_s"].items():
            add(f"`meshsl node {name}`", f"{value:.2f}", " ".join(f"{r[name]:.2f}" for r in st["first_step_s_runs"]))
        if st["with_dynamo_and_rich_first_step_s"] is not None:  # (not measured in a smoke run)
            add("the same importing torch._dynamo + rich first (as before)",
                f"{st['with_dynamo_and_rich_first_step_s']:.2f}",
                " ".join(f"{v:.2f}" for v in st["with_dynamo_and_rich_first_step_s_runs"]))
        add("breakdown (one process)", ", ".join(f"{k} {v:.2f}" for k, v in st["breakdown_s"].items()))
        add("`python -c 'import torch'` alone", f"{st['python_import_torch_s']:.2f}",
            " ".join(f"{t:.2f}" for t in st.get("python_import_torch_s_runs", [])))
        add("first step / import torch (same round)", f"{st['first_step_over_import_torch']:.2f}",
            f"torch._dynamo imported: {st['torch_dynamo_imported']}")
    if "gpu" in results:
        add("")
        g = results["gpu"]
        if g.get("split"):
            u = g["unsplit"]
            add(f"GPU {g.get('device_name', '')}: ResNet-18 CIFAR, batch {g.get('batch')}", "samples/s",
                "ratio vs unsplit", "cut floats/sample", "peak RSS MiB/node")
            add("unsplit, one process", fmt(u["samples_per_s"]), "1.00", "",
                f"(again at end: {fmt(g['unsplit_again']['samples_per_s'])})" if g.get("unsplit_again") else "")
            for r in g["split"]:
                label = "node" if r["parts"] == 1 else "nodes"
                add(f"meshsl {r['parts']} {label} M={r['micro_batches']} {r['schedule']}", fmt(r["samples_per_s"]),
                    f"{r['ratio_vs_unsplit']:.2f}", " ".join(fmt(v) for v in r.get("cut_floats_per_sample", [])),
                    " ".join(f"{v:.0f}" for v in r.get("peak_rss_mib", {}).values()))
        add("GPU", g.get("skipped") or f"D2H 8 MiB pageable {g['d2h_pageable_ms']:.2f} ms, pinned "
                                      f"{g['d2h_pinned_ms']:.2f} ms ({g['speedup']:.2f}x)")
    if "wan" in results:
        from benchmarks.wan import table as wan_table
        add("")
        lines.append(wan_table(results["wan"]))
    if "psi" in results:
        from benchmarks.psi import table as psi_table
        add("")
        lines.append(psi_table(results["psi"]))
    if "bank" in results:
        from benchmarks.bank import table as bank_table
        add("")
        lines.append(bank_table(results["bank"]))
    if "llm" in results:
        from benchmarks.llm import table as llm_table
        add("")
        lines.append(llm_table(results["llm"]))
    if "secretflow" in results:
        from benchmarks.secretflow_compare import table as secretflow_table
        add("")
        lines.append(secretflow_table(results["secretflow"]))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes and few repetitions (< 2 minutes)")
    parser.add_argument("--smoke", action="store_true",
                        help="the tiniest sizes, one repetition: checks that each section runs (figures mean nothing)")
    parser.add_argument("--out", type=Path, help="write the results here as JSON")
    parser.add_argument("--only", nargs="+", choices=SECTIONS + OPTIONAL,
                        help="run only these sections (wan, psi and secretflow run only when named)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    results: dict = {"machine": machine(), "quick": args.quick, "smoke": args.smoke}
    timings = {}
    for section in args.only or SECTIONS:
        started = time.perf_counter()
        module = __import__(f"benchmarks.{MODULES.get(section, section)}", fromlist=["measure"])
        print(f"== {section} ...", file=sys.stderr, flush=True)
        results[section] = module.measure(quick=args.quick, smoke=True) if args.smoke else module.measure(quick=args.quick)
        timings[section] = round(time.perf_counter() - started, 1)
    results["seconds"] = timings
    results["machine"]["load_avg_1m_at_end"] = os.getloadavg()[0]
    print(table(results))
    print(f"\nmachine: {results['machine']}\nseconds per section: {timings}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1, default=str))
        print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
