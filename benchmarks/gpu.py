"""GPU: a ResNet-18-sized CIFAR-shape model split over 2 and 4 meshsl nodes vs unsplit single-GPU training,
and pinned-memory staging vs pageable device->host copies of an 8 MiB activation. Skipped without CUDA.

The model is benchmarks.resnet (ResNet-18, CIFAR variant, 11.2M parameters, 0.56 GMAC/sample), cut into
contiguous segments of near-equal FLOPs and placed with a `benchmarks.resnet:segment` factory. Data is
synthetic with the CIFAR shape [3, 32, 32]; it stays on the first node and the labels on the last.

What is compared, on ONE GPU:
  * unsplit: the whole model in one process (`python -m benchmarks.gpu single`), same batch, plain SGD
    (lr 0.01), same steps; each batch is copied host->device per step, as meshsl's data node does;
  * meshsl: a 2- or 4-node chain, one real OS process per node exchanging activations and gradients over
    ZeroMQ (tcp loopback), every node with `device: cuda`. On one GPU the node processes share the device
    (time-sliced between CUDA contexts), so this is the honest single-GPU comparison: what splitting costs
    (device->host->socket->host->device at every cut, per micro-batch) against what pipelining can hide.
    With one GPU per node the stages would run truly in parallel; that needs a multi-GPU machine.
  * meshsl with 1 node: the unsplit model inside meshsl, separating the runtime's own per-step cost from
    the cost of the cuts.

Micro-batches M = 1 and 4 (GPipe and 1F1B). Ratios are samples/s relative to the unsplit process.

The same code path runs on CPU with a narrow ResNet (`measure_split(device="cpu", width_multiplier=1/16)`):
tests/unit/test_gpu_bench.py uses it as a smoke test on machines without a GPU."""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from typing import Iterator

import torch

from benchmarks.common import ROOT, chain_document, run_processes, run_python
from benchmarks.resnet import balanced_cuts, resnet18, unit_macs, unit_output_shape

CIFAR_SHAPE = [3, 32, 32]
LR = 0.01


def resnet_chain_document(parts: int, micro_batches: int = 1, schedule: str = "gpipe", steps: int = 20,
                          batch_size: int = 256, device: str = "cuda", width_multiplier: float = 1.0,
                          num_samples: int = 2048, name: str = "bench-resnet") -> dict:
    """A `parts`-node chain (benchmarks.common.chain_document) whose segments are the ResNet-18 cut into
    `parts` near-equal-FLOP pieces (factory segments), every node on `device`, CIFAR-shape synthetic data on
    the first node and its labels on the last."""
    doc = chain_document(parts, micro_batches, schedule, steps=steps, batch_size=batch_size,
                         num_samples=num_samples, name=name)
    for node in doc["nodes"]:
        node["device"] = device
    for data in doc["data"]:
        data["dataset"]["options"]["shape"] = list(CIFAR_SHAPE)
    for seg, (start, stop) in zip(doc["segments"], balanced_cuts(parts, width_multiplier)):
        seg.pop("layers")
        seg["factory"] = {"target": "benchmarks.resnet:segment",
                          "kwargs": {"start": start, "stop": stop, "width_multiplier": width_multiplier}}
    doc["training"]["optimizer"] = {"name": "sgd", "lr": LR}
    return doc


def cut_floats_per_sample(parts: int, width_multiplier: float = 1.0) -> list[int]:
    """Activation values per sample crossing each cut (the gradient coming back has the same size)."""
    return [math.prod(unit_output_shape(stop - 1, width_multiplier))
            for _, stop in balanced_cuts(parts, width_multiplier)[:-1]]


@contextlib.contextmanager
def _importable_benchmarks() -> Iterator[None]:
    """Node processes import the `benchmarks.resnet:segment` factory: put the repository on their path."""
    old = os.environ.get("PYTHONPATH")
    parts = [str(ROOT)] + ([old] if old else [])
    os.environ["PYTHONPATH"] = os.pathsep.join(parts)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


def measure_split(parts: int = 2, micro_batches: int = 1, schedule: str = "gpipe", device: str = "cuda",
                  width_multiplier: float = 1.0, batch_size: int = 256, steps: int = 20, warmup: int = 3,
                  num_samples: int = 2048, timeout: float = 300.0) -> dict:
    """Train the split ResNet with one real node process per segment; steady-state samples/s after `warmup`."""
    doc = resnet_chain_document(parts, micro_batches, schedule, steps=steps, batch_size=batch_size, device=device,
                                width_multiplier=width_multiplier, num_samples=num_samples)
    with _importable_benchmarks():
        result = run_processes(doc, warmup_steps=warmup, timeout=timeout)
    return {"parts": parts, "micro_batches": micro_batches, "schedule": schedule, "device": device,
            "batch": batch_size, "samples_per_s": result["samples_per_s"], "steps": result["steps"],
            "loss": result["loss"], "peak_rss_mib": result["peak_rss_mib"],
            "cut_floats_per_sample": cut_floats_per_sample(parts, width_multiplier),
            "segments": balanced_cuts(parts, width_multiplier)}


def single(args) -> dict:
    """The unsplit model in one process on `args.device`: same batch, SGD, steps as the meshsl runs."""
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = resnet18(args.width_multiplier).to(device).train()
    pool = torch.randn(4, args.batch, *CIFAR_SHAPE)  # host batches, copied to the device every step
    labels = torch.randint(0, 10, (4, args.batch))
    loss_fn = torch.nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    last = [float("nan")]

    def step(i: int) -> None:
        x, y = pool[i % 4].to(device), labels[i % 4].to(device)
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        last[0] = loss.item()  # meshsl's label node reads the loss every step too

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for i in range(args.warmup):
        step(i)
    sync()
    start = time.perf_counter()
    for i in range(args.steps):
        step(i)
    sync()
    seconds = time.perf_counter() - start
    out = {"samples_per_s": args.steps * args.batch / seconds, "loss": last[0], "steps": args.warmup + args.steps}
    if device.type == "cuda":
        out["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def measure_single(device: str = "cuda", width_multiplier: float = 1.0, batch_size: int = 256, steps: int = 20,
                   warmup: int = 3, threads: int = 1) -> dict:
    """`single` in a fresh process (its own CUDA context, like each node's)."""
    return run_python("benchmarks.gpu", ["single", "--device", device, "--width-multiplier", str(width_multiplier),
                                         "--batch", str(batch_size), "--steps", str(steps), "--warmup", str(warmup),
                                         "--threads", str(threads)], timeout=600)


def pinned_copy(quick: bool, reps: int = 0) -> dict:
    from meshsl.compute.staging import to_host
    x = torch.randn(512, 64, 8, 8, device="cuda")  # 8 MiB fp32
    reps = reps or (20 if quick else 100)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        x.cpu()
    pageable = (time.perf_counter() - t) / reps
    t = time.perf_counter()
    for _ in range(reps):
        to_host(x)
    torch.cuda.synchronize()
    pinned = (time.perf_counter() - t) / reps
    return {"d2h_pageable_ms": pageable * 1e3, "d2h_pinned_ms": pinned * 1e3, "speedup": pageable / pinned}


def figures(device: str, cases: list[tuple[int, int, str]], width_multiplier: float = 1.0, batch_size: int = 256,
            steps: int = 20, warmup: int = 3, num_samples: int = 2048, again: bool = True) -> dict:
    """Unsplit vs meshsl (parts, micro_batches, schedule) chains on `device`: samples/s and the ratio;
    `again`: the unsplit run once more at the end (drift)."""
    unsplit = measure_single(device, width_multiplier, batch_size, steps, warmup)
    rows = []
    for parts, micro_batches, schedule in cases:
        row = measure_split(parts, micro_batches, schedule, device, width_multiplier, batch_size, steps, warmup,
                            num_samples)
        row["ratio_vs_unsplit"] = row["samples_per_s"] / unsplit["samples_per_s"]
        rows.append(row)
    unsplit_again = measure_single(device, width_multiplier, batch_size, steps, warmup) if again else None  # drift
    return {"model": "resnet18-cifar", "width_multiplier": width_multiplier,
            "parameters": sum(p.numel() for p in resnet18(width_multiplier).parameters()),
            "gmac_per_sample": round(sum(unit_macs(width_multiplier)) / 1e9, 4), "batch": batch_size,
            "steps": steps, "warmup": warmup, "unsplit": unsplit, "unsplit_again": unsplit_again, "split": rows}


# The smoke run (`measure(smoke=True)`): a narrow ResNet, 2 nodes, a couple of steps; on CUDA, or without it
# on CPU (the same code path, no GPU figure), next to the reason the GPU figures are skipped.
SMOKE = {"width_multiplier": 1 / 16, "batch_size": 16, "steps": 2, "warmup": 1, "num_samples": 128, "again": False}


def measure(quick: bool = False, smoke: bool = False) -> dict:
    if smoke:
        if not torch.cuda.is_available():
            return {"skipped": "no CUDA device on this machine", "cpu": figures("cpu", [(2, 2, "1f1b")], **SMOKE)}
        result = figures("cuda", [(2, 2, "1f1b")], **SMOKE)
        return {"device_name": torch.cuda.get_device_name(0), **result, **pinned_copy(quick=True, reps=2)}
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device on this machine"}
    steps, warmup = (12, 4) if quick else (40, 8)
    cases = [(1, 1, "gpipe"), (2, 1, "gpipe"), (2, 4, "1f1b"), (4, 1, "gpipe"), (4, 4, "1f1b")] if quick else [
        (1, 1, "gpipe"), (2, 1, "gpipe"), (2, 4, "gpipe"), (2, 4, "1f1b"), (4, 1, "gpipe"), (4, 4, "gpipe"),
        (4, 4, "1f1b")]
    result = figures("cuda", cases, 1.0, 256, steps, warmup)
    return {"device_name": torch.cuda.get_device_name(0), **result, **pinned_copy(quick)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["single"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--width-multiplier", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    print(json.dumps(single(args)))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
