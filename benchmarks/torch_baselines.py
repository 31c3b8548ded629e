"""Peers measured on the same model: unsplit training in one process, and torch.distributed.pipelining.

Run as `python -m benchmarks.torch_baselines single|pipeline ...`; prints one JSON line. The model and the
stage cut are the ones meshsl's generated chain uses (benchmarks.common.mlp_stages)."""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time

import torch
from torch import nn

from benchmarks.common import mlp_stages, self_peak_rss_mib


def build_stage(layers: list[list]) -> nn.Sequential:
    mods = []
    for entry in layers:
        mods.append(nn.Linear(*entry[1:]) if entry[0] == "Linear" else nn.ReLU())
    return nn.Sequential(*mods)


def single(args) -> dict:
    """The whole model in one process with `threads` intra-op threads (same batches, SGD)."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = nn.Sequential(*[build_stage(l) for l in mlp_stages(args.stages, args.width, args.layers, args.in_dim)])
    x = torch.randn(args.batch, args.in_dim)
    y = torch.randint(0, 10, (args.batch,))
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step():
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = time.perf_counter() - start
    return {"samples_per_s": args.steps * args.batch / seconds, "peak_rss_mib": self_peak_rss_mib()}


def _pipeline_rank(rank: int, world: int, port: int, args, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    layers = mlp_stages(world, args.width, args.layers, args.in_dim)
    part = build_stage(layers[rank])
    fan_in = args.in_dim if rank == 0 else args.width
    mb = args.batch // args.micro_batches
    stage = PipelineStage(part, rank, world, torch.device("cpu"), input_args=(torch.randn(mb, fan_in),))
    schedule_cls = ScheduleGPipe if args.schedule == "gpipe" else Schedule1F1B
    loss_fn = nn.CrossEntropyLoss()
    schedule = schedule_cls(stage, n_microbatches=args.micro_batches, loss_fn=loss_fn)
    opt = torch.optim.SGD(part.parameters(), lr=0.01)
    x = torch.randn(args.batch, args.in_dim)
    y = torch.randint(0, 10, (args.batch,))

    def step():
        opt.zero_grad()
        if rank == 0:
            schedule.step(x)
        elif rank == world - 1:
            schedule.step(target=y, losses=[])
        else:
            schedule.step()
        opt.step()

    for _ in range(args.warmup):
        step()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    dist.barrier()
    seconds = time.perf_counter() - start
    queue.put((rank, args.steps * args.batch / seconds, self_peak_rss_mib()))
    dist.destroy_process_group()


def pipeline(args) -> dict:
    """One process per stage (gloo on loopback), PipelineStage + ScheduleGPipe/Schedule1F1B."""
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = ctx.Queue()
    procs = [ctx.Process(target=_pipeline_rank, args=(r, args.stages, port, args, queue)) for r in range(args.stages)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    results.sort()
    return {"samples_per_s": min(r[1] for r in results), "peak_rss_mib": {f"rank{r[0]}": r[2] for r in results}}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["single", "pipeline"])
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--micro-batches", type=int, default=8)
    parser.add_argument("--schedule", default="gpipe", choices=["gpipe", "1f1b"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--in-dim", type=int, default=784)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    result = single(args) if args.mode == "single" else pipeline(args)
    print(json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
