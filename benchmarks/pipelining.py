"""Pipelining across real node processes, the torch.distributed.pipelining peer and one-process training,
all on the same generated MLP (equal-cost stages, one compute thread per node), interleaved in one run."""
from __future__ import annotations

import time

import torch

from benchmarks.common import chain_document, mlp_stages, run_processes, run_python


def micro_batch_efficiency(width: int, layers: int, batch: int, micro_batches: int, reps: int = 3) -> float:
    """Time of one stage's fwd+bwd on the whole batch / on `micro_batches` slices, one thread (1.0 = no loss)."""
    torch.set_num_threads(1)
    from benchmarks.torch_baselines import build_stage
    stage = build_stage(mlp_stages(2, width, layers, width)[1][:-1] or [["Linear", width, width]])

    def run(m: int) -> float:
        xs = [torch.randn(batch // m, width, requires_grad=True) for _ in range(m)]
        for x in xs:
            stage(x).sum().backward()
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            for x in xs:
                stage(x).sum().backward()
            best = min(best, time.perf_counter() - t)
        return best

    return run(1) / run(micro_batches)


def measure(quick: bool = False) -> dict:
    width = 512 if quick else 1024
    steps, warm = (8, 2) if quick else (20, 4)
    batch = 256
    cases = [(2, 1, "gpipe"), (2, 8, "gpipe")] if quick else [
        (2, 1, "gpipe"), (2, 4, "gpipe"), (2, 8, "gpipe"), (2, 16, "gpipe"), (2, 8, "1f1b"), (2, 16, "1f1b"),
        (4, 1, "gpipe"), (4, 8, "gpipe"), (4, 8, "1f1b"), (4, 16, "1f1b")]
    rows = []
    for stages, micro_batches, schedule in cases:
        doc = chain_document(stages, micro_batches, schedule, steps=steps, batch_size=batch, width=width,
                             layers_per_stage=2 if stages == 2 else 1)
        result = run_processes(doc, warmup_steps=warm)
        rows.append({"stages": stages, "micro_batches": micro_batches, "schedule": schedule,
                     "samples_per_s": result["samples_per_s"], "peak_rss_mib": result["peak_rss_mib"]})
    for row in rows:
        base = next(r for r in rows if r["stages"] == row["stages"] and r["micro_batches"] == 1)
        row["speedup_vs_m1"] = row["samples_per_s"] / base["samples_per_s"]
        m, s = row["micro_batches"], row["stages"]
        row["gpipe_ideal"] = m * s / (m + s - 1)  # bubble-only bound, equal stages, free transfers
    out = {"pipelining": rows, "micro_batch_efficiency": {
        m: micro_batch_efficiency(width, 2, batch, m) for m in ([8] if quick else [4, 8, 16])}}

    # the same model and stage cut: torch.distributed.pipelining and one process with 2 threads
    peers = []
    pp_cases = [(2, 8, "gpipe")] if quick else [(2, 8, "gpipe"), (2, 8, "1f1b"), (4, 8, "1f1b")]
    for stages, micro_batches, schedule in pp_cases:
        layers = 2 if stages == 2 else 1
        torch_pp = run_python("benchmarks.torch_baselines", [
            "pipeline", "--stages", str(stages), "--micro-batches", str(micro_batches), "--schedule", schedule,
            "--width", str(width), "--layers", str(layers), "--steps", str(steps), "--warmup", str(warm)])
        mine = next((r for r in rows if (r["stages"], r["micro_batches"], r["schedule"]) ==
                     (stages, micro_batches, schedule)), None)
        if mine is None:
            doc = chain_document(stages, micro_batches, schedule, steps=steps, width=width, layers_per_stage=layers)
            mine = run_processes(doc, warmup_steps=warm)
        peers.append({"case": f"{stages} stages M={micro_batches} {schedule}", "meshsl": mine["samples_per_s"],
                      "torch_pipelining": torch_pp["samples_per_s"],
                      "ratio": mine["samples_per_s"] / torch_pp["samples_per_s"]})
    out["vs_torch_pipelining"] = peers

    # one process, same total cores (2 threads): a compute-heavy model and a small one
    single = []
    for label, w, in_dim in [("compute-heavy MLP", width, 784), ("small MLP", 64, 64)]:
        base = run_python("benchmarks.torch_baselines", [
            "single", "--threads", "2", "--stages", "2", "--width", str(w), "--layers", "2", "--in-dim", str(in_dim),
            "--steps", str(steps * 2), "--warmup", str(warm)])
        micro = 8 if w >= 512 else 1
        doc = chain_document(2, micro, "gpipe", steps=steps if w >= 512 else steps * 3, width=w, in_dim=in_dim)
        mine = run_processes(doc, warmup_steps=warm)
        single.append({"model": label, "width": w, "micro_batches": micro, "one_process_2_threads": base["samples_per_s"],
                       "meshsl_2_nodes": mine["samples_per_s"], "ratio": mine["samples_per_s"] / base["samples_per_s"]})
    out["vs_one_process"] = single
    return out
