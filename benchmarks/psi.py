"""The PSI step: meshsl's sample-id alignment against openmined-psi used directly.

For n ids per party (70 % of them common, string ids, each party in its own order):
- library: openmined-psi's own two-party flow in one process (server setup over its ids, RAW table;
  client request; server response; client intersection), every message serialized and parsed as it
  would be to cross a wire; only the client learns the intersection;
- meshsl: `meshsl.align.session` between two real processes (leader and member) over meshsl's ZeroMQ
  transport on loopback (no CURVE), from the first blinding to both parties holding the common ids in
  the agreed order (both learn them).
Both do the same elliptic-curve work (four exponentiations per id pair). Reported per size: wall
seconds of each, their ratio, and the CPU seconds of each (both meshsl processes together), whose
ratio is steadier on a shared machine than wall time.

    python -m benchmarks.psi --sizes 10000 100000 1000000      # 10^6: minutes on 2 cores
    python -m benchmarks --only psi [--quick]                   # quick: 10^4 and 10^5
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OVERLAP = 0.7


def party_ids(n: int, party: int, seed: int = 16) -> list[str]:
    """n ids for party 0 or 1: the first 70 % of a shared pool plus ids of its own, shuffled."""
    common = int(n * OVERLAP)
    ids = [f"patient-{seed}-{k:09d}" for k in range(common)]
    ids += [f"patient-{seed}-p{party}-{k:09d}" for k in range(n - common)]
    random.Random(seed * 10 + party).shuffle(ids)
    return ids


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def library_alone(n: int) -> dict:
    import private_set_intersection.python as psi
    server_ids, client_ids = party_ids(n, 0), party_ids(n, 1)
    started, cpu = time.perf_counter(), _cpu()
    server = psi.server.CreateWithNewKey(True)
    client = psi.client.CreateWithNewKey(True)
    setup_bytes = server.CreateSetupMessage(1e-9, len(client_ids), server_ids, psi.DataStructure.RAW).SerializeToString()
    request_bytes = client.CreateRequest(client_ids).SerializeToString()
    request = psi.Request()
    request.ParseFromString(request_bytes)
    response_bytes = server.ProcessRequest(request).SerializeToString()
    setup, response = psi.ServerSetup(), psi.Response()
    setup.ParseFromString(setup_bytes)
    response.ParseFromString(response_bytes)
    common = client.GetIntersection(setup, response)
    wall, cpu = time.perf_counter() - started, _cpu() - cpu
    assert len(common) == int(n * OVERLAP)
    return {"wall_s": wall, "cpu_s": cpu, "bytes": len(setup_bytes) + len(request_bytes) + len(response_bytes)}


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


async def _party(role: str, n: int, book: dict[str, str]) -> dict:
    from meshsl.align.session import Session
    from meshsl.transport.zmq_backend import ZmqTransport
    ids = party_ids(n, 0 if role == "leader" else 1)
    transport = ZmqTransport(role, book[role], book)
    await transport.start()
    try:
        session = Session(transport, role, "bench-psi", "leader", ["leader", "member"], [], timeout_s=3600)
        started, cpu = time.time(), _cpu()
        outcome = await session.run(ids)
        return {"start": started, "end": time.time(), "cpu_s": _cpu() - cpu, "size": outcome.size}
    finally:
        await transport.close()


def meshsl_alignment(n: int) -> dict:
    ports = _free_ports(2)
    book = {"leader": f"tcp://127.0.0.1:{ports[0]}", "member": f"tcp://127.0.0.1:{ports[1]}"}
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    processes = [subprocess.Popen([sys.executable, "-m", "benchmarks.psi", "--party", role, "--n", str(n),
                                   "--book", json.dumps(book)], stdout=subprocess.PIPE, env=env, cwd=ROOT)
                 for role in ("leader", "member")]
    results = []
    for p in processes:
        out, _ = p.communicate(timeout=7200)
        if p.returncode != 0:
            raise RuntimeError(f"PSI party exited with {p.returncode}")
        results.append(json.loads(out.decode().strip().splitlines()[-1]))
    assert all(r["size"] == int(n * OVERLAP) for r in results)
    return {"wall_s": max(r["end"] for r in results) - min(r["start"] for r in results),
            "cpu_s": sum(r["cpu_s"] for r in results)}


def measure(quick: bool = False, sizes: list[int] | None = None, on_row=None, smoke: bool = False) -> list[dict]:
    """One row per size; `on_row(rows so far)` after each (the 10^6 row takes minutes). `smoke`: 400 ids."""
    rows = []
    for n in sizes or ([400] if smoke else [10_000, 100_000] if quick else [10_000, 100_000, 1_000_000]):
        print(f"   psi n={n:,} ...", file=sys.stderr, flush=True)
        library = library_alone(n)
        ours = meshsl_alignment(n)
        rows.append({"ids_per_party": n, "common": int(n * OVERLAP),
                     "library_wall_s": round(library["wall_s"], 3), "meshsl_wall_s": round(ours["wall_s"], 3),
                     "ratio_wall": round(ours["wall_s"] / library["wall_s"], 3),
                     "library_cpu_s": round(library["cpu_s"], 3), "meshsl_cpu_s": round(ours["cpu_s"], 3),
                     "ratio_cpu": round(ours["cpu_s"] / library["cpu_s"], 3),
                     "library_bytes": library["bytes"], "load_avg_1m": os.getloadavg()[0]})
        if on_row is not None:
            on_row(rows)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["PSI step (2 parties, 70 % overlap) | library wall s | meshsl wall s | ratio | library CPU s | "
             "meshsl CPU s | ratio"]
    for r in rows:
        lines.append(f"{r['ids_per_party']:,} ids per party | {r['library_wall_s']:.2f} | {r['meshsl_wall_s']:.2f} | "
                     f"{r['ratio_wall']:.2f} | {r['library_cpu_s']:.2f} | {r['meshsl_cpu_s']:.2f} | {r['ratio_cpu']:.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.psi", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--party", choices=["leader", "member"], help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--book", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.party:  # one side of the meshsl measurement, started by meshsl_alignment
        print(json.dumps(asyncio.run(_party(args.party, args.n, json.loads(args.book)))))
        return 0
    def save(rows: list[dict]) -> None:
        print(table(rows[-1:]).splitlines()[-1], flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(rows, indent=1))

    rows = measure(sizes=args.sizes, on_row=save)
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
