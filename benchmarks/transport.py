"""Per-hop transport: meshsl's real path (encode_message -> ZmqTransport -> decode_message + edge decode)
against raw pyzmq (PUSH/PULL and DEALER/ROUTER, zero-copy frames) on the same sizes, tcp loopback.

Both sides get the same socket settings (high-water mark HWM, zero-copy sends with the same copy threshold)
and are measured the same way: at the receiver, after a warm-up, until the sender's end marker arrives.
meshsl sends the way a node does: `try_send`, and `await send` only when that cannot go now.

`measure()` runs every case as a pair of processes, interleaved, best of the repeats."""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import socket
import time

import numpy as np

HWM = 128  # both sides: meshsl's default high-water mark
WARMUP_S = 0.1  # messages in the first WARMUP_S after the first one are not timed (connection, allocator)


def _copy_threshold() -> int:
    import os
    import zmq
    # what ZmqTransport uses by default; raw sockets get the same (env override for experiments)
    return int(os.environ.get("MESHSL_BENCH_COPY_THRESHOLD", zmq.COPY_THRESHOLD))


class _Meter:
    """Receiver-side throughput after a warm-up, the same for meshsl and raw pyzmq."""

    def __init__(self) -> None:
        self.first = self.start = None
        self.n = self.nbytes = 0
        self.warm_n = self.warm_bytes = 0

    def add(self, nbytes: int) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        if self.start is None:
            if now - self.first < WARMUP_S:
                self.warm_n += 1
                self.warm_bytes += nbytes
                return
            self.start = now
            return  # the clock starts when this one arrived: count what follows it
        self.n += 1
        self.nbytes += nbytes

    def result(self) -> tuple:
        end = time.perf_counter()
        if self.start is None or self.n == 0:  # a stream shorter than the warm-up: time all of it
            return self.warm_n, self.warm_bytes, end - (self.first or end)
        return self.n, self.nbytes, end - self.start


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _edge_and_codecs(size: int):
    from meshsl.plans.nodeplan import EdgePlan
    from meshsl.node.wire import EdgeCodecs
    edge = EdgePlan(name="a->b", producer="a", consumer="b", shape=(size // 4,), cross_party=True, remote=True)
    return edge, EdgeCodecs({edge.name: edge})


def _rtt_summary(samples: list[float]) -> dict:
    return {"rtt_us_median": float(np.median(samples) * 1e6), "rtt_us_p99": float(np.percentile(samples, 99) * 1e6)}


# ---- meshsl -------------------------------------------------------------------------------------
async def _meshsl_recv(port: int, peer_port: int, size: int, queue, mode: str) -> None:
    from meshsl.protocol.envelope import Envelope, Kind
    from meshsl.protocol.frames import decode_message, encode_message
    from meshsl.transport.zmq_backend import ZmqTransport
    edge, codecs = _edge_and_codecs(size)
    book = {"a": f"tcp://127.0.0.1:{peer_port}", "b": f"tcp://127.0.0.1:{port}"}
    transport = ZmqTransport("b", book["b"], book, high_water_mark=HWM, copy_threshold=_copy_threshold())
    await transport.start()
    queue.put("ready")
    meter = _Meter()
    while True:
        sender, frames = await transport.recv()
        envelope, tensors = decode_message(frames, 1 << 31)
        if envelope.kind == Kind.SHUTDOWN:
            result = meter.result()
            await transport.send("a", encode_message(Envelope(kind=Kind.ACK, topology="t", sender="b")))
            break
        tensor = codecs.decode(edge, "act", envelope.tensors[0], tensors[0], 1)
        if mode == "rtt":
            back = Envelope(kind=Kind.GRADIENT, topology="t", sender="b", step=envelope.step, edge=edge.name,
                            tensors=envelope.tensors)
            frames = encode_message(back, [[tensor]])
            if not transport.try_send("a", frames):
                await transport.send("a", frames)
            continue
        meter.add(tensor.numel() * 4)
    queue.put(result)
    await asyncio.sleep(0.5)
    await transport.close()


def meshsl_recv(port, peer_port, size, queue, mode):
    asyncio.run(_meshsl_recv(port, peer_port, size, queue, mode))


async def _meshsl_send(port: int, peer_port: int, size: int, seconds: float, mode: str, reps: int) -> dict:
    import torch
    from meshsl.protocol.envelope import Envelope, Kind
    from meshsl.protocol.frames import decode_message, encode_message
    from meshsl.transport.zmq_backend import ZmqTransport
    edge, codecs = _edge_and_codecs(size)
    book = {"a": f"tcp://127.0.0.1:{port}", "b": f"tcp://127.0.0.1:{peer_port}"}
    transport = ZmqTransport("a", book["a"], book, high_water_mark=HWM, copy_threshold=_copy_threshold())
    await transport.start()
    tensor = torch.randn(1, size // 4)
    result = {}
    step = 0
    if mode == "rtt":
        samples = []
        for i in range(reps + 20):
            t0 = time.perf_counter()
            descriptor, parts = codecs.encode(edge.name, "act", tensor, (0, 0))
            env = Envelope(kind=Kind.ACTIVATION, topology="t", sender="a", step=i, edge=edge.name, tensors=(descriptor,))
            frames = encode_message(env, [parts])
            if not transport.try_send("b", frames):
                await transport.send("b", frames)
            _, frames = await transport.recv()
            envelope, tensors = decode_message(frames, 1 << 31)
            codecs.decode(edge, "grad", envelope.tensors[0], tensors[0], 1)
            if i >= 20:
                samples.append(time.perf_counter() - t0)
        result = _rtt_summary(samples)
    else:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            step += 1
            descriptor, parts = codecs.encode(edge.name, "act", tensor, (0, 0))
            env = Envelope(kind=Kind.ACTIVATION, topology="t", sender="a", step=step, edge=edge.name,
                           tensors=(descriptor,))
            frames = encode_message(env, [parts])
            if not transport.try_send("b", frames):  # as a node sends
                await transport.send("b", frames)
    await transport.send("b", encode_message(Envelope(kind=Kind.SHUTDOWN, topology="t", sender="a")))
    await asyncio.wait_for(transport.recv(), timeout=120)  # the receiver saw everything (sockets have LINGER 0)
    await transport.close()
    return result


# ---- raw pyzmq ----------------------------------------------------------------------------------
def raw_recv(port: int, peer_port: int, size: int, queue, mode: str) -> None:
    import zmq
    ctx = zmq.Context()
    if mode == "rtt":
        s = ctx.socket(zmq.ROUTER)
    else:
        s = ctx.socket(zmq.PULL if mode == "push" else zmq.ROUTER)
    s.setsockopt(zmq.RCVHWM, HWM)
    s.copy_threshold = _copy_threshold()
    s.bind(f"tcp://127.0.0.1:{port}")
    queue.put("ready")
    meter = _Meter()
    while True:
        frames = s.recv_multipart(copy=False)
        payload = frames[-1]
        if len(payload) == 0:
            break
        if mode == "rtt":
            s.send_multipart([frames[0], payload], copy=False)
            continue
        np.frombuffer(payload.buffer, dtype=np.float32)  # the same zero-copy view meshsl makes
        meter.add(len(payload))
    queue.put(meter.result())
    s.close(0)
    ctx.term()


def raw_send(port: int, peer_port: int, size: int, seconds: float, mode: str, reps: int) -> dict:
    import zmq
    ctx = zmq.Context()
    s = ctx.socket(zmq.PUSH if mode == "push" else zmq.DEALER)
    s.setsockopt(zmq.SNDHWM, HWM)
    s.copy_threshold = _copy_threshold()
    s.connect(f"tcp://127.0.0.1:{peer_port}")
    buf = memoryview(np.random.default_rng(0).standard_normal(size // 4).astype(np.float32))
    result = {}
    if mode == "rtt":
        samples = []
        for i in range(reps + 20):
            t0 = time.perf_counter()
            s.send(buf, copy=False)
            s.recv(copy=False)
            if i >= 20:
                samples.append(time.perf_counter() - t0)
        result = _rtt_summary(samples)
    else:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            s.send(buf, copy=False)
    s.send(b"")
    s.close(linger=-1)
    ctx.term()
    return result


def _one(kind: str, mode: str, size: int, seconds: float, reps: int) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port, peer_port = _port(), _port()
    target = meshsl_recv if kind == "meshsl" else raw_recv
    proc = ctx.Process(target=target, args=(peer_port, port, size, queue, mode))
    proc.start()
    assert queue.get(timeout=60) == "ready"
    if kind == "meshsl":
        result = asyncio.run(_meshsl_send(port, peer_port, size, seconds, mode, reps))
    else:
        result = raw_send(port, peer_port, size, seconds, mode, reps)
    if mode != "rtt":
        n, nbytes, dt = queue.get(timeout=120)
        result = {"messages": n, "MBps": nbytes / dt / 1e6 if dt > 0 else 0.0}
    proc.join(timeout=30)
    if proc.is_alive():
        proc.kill()
    return result


def measure(quick: bool = False, smoke: bool = False) -> list[dict]:
    """`smoke`: one small size for a moment, one round trip size, 20 round trips (does it still run?)."""
    sizes = [64 << 10] if smoke else [64 << 10, 1 << 20, 16 << 20]
    seconds = 0.05 if smoke else 0.5 if quick else 1.0
    rounds = 1 if quick or smoke else 3  # interleaved: raw, meshsl, raw, meshsl ... best of each (a shared machine is noisy)
    rows = []
    for size in sizes:
        best = {"push": 0.0, "dealer": 0.0, "meshsl": 0.0}
        for _ in range(rounds):
            best["push"] = max(best["push"], _one("raw", "push", size, seconds, 0)["MBps"])
            best["dealer"] = max(best["dealer"], _one("raw", "dealer", size, seconds, 0)["MBps"])
            best["meshsl"] = max(best["meshsl"], _one("meshsl", "stream", size, seconds, 0)["MBps"])
        rows.append({"size_bytes": size, "raw_push_pull_MBps": best["push"], "raw_dealer_router_MBps": best["dealer"],
                     "meshsl_MBps": best["meshsl"],
                     "ratio_vs_push_pull": best["meshsl"] / best["push"] if best["push"] else 0.0,
                     "ratio_vs_dealer_router": best["meshsl"] / best["dealer"] if best["dealer"] else 0.0})
    rtt = []
    reps = 20 if smoke else 200 if quick else 1000
    for size in [4 << 10] if smoke else [4 << 10, 64 << 10]:
        raw = mine = None
        for _ in range(rounds):  # interleaved, the best median of each
            r = _one("raw", "rtt", size, 0, reps)
            m = _one("meshsl", "rtt", size, 0, reps)
            raw = r if raw is None or r["rtt_us_median"] < raw["rtt_us_median"] else raw
            mine = m if mine is None or m["rtt_us_median"] < mine["rtt_us_median"] else mine
        rtt.append({"size_bytes": size, "raw_rtt_us": raw["rtt_us_median"], "meshsl_rtt_us": mine["rtt_us_median"],
                    "meshsl_rtt_us_p99": mine["rtt_us_p99"],
                    "ratio": raw["rtt_us_median"] / mine["rtt_us_median"] if mine["rtt_us_median"] else 0.0})
    return rows + rtt


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--smoke", action="store_true")
    options = parser.parse_args()
    print(json.dumps(measure(options.quick, options.smoke), indent=1))
