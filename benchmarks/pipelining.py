"""Pipelining across real node processes, the torch.distributed.pipelining peer and one-process training,
all on the same generated MLP (equal-cost stages, one compute thread per node), interleaved in one run."""
from __future__ import annotations

import time

import torch

from benchmarks.common import chain_document, mlp_stages, run_processes, run_python


def micro_batch_efficiency(width: int, layers: int, batch: int, micro_batches: int, reps: int = 3,
                           in_dim: int = 0) -> float:
    """Time of one stage's fwd+bwd on the whole batch / on `micro_batches` slices, one thread (1.0 = no loss).

    The product with the bubble-only bound is what a perfect runtime could reach on this machine."""
    torch.set_num_threads(1)
    from benchmarks.torch_baselines import build_stage
    stage = build_stage(mlp_stages(2, width, layers, in_dim or width)[1][:-1] or [["Linear", width, width]])

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


# Equal-cost stages: every stage is `LAYERS` Linear(WIDTH, WIDTH) + ReLU (the input is WIDTH wide too;
# the last stage adds a Linear(WIDTH, 10) head, 1% of its cost). Micro-batches of 128-256 rows keep
# one-thread GEMM efficiency near that of the whole batch, so the figures show the runtime, not BLAS.
WIDTH, LAYERS = 1024, 2


def measure(quick: bool = False) -> dict:
    width = WIDTH
    steps, warm = (7, 2) if quick else (14, 3)
    batch = 1024 if quick else 2048
    cases = [(2, 1, "gpipe"), (2, 8, "gpipe")] if quick else [
        (2, 1, "gpipe"), (2, 4, "gpipe"), (2, 8, "gpipe"), (2, 16, "gpipe"), (2, 8, "1f1b"), (2, 16, "1f1b"),
        (4, 1, "gpipe"), (4, 8, "gpipe"), (4, 8, "1f1b"), (4, 16, "1f1b")]

    def document(stages: int, micro_batches: int, schedule: str) -> dict:
        # 4-stage chains have one layer per stage: the same model depth as 2 stages of 2 layers
        return chain_document(stages, micro_batches, schedule, steps=steps, batch_size=batch, width=width,
                              in_dim=width, layers_per_stage=LAYERS if stages == 2 else 1)

    rows = []
    for stages, micro_batches, schedule in cases:
        result = run_processes(document(stages, micro_batches, schedule), warmup_steps=warm)
        rows.append({"stages": stages, "micro_batches": micro_batches, "schedule": schedule, "batch": batch,
                     "samples_per_s": result["samples_per_s"], "peak_rss_mib": result["peak_rss_mib"]})
    efficiency = {m: micro_batch_efficiency(width, LAYERS, batch, m) for m in sorted({r["micro_batches"] for r in rows})}
    for row in rows:
        base = next(r for r in rows if r["stages"] == row["stages"] and r["micro_batches"] == 1)
        row["speedup_vs_m1"] = row["samples_per_s"] / base["samples_per_s"]
        m, s = row["micro_batches"], row["stages"]
        row["gpipe_ideal"] = m * s / (m + s - 1)  # bubble-only bound, equal stages, free transfers
        row["attainable"] = row["gpipe_ideal"] * efficiency[m] if s == 2 else None  # x one-thread GEMM efficiency
    out = {"pipelining": rows, "micro_batch_efficiency": efficiency}

    # the same model, stage cut, batch and micro-batches under torch.distributed.pipelining (gloo)
    peers = []
    pp_cases = [(2, 8, "gpipe")] if quick else [(2, 8, "gpipe"), (2, 8, "1f1b"), (4, 8, "1f1b")]
    for stages, micro_batches, schedule in pp_cases:
        layers = LAYERS if stages == 2 else 1
        torch_pp = run_python("benchmarks.torch_baselines", [
            "pipeline", "--stages", str(stages), "--micro-batches", str(micro_batches), "--schedule", schedule,
            "--width", str(width), "--in-dim", str(width), "--layers", str(layers), "--batch", str(batch),
            "--steps", str(steps), "--warmup", str(warm)])
        mine = next(r for r in rows if (r["stages"], r["micro_batches"], r["schedule"]) ==
                    (stages, micro_batches, schedule))
        peers.append({"case": f"{stages} stages M={micro_batches} {schedule}", "meshsl": mine["samples_per_s"],
                      "torch_pipelining": torch_pp["samples_per_s"],
                      "ratio": mine["samples_per_s"] / torch_pp["samples_per_s"]})
    out["vs_torch_pipelining"] = peers

    # one process with the same total cores (2 intra-op threads), the whole model unsplit, same batch
    single = []
    # a user picks the micro-batch count that runs best: the fastest 2-stage configuration measured above
    heavy = max((r for r in rows if r["stages"] == 2), key=lambda r: r["samples_per_s"])
    base = run_python("benchmarks.torch_baselines", [
        "single", "--threads", "2", "--stages", "2", "--width", str(width), "--layers", str(LAYERS),
        "--in-dim", str(width), "--batch", str(batch), "--steps", str(steps), "--warmup", str(warm)])
    single.append({"model": f"compute-heavy MLP ({2 * LAYERS} x Linear {width}, batch {batch})", "width": width,
                   "micro_batches": heavy["micro_batches"], "schedule": heavy["schedule"],
                   "one_process_2_threads": base["samples_per_s"],
                   "meshsl_2_nodes": heavy["samples_per_s"], "ratio": heavy["samples_per_s"] / base["samples_per_s"]})
    small_steps = steps * 3
    base = run_python("benchmarks.torch_baselines", [
        "single", "--threads", "2", "--stages", "2", "--width", "64", "--layers", "2", "--in-dim", "64",
        "--batch", "256", "--steps", str(small_steps * 2), "--warmup", str(warm)])
    mine = run_processes(chain_document(2, 1, "gpipe", steps=small_steps, batch_size=256, width=64, in_dim=64),
                         warmup_steps=warm)
    single.append({"model": "small MLP (4 x Linear 64, batch 256)", "width": 64, "micro_batches": 1,
                   "one_process_2_threads": base["samples_per_s"], "meshsl_2_nodes": mine["samples_per_s"],
                   "ratio": mine["samples_per_s"] / base["samples_per_s"]})
    out["vs_one_process"] = single
    return out
