"""GPU path: pinned-memory staging vs pageable copies (device<->host) of an 8 MiB activation; skipped
without CUDA. Split-model-on-GPU figures need a CUDA machine (see docs/performance.md)."""
from __future__ import annotations

import time

import torch


def measure(quick: bool = False) -> dict:
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device on this machine"}
    from meshsl.compute.staging import to_host
    x = torch.randn(512, 64, 8, 8, device="cuda")  # 8 MiB fp32, ResNet-18 layer1 output at batch 512
    reps = 20 if quick else 100
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
