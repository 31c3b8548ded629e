"""Between sites: every node of a topology on its own emulated site, joined by a wide-area link.

Each node runs in a private network namespace on a bridge (one address per site). Connections from one
site to another are redirected by nft (OUTPUT chain) to a user-space delay proxy in the sender's
namespace (benchmarks/delay_proxy.py): RTT/2 each way and a rate limit per direction (100 Mbit/s by
default). meshsl sees ordinary TCP addresses; nothing in it knows about the emulation.

Measured: ms per training step in steady state (from the coordinator's progress rows, after warm-up
steps), round trips per step = (ms/step at RTT r - ms/step at RTT 0) / r, and its ratio to the
synchronous bound (1 round trip per step for 2 parties: activation out, gradient back; 4 for the
5-party chain). torch.distributed.pipelining (gloo, 2 stages, the same model) runs over the same link.

    sudo python -m benchmarks.wan [--quick] [--out runs/wan.json]
    python -m benchmarks --only wan [--quick]

Needs root (namespaces), `ip` and `nft` (`apt-get install -y nftables`); skipped with a reason otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Optional

import yaml

ROOT = Path(__file__).resolve().parent.parent
PROXY_PORT = 9999
NODE_PORT = 7400
from meshsl.launch.entry import PROGRESS_PREFIX  # noqa: E402 (the coordinator's progress lines)
BOUND = {"vanilla": 1, "multi_hop": 4}  # data round trips per step of synchronous split learning


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(list(args), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {result.stderr.strip()}")
    return result


def unavailable() -> Optional[str]:
    """Why the emulation cannot run here (None: it can)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (apt-get install -y {'iproute2' if tool == 'ip' else 'nftables'})"
    return None


class Sites:
    """`count` namespaces on one bridge, each with the redirect to its own delay proxy."""

    def __init__(self, count: int) -> None:
        self.tag = uuid.uuid4().hex[:5]
        self.subnet_prefix = f"10.{77 + int(self.tag[:2], 16) % 100}.{int(self.tag[2:4], 16)}"
        self.bridge = f"wanbr{self.tag}"
        self.names = [f"wan-{self.tag}-{i}" for i in range(count)]
        self.addresses = [f"{self.subnet_prefix}.{i + 1}" for i in range(count)]
        self.proxies: list[subprocess.Popen] = []
        self.link: Optional[tuple[float, float]] = None

    def __enter__(self) -> "Sites":
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "link", "set", self.bridge, "up")
        for i, (ns, address) in enumerate(zip(self.names, self.addresses)):
            sh("ip", "netns", "add", ns)
            outer, inner = f"wan{self.tag}o{i}", f"wan{self.tag}i{i}"
            for cmd in (["ip", "link", "add", outer, "type", "veth", "peer", "name", inner],
                        ["ip", "link", "set", inner, "netns", ns],
                        ["ip", "link", "set", outer, "master", self.bridge],
                        ["ip", "link", "set", outer, "up"],
                        ["ip", "-n", ns, "addr", "add", f"{address}/24", "dev", inner],
                        ["ip", "-n", ns, "link", "set", inner, "up"],
                        ["ip", "-n", ns, "link", "set", "lo", "up"]):
                sh(*cmd)
            from benchmarks.delay_proxy import nft_rules
            rules = nft_rules("wan", address, f"{self.subnet_prefix}.0/24", PROXY_PORT)
            subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=rules, text=True, check=True,
                           capture_output=True)
        return self

    def set_link(self, rtt_ms: float, rate_mbit: float) -> None:
        """(Re)start every site's proxy with RTT/2 per direction."""
        if self.link == (rtt_ms, rate_mbit):
            return
        self._stop_proxies()
        for ns in self.names:
            proc = subprocess.Popen(self.exec(ns, sys.executable, "-m", "benchmarks.delay_proxy", "--port", str(PROXY_PORT),
                                              "--delay-ms", str(rtt_ms / 2), "--rate-mbit", str(rate_mbit)),
                                    cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError(f"delay proxy in {ns} did not start")
            self.proxies.append(proc)
        self.link = (rtt_ms, rate_mbit)

    def exec(self, ns: str, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", ns, "env", f"PYTHONPATH={ROOT}", *cmd]

    def _stop_proxies(self) -> None:
        for proc in self.proxies:
            proc.kill()
            proc.wait()
        self.proxies = []

    def __exit__(self, *exc) -> None:
        self._stop_proxies()
        for ns in self.names:
            for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split():
                try:  # what this benchmark started in its own namespace (a node left by an error)
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            sh("ip", "netns", "del", ns, check=False)
        sh("ip", "link", "del", self.bridge, check=False)


def measure_rtt(sites: Sites, samples: int = 20) -> float:
    """Median ms of a 64-byte echo between site 0 and site 1 through the emulated link."""
    server = subprocess.Popen(sites.exec(sites.names[1], sys.executable, "-c", _ECHO_SERVER, sites.addresses[1]),
                              stdout=subprocess.PIPE, text=True)
    try:
        server.stdout.readline()
        out = subprocess.run(sites.exec(sites.names[0], sys.executable, "-c", _ECHO_CLIENT, sites.addresses[1],
                                        str(samples)), capture_output=True, text=True, timeout=60, check=True)
        return float(out.stdout.strip())
    finally:
        server.kill()
        server.wait()


_ECHO_SERVER = """
import socket, sys
s = socket.create_server((sys.argv[1], 7399)); print("up", flush=True)
c, _ = s.accept(); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
while (d := c.recv(64)): c.sendall(d)
"""
_ECHO_CLIENT = """
import socket, statistics, sys, time
c = socket.create_connection((sys.argv[1], 7399)); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
times = []
for _ in range(int(sys.argv[2])):
    t = time.perf_counter(); c.sendall(b"x" * 64); got = 0
    while got < 64: got += len(c.recv(64))
    times.append((time.perf_counter() - t) * 1000)
print(statistics.median(times))
"""


# ---- meshsl ------------------------------------------------------------------------------------
def topology_document(name: str, sites: Sites, micro_batches: int, schedule: str, staleness: int = 0) -> dict:
    document = yaml.safe_load((ROOT / "topologies" / f"{name}.yaml").read_text())
    for i, node in enumerate(document["nodes"]):
        node["endpoint"] = f"tcp://{sites.addresses[i]}:{NODE_PORT + i}"
        node.pop("metrics_port", None)
        node.pop("standby", None)
    document["training"].update(micro_batches=micro_batches, schedule=schedule)
    if staleness:
        document["training"]["staleness"] = staleness
    document.pop("checkpoint", None)
    document["retry"] = {"timeout_s": 120, "heartbeat_timeout_s": 60, "startup_timeout_s": 120}
    return document


def run_meshsl(sites: Sites, name: str, micro_batches: int, schedule: str, steps: int, warmup: int,
               staleness: int = 0) -> dict:
    from meshsl.topology.model import load_topology
    document = topology_document(name, sites, micro_batches, schedule, staleness)
    with tempfile.TemporaryDirectory(prefix="meshsl-wan-") as tmp:
        path = Path(tmp) / f"{name}.yaml"
        path.write_text(yaml.safe_dump(document, sort_keys=False))
        topology = load_topology(path)
        procs, stamps = {}, []
        try:
            for i, node in enumerate(document["nodes"]):
                coordinator = node["name"] == topology.coordinator
                cmd = sites.exec(sites.names[i], sys.executable, "-m", "meshsl", "--log-level", "warning", "node",
                                 node["name"], "--topology", str(path), "--base-dir", str(ROOT), "--no-eval",
                                 "--steps", str(steps), "--summary-json", str(Path(tmp) / f"{node['name']}.json"),
                                 *(["--progress-stream"] if coordinator else []))
                log = open(Path(tmp) / f"{node['name']}.log", "w")
                procs[node["name"]] = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE if coordinator else log,
                                                       stderr=log, text=True)
            for line in procs[topology.coordinator].stdout:
                if line.startswith(PROGRESS_PREFIX):
                    row = json.loads(line[len(PROGRESS_PREFIX):])
                    if "step" in row and not row.get("event"):
                        stamps.append(time.perf_counter())
            for node, proc in procs.items():
                if proc.wait(timeout=120) != 0:
                    tail = (Path(tmp) / f"{node}.log").read_text()[-1500:]
                    raise RuntimeError(f"{node} exited with {proc.returncode}: {tail}")
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    steady = stamps[warmup:]
    if len(steady) < 2:
        raise RuntimeError(f"only {len(stamps)} steps reported")
    return step_times(steady)


WINDOW = 6  # steps per window of the "best sustained" figure


def step_times(stamps: list[float]) -> dict:
    """ms per step three ways: the best mean over WINDOW consecutive steps (what the protocol sustains when
    the shared CPUs let it: CPU contention only ever adds time, and a window is long enough that steps
    reported in a burst do not count as fast), the median interval and the mean over all steps."""
    gaps = [(b - a) * 1000 for a, b in zip(stamps, stamps[1:])]
    window = min(WINDOW, len(gaps))
    best = min(statistics.fmean(gaps[i:i + window]) for i in range(len(gaps) - window + 1))
    return {"ms_per_step": best, "median_ms_per_step": statistics.median(gaps),
            "mean_ms_per_step": statistics.fmean(gaps), "steps": len(gaps)}


# ---- torch.distributed.pipelining over the same link -------------------------------------------
def torch_rank(args) -> None:
    """One stage of vanilla.yaml's model (64-128-64 | 64-64-10) on gloo; rank 0 hosts the store."""
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
    torch.set_num_threads(1)
    host, port = args.master.rsplit(":", 1)
    os.environ.update(MASTER_ADDR=host, MASTER_PORT=port, GLOO_SOCKET_IFNAME=args.ifname)
    dist.init_process_group("gloo", rank=args.rank, world_size=2)
    torch.manual_seed(0)
    parts = [nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU()),
             nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))]
    part = parts[args.rank]
    mb = args.batch // args.micro_batches
    stage = PipelineStage(part, args.rank, 2, torch.device("cpu"), input_args=(torch.randn(mb, 64),))
    schedule = (ScheduleGPipe if args.schedule == "gpipe" else Schedule1F1B)(
        stage, n_microbatches=args.micro_batches, loss_fn=nn.CrossEntropyLoss())
    opt = torch.optim.Adam(part.parameters(), lr=0.003)
    x, y = torch.randn(args.batch, 64), torch.randint(0, 10, (args.batch,))
    stamps = []
    for _ in range(args.warmup + args.steps):
        opt.zero_grad()
        if args.rank == 0:
            schedule.step(x)
        else:
            schedule.step(target=y, losses=[])
        opt.step()
        stamps.append(time.perf_counter())
    print(json.dumps(step_times(stamps[args.warmup - 1:])), flush=True)
    dist.destroy_process_group()


def run_torch(sites: Sites, micro_batches: int, schedule: str, steps: int, warmup: int) -> dict:
    master = f"{sites.addresses[0]}:{NODE_PORT + 50}"
    procs = []
    for rank in range(2):
        ifname = f"wan{sites.tag}i{rank}"
        procs.append(subprocess.Popen(sites.exec(sites.names[rank], sys.executable, "-m", "benchmarks.wan", "torch-rank",
                                                 "--rank", str(rank), "--master", master, "--ifname", ifname,
                                                 "--micro-batches", str(micro_batches), "--schedule", schedule,
                                                 "--steps", str(steps), "--warmup", str(warmup)),
                                      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"torch rank exited with {proc.returncode}: {err[-1500:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return max(results, key=lambda r: r["ms_per_step"])


# ---- the comparison ----------------------------------------------------------------------------
def cases(quick: bool, smoke: bool = False) -> list[tuple[str, int, str]]:
    if smoke:
        return [("vanilla", 1, "gpipe")]
    out = []
    for name in ("vanilla", "multi_hop"):
        for micro_batches in (1, 4, 8):
            for schedule in (("gpipe",) if micro_batches == 1 else ("gpipe", "1f1b")):
                out.append((name, micro_batches, schedule))
    return out


# Latency hiding (training.staleness, docs/wan.md): the 5-party chain as the harness runs it (M = 8, 1F1B,
# batch 64), at k = 4 (0.8 of its RTT-0 throughput on a loaded VM) and k = 12 (enough on a quiet machine).
STALENESS = (4, 12)
STALE_CASE = ("multi_hop", 8, "1f1b")


# smoke: two sites (vanilla.yaml), RTT 0 and 20 ms, a few steps of meshsl at each; not the torch peer (its
# torch.distributed.pipelining calls are the pipelining section's, which the smoke run covers)
SMOKE_STEPS = (8, 2)  # (steps, warm-up)


def measure(quick: bool = False, rtts: Optional[list[float]] = None, rate_mbit: float = 100.0,
            repeats: Optional[int] = None, staleness: Optional[list[int]] = None, only_staleness: bool = False,
            smoke: bool = False) -> dict:
    why = unavailable()
    if why:
        return {"skipped": why}
    rtts = rtts or ([0.0, 20.0] if smoke else [0.0, 50.0] if quick else [0.0, 20.0, 50.0, 100.0])
    repeats = repeats or (1 if quick or smoke else 2)
    stale_ks = [k for k in (staleness if staleness is not None else () if smoke else STALENESS) if k > 0]
    # (system, topology, M, schedule, staleness, rtt) -> step_times() of each run
    runs: dict[tuple, list[dict]] = {}
    echoes: dict[float, list[float]] = {}
    with Sites(2 if smoke and not stale_ks else 5) as sites:
        for _ in range(repeats):  # rounds over every RTT, so that load drifts hit every RTT alike
            for rtt in rtts:
                sites.set_link(rtt, rate_mbit)
                echo = measure_rtt(sites)
                echoes.setdefault(rtt, []).append(echo)
                print(f"RTT {rtt:.0f} ms: echo {echo:.1f} ms", file=sys.stderr, flush=True)
                plain = [] if only_staleness else cases(quick, smoke)
                stale = [(*STALE_CASE, k) for k in stale_ks]
                if only_staleness:
                    stale.insert(0, (*STALE_CASE, 0))
                for name, micro_batches, schedule, k in [(*c, 0) for c in plain] + stale:
                    steps = 40 if name == "vanilla" else (20 if not k else 20 + 2 * k)
                    steps, warmup = SMOKE_STEPS if smoke else (steps, 4 + k)
                    result = run_meshsl(sites, name, micro_batches, schedule, steps, warmup=warmup, staleness=k)
                    runs.setdefault(("meshsl", name, micro_batches, schedule, k, rtt), []).append(result)
                    print(f"  {name} M={micro_batches} {schedule}" + (f" staleness {k}" if k else "")
                          + f": {result['ms_per_step']:.1f} ms/step (median {result['median_ms_per_step']:.1f})",
                          file=sys.stderr, flush=True)
                if only_staleness or smoke:
                    continue
                result = run_torch(sites, 1, "gpipe", steps=40, warmup=4)
                runs.setdefault(("torch", "vanilla", 1, "gpipe", 0, rtt), []).append(result)
                print(f"  torch.distributed.pipelining M=1: {result['ms_per_step']:.1f} ms/step "
                      f"(median {result['median_ms_per_step']:.1f})", file=sys.stderr, flush=True)
    echo_ms = {rtt: round(statistics.median(values), 2) for rtt, values in echoes.items()}
    rows = []
    for key in sorted(runs, key=lambda k: (k[0] != "meshsl", *k[1:])):
        system, name, micro_batches, schedule, k, rtt = key
        row = {"system": system, "topology": name, "micro_batches": micro_batches, "schedule": schedule,
               "staleness": k, "rtt_ms": rtt, "runs": runs[key]}
        for stat in ("ms_per_step", "median_ms_per_step"):
            ms = statistics.median(r[stat] for r in runs[key])
            row[stat] = round(ms, 2)
            if rtt > 0:
                base = statistics.median(r[stat] for r in runs[(*key[:5], rtts[0])])
                # Round trips of the link as it is: an echo through the same proxies (on a loaded machine
                # the proxies' timers fire late, so the link is slower than nominal).
                trips = (ms - base) / (echo_ms[rtt] - echo_ms[rtts[0]])
                prefix = "" if stat == "ms_per_step" else "median_"
                row[f"{prefix}round_trips_per_step"] = round(trips, 3)
                row[f"{prefix}ratio_to_bound"] = round(trips / BOUND[name], 3)
                # Latency hiding's figure: throughput against the same run without added delay.
                row[f"{prefix}throughput_vs_no_delay"] = round(base / ms, 3)
        if rtt > 0:
            row["bound"] = BOUND[name]
        rows.append(row)
    load = os.getloadavg()[0]
    return {"rate_mbit": rate_mbit, "rtt_ms": rtts, "echo_rtt_ms": echo_ms, "repeats": repeats,
            "load_avg_1m_at_end": load, "statistic": f"best mean over {WINDOW} consecutive steps", "rows": rows}


def table(result: dict) -> str:
    if "skipped" in result:
        return f"wan: skipped ({result['skipped']})"
    lines = [f"between sites ({result['rate_mbit']:.0f} Mbit/s per direction; echo RTT "
             + ", ".join(f"{k:.0f}: {v:.1f} ms" for k, v in result["echo_rtt_ms"].items()) + ")",
             "system | topology | M | schedule | staleness | RTT ms | ms/step | round trips/step | bound | ratio | "
             "throughput vs RTT 0 | median ms/step | median round trips | median ratio"]
    for r in result["rows"]:
        lines.append(" | ".join(str(c) for c in (
            r["system"], r["topology"], r["micro_batches"], r["schedule"], r.get("staleness", 0), f"{r['rtt_ms']:.0f}",
            f"{r['ms_per_step']:.1f}",
            f"{r['round_trips_per_step']:.2f}" if "round_trips_per_step" in r else "",
            r.get("bound", ""), f"{r['ratio_to_bound']:.2f}" if "ratio_to_bound" in r else "",
            f"{r['throughput_vs_no_delay']:.2f}" if "throughput_vs_no_delay" in r else "",
            f"{r['median_ms_per_step']:.1f}",
            f"{r['median_round_trips_per_step']:.2f}" if "median_round_trips_per_step" in r else "",
            f"{r['median_ratio_to_bound']:.2f}" if "median_ratio_to_bound" in r else "")))
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.wan", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    rank = sub.add_parser("torch-rank")
    rank.add_argument("--rank", type=int, required=True)
    rank.add_argument("--master", required=True)
    rank.add_argument("--ifname", default="")
    rank.add_argument("--micro-batches", type=int, default=1)
    rank.add_argument("--schedule", default="gpipe")
    rank.add_argument("--batch", type=int, default=64)
    rank.add_argument("--steps", type=int, default=30)
    rank.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="two sites, RTT 0 and 20 ms, a few meshsl steps")
    parser.add_argument("--rtt", type=float, nargs="+", help="RTTs in ms (the first is the baseline, usually 0)")
    parser.add_argument("--rate-mbit", type=float, default=100.0)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--staleness", type=int, nargs="+", help=f"latency-hiding rows (default {STALENESS})")
    parser.add_argument("--only-staleness", action="store_true", help="only the latency-hiding rows (and k = 0)")
    args = parser.parse_args(argv)
    if args.command == "torch-rank":
        torch_rank(args)
        return
    import signal
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # still tear the namespaces down
    result = measure(args.quick, args.rtt, args.rate_mbit, args.repeats, args.staleness, args.only_staleness,
                     args.smoke)
    print(table(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
