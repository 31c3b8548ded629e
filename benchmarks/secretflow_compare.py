"""meshsl against SecretFlow 1.13 split learning (SLModel, torch backend, simulation on local Ray), side by side.

The same tasks, data, split, models and optimizer on the same machine, alternating: in each round every
case runs once on each side, meshsl first in even rounds and SecretFlow first in odd ones, so that load from
other work hits both alike. Cases:

- vanilla:  topologies/vanilla.yaml (digits; client: pixels + bottom, server: top + labels);
- vertical: topologies/vertical.yaml (breast cancer; two feature parties, labels at the lab);
- wide:     vanilla.yaml with hidden width 1024 (bottom 64-1024-1024, top 1024-1024-10); full mode also
            runs it at M=1 on meshsl's side (vanilla.yaml trains at M=4, 1F1B).

Per run: samples/s as each framework reports its training (meshsl: the coordinator's training seconds;
SecretFlow: `SLModel.fit` wall time), start-to-finish seconds of the user's command (`meshsl run ...`
against `python sf_split_learning.py ...`: imports, start-up, training, evaluation, shut-down), memory
of every process of the run (polled from /proc: the sum of each process's peak RSS, and the peak of the
summed PSS, which counts shared pages once) and held-out accuracy. Reported: medians over rounds of each
figure, and every ratio as the median of the rounds' own ratios (both figures of a ratio come from the
same round), with each round's ratio.

SecretFlow lives in its own interpreter (it needs its own pins, see benchmarks/secretflow_peer/INSTALL.md):

    MESHSL_SECRETFLOW_PYTHON=/work/sfvenv/bin/python python -m benchmarks --only secretflow [--quick]
    MESHSL_SECRETFLOW_PYTHON=... python -m benchmarks.secretflow_compare --rounds 3 --out runs/sf.json

Without that variable (or with an interpreter that cannot import SecretFlow) the section is skipped with
a message saying why.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import yaml

ROOT = Path(__file__).resolve().parent.parent
PEER_DIR = Path(__file__).resolve().parent / "secretflow_peer"
PEER_SCRIPT = PEER_DIR / "sf_split_learning.py"
ENV_VAR = "MESHSL_SECRETFLOW_PYTHON"
INSTALL_HINT = "see benchmarks/secretflow_peer/INSTALL.md"


# -- the peer's interpreter ---------------------------------------------------------------------------
def find_peer(timeout: float = 300.0) -> tuple[Optional[str], str]:
    """(interpreter, SecretFlow version) or (None, why not). Importing SecretFlow takes seconds."""
    python = os.environ.get(ENV_VAR, "").strip()
    if not python:
        return None, f"SecretFlow not configured: set {ENV_VAR} to the python of a SecretFlow 1.13 venv ({INSTALL_HINT})"
    if not (os.path.isfile(python) and os.access(python, os.X_OK)):
        return None, f"{ENV_VAR}={python}: no executable there ({INSTALL_HINT})"
    probe = "import secretflow, secretflow_fl.ml.nn; print(secretflow.__version__)"
    try:
        proc = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=timeout,
                              env=_peer_env(), cwd=tempfile.gettempdir())
    except subprocess.TimeoutExpired:
        return None, f"{ENV_VAR}={python}: importing SecretFlow took over {timeout:.0f}s"
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return None, f"{ENV_VAR}={python} cannot import SecretFlow's SLModel: {last} ({INSTALL_HINT})"
    return python, proc.stdout.strip().splitlines()[-1]


def _peer_env() -> dict:
    """The caller's environment without what points at meshsl's own venv. Ray starts its workers 15 nice
    levels below the driver (its `worker_niceness`); on a machine shared with other work that would starve
    SecretFlow's compute against meshsl's nodes, which run at the caller's priority: set to 0, like Ray's
    own job supervisor does. On an idle machine it changes nothing."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.setdefault("RAY_worker_niceness", "0")
    return env


# -- memory of a process tree -------------------------------------------------------------------------
def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                stat = handle.read()
        except OSError:
            continue
        # the command name (field 2) may hold spaces and parentheses: the parent pid follows the last ")"
        ppid = int(stat[stat.rfind(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def _descendants(root: int) -> list[int]:
    children, out, todo = _children_map(), [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process so far; 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime (fields 14 and 15 of stat)
    except (OSError, ValueError, IndexError):
        return 0.0


def _runqueue_wait_s(pid: int) -> float:
    """Seconds one process has spent runnable but waiting for a CPU (schedstat's run delay); 0 if unknown."""
    try:
        with open(f"/proc/{pid}/schedstat") as handle:
            return int(handle.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


def _memory_kib(pid: int) -> tuple[int, int, str]:
    """(peak RSS, current PSS) in KiB and the command name of one process; zeros when it is gone."""
    hwm = pss = 0
    name = ""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("Name:"):
                    name = line.split(None, 1)[1].strip()
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
                    break
    except (OSError, ValueError):
        pass
    return hwm, pss, name


class TreeMemory:
    """Polls every process descending from `root`: each one's peak RSS (VmHWM, kept from its last reading)
    and the peak over time of the summed PSS (shared pages such as libtorch's counted once); also each
    one's CPU seconds (the steadier figure on a loaded machine; a process's last interval may be missed)."""

    def __init__(self, root: int, interval: float = 0.25) -> None:
        self.root, self.interval = root, interval
        self.peak_rss_kib: dict[int, int] = {}
        self.names: dict[int, str] = {}
        self.cpu_s: dict[int, float] = {}
        self.wait_s: dict[int, float] = {}
        self.peak_pss_sum_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self.interval):
                return

    def sample(self) -> list[int]:
        pids = _descendants(self.root)
        pss_sum = 0
        for pid in pids:
            hwm, pss, name = _memory_kib(pid)
            if hwm:
                self.peak_rss_kib[pid] = max(self.peak_rss_kib.get(pid, 0), hwm)
                self.names.setdefault(pid, name)
            self.cpu_s[pid] = max(self.cpu_s.get(pid, 0.0), _cpu_seconds(pid))
            self.wait_s[pid] = max(self.wait_s.get(pid, 0.0), _runqueue_wait_s(pid))
            pss_sum += pss
        self.peak_pss_sum_kib = max(self.peak_pss_sum_kib, pss_sum)
        return pids

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join(timeout=5)
        return {"peak_rss_sum_mib": round(sum(self.peak_rss_kib.values()) / 1024, 1),
                "peak_pss_sum_mib": round(self.peak_pss_sum_kib / 1024, 1),
                "processes": len(self.peak_rss_kib), "cpu_s": round(sum(self.cpu_s.values()), 2),
                "runqueue_wait_s": round(sum(self.wait_s.values()), 2),
                "process_names": sorted(set(self.names.values()))}


def run_measured(cmd: list[str], cwd: Path, env: dict, timeout: float) -> tuple[subprocess.CompletedProcess, float, dict]:
    """Run `cmd` in a session of its own; wall seconds and the memory of its whole process tree. Whatever
    of the tree outlives it (a framework's daemons) is stopped by process id afterwards."""
    load = os.getloadavg()[0]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    memory = TreeMemory(proc.pid)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        out, err = "", f"timed out after {timeout:.0f}s"
        proc.returncode = 124
    wall = time.perf_counter() - started
    leftovers = [p for p in memory.sample() if p != proc.pid]
    result = memory.stop()
    _stop_tree(proc, leftovers)
    result["load_avg_1m"] = load
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), wall, result


def _stop_tree(proc: subprocess.Popen, pids: list[int]) -> None:
    for pid in [proc.pid, *pids]:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


# -- the cases ----------------------------------------------------------------------------------------
def _vanilla() -> dict:
    return yaml.safe_load((ROOT / "topologies" / "vanilla.yaml").read_text())


def _wide(hidden: int = 1024, micro_batches: Optional[int] = None) -> dict:
    document = _vanilla()
    document["name"] = f"vanilla-digits-hidden{hidden}"
    segments = {s["name"]: s for s in document["segments"]}
    segments["bottom"]["layers"] = [["Linear", 64, hidden], ["ReLU"], ["Linear", hidden, hidden], ["ReLU"]]
    segments["top"]["layers"] = [["Linear", hidden, hidden], ["ReLU"], ["Linear", hidden, 10]]
    if micro_batches:
        document["training"]["micro_batches"] = micro_batches
    return document


CASES: dict[str, dict] = {
    "vanilla": {"label": "vanilla.yaml (digits)", "task": "digit", "peer_args": ["--task", "digits"],
                "meshsl": {"M=4 1f1b": lambda: _vanilla()}},
    "vertical": {"label": "vertical.yaml (breast cancer, 3 parties)", "task": "cancer",
                 "peer_args": ["--task", "vertical"],
                 "meshsl": {"M=2 gpipe": lambda: yaml.safe_load((ROOT / "topologies" / "vertical.yaml").read_text())}},
    "wide": {"label": "vanilla.yaml, hidden 1024", "task": "digit", "peer_args": ["--task", "digits", "--hidden", "1024"],
             "meshsl": {"M=4 1f1b": lambda: _wide(), "M=1": lambda: _wide(micro_batches=1)}},
}


def steady_rate(log_lines, batch_size: int) -> Optional[float]:
    """Samples/s after the first epoch, from the coordinator's "step committed" log lines (INFO), the way
    the peer's script reports SecretFlow's (epochs 2..n): the first epoch carries one-off costs (lazy
    imports on the first step, warm-up). Evaluation rounds between epochs stay in, against meshsl."""
    from datetime import datetime
    commits = []
    for line in log_lines:
        if " step committed" not in line:
            continue
        fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
        if "epoch" in fields:
            stamp = datetime.fromisoformat(line.split(" ", 1)[0].rstrip("Z")).timestamp()
            commits.append((stamp, int(fields["epoch"])))
    first_epoch_end = max((t for t, e in commits if e == 0), default=None)
    later = [t for t, e in commits if e > 0]
    if first_epoch_end is None or not later or later[-1] <= first_epoch_end:
        return None
    return len(later) * batch_size / (later[-1] - first_epoch_end)


def run_meshsl(document: dict, task: str, timeout: float = 600.0) -> dict:
    """`meshsl run T.yaml` as a user runs it: every node its own process, real ZeroMQ on loopback. INFO
    logging (one line per committed step on the coordinator) gives the steady rate after the first epoch."""
    with tempfile.TemporaryDirectory(prefix="meshsl-vs-sf-") as tmp:
        topology = Path(tmp) / "topology.yaml"
        topology.write_text(yaml.safe_dump(document, sort_keys=False))
        summary_path = Path(tmp) / "summary.json"
        cmd = [sys.executable, "-m", "meshsl", "run", str(topology), "--free-ports", "--no-progress", "--log-level", "INFO",
               "--summary-json", str(summary_path), "--run-dir", str(Path(tmp) / "run")]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        proc, wall, memory = run_measured(cmd, ROOT, env, timeout)
        if proc.returncode != 0 or not summary_path.exists():
            return {"error": f"meshsl run exited {proc.returncode}: {(proc.stderr or proc.stdout)[-600:]}", **memory}
        summary = json.loads(summary_path.read_text())
        lines = [line for log in (Path(tmp) / "run").glob("*.log") for line in log.read_text(errors="replace").splitlines()]
    evaluation = summary["tasks"][task]["eval"]
    steady = steady_rate(lines, document["training"]["batch_size"])
    return {"samples_per_s": summary["samples_per_s"], "wall_s": wall, "accuracy": evaluation.get("accuracy"),
            "samples": summary["samples"], "steps": summary["steps"], "steady_samples_per_s": steady,
            "train_seconds_reported":
            summary["samples"] / summary["samples_per_s"] if summary["samples_per_s"] else None, **memory}


def run_secretflow(python: str, peer_args: list[str], timeout: float = 900.0) -> dict:
    """The peer's script (same data, split, models, optimizer) in SecretFlow's own interpreter."""
    with tempfile.TemporaryDirectory(prefix="sf-vs-meshsl-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [python, str(PEER_SCRIPT), *peer_args, "--out", str(out)]
        proc, wall, memory = run_measured(cmd, Path(tmp), _peer_env(), timeout)
        if proc.returncode != 0 or not out.exists():
            return {"error": f"SecretFlow exited {proc.returncode}: {(proc.stderr or proc.stdout)[-600:]}", **memory}
        result = json.loads(out.read_text())
    phases = {k: result.get(k) for k in ("import_seconds", "init_seconds", "build_seconds", "workers_ready_seconds",
                                          "train_seconds", "eval_seconds", "script_seconds")}
    return {"samples_per_s": result["samples_per_s"], "wall_s": wall, "accuracy": result["accuracy"],
            "samples": result["samples"], "test_rows": result["test_rows"], "version": result["version"],
            "steady_samples_per_s": result.get("steady_samples_per_s"), "phases": phases, **memory}


# -- the comparison -----------------------------------------------------------------------------------
def _median(rows: list[dict], key: str) -> Optional[float]:
    values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return statistics.median(values) if values else None


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a and b else None


def summarise(case: str, meshsl_runs: dict[str, list[dict]], peer_runs: list[dict]) -> list[dict]:
    """One row per meshsl configuration of `case` against the SecretFlow runs of the same rounds."""
    rows = []
    test_rows = next((r["test_rows"] for r in peer_runs if "test_rows" in r), None)
    for variant, runs in meshsl_runs.items():
        pairs = [(m, s) for m, s in zip(runs, peer_runs) if "error" not in m and "error" not in s]
        med = {side: {k: _median(rs, k) for k in ("samples_per_s", "steady_samples_per_s", "wall_s", "peak_rss_sum_mib",
                                                   "peak_pss_sum_mib", "accuracy", "processes", "cpu_s", "runqueue_wait_s")}
               for side, rs in (("meshsl", runs), ("secretflow", peer_runs))}
        accuracy_gap = None
        if test_rows and med["meshsl"]["accuracy"] is not None and med["secretflow"]["accuracy"] is not None:
            accuracy_gap = round(abs(med["meshsl"]["accuracy"] - med["secretflow"]["accuracy"]) * test_rows, 1)
        def per_round(key: str, mine_over_theirs: bool) -> list[float]:
            pairs_with = [(m.get(key), s.get(key)) for m, s in pairs]
            return [round((a / b) if mine_over_theirs else (b / a), 2) for a, b in pairs_with if a and b]

        def ratio(key: str, mine_over_theirs: bool) -> Optional[float]:
            """The median of the rounds' own ratios: both figures of each from the same round."""
            values = per_round(key, mine_over_theirs)
            return statistics.median(values) if values else None

        rows.append({
            "case": case, "label": CASES[case]["label"], "meshsl_config": variant, "rounds": len(runs),
            "meshsl": med["meshsl"], "secretflow": med["secretflow"],
            "speedup_samples_per_s": ratio("samples_per_s", True),
            "speedup_steady": ratio("steady_samples_per_s", True),
            "speedup_wall": ratio("wall_s", False),
            "cpu_ratio": ratio("cpu_s", False),
            "memory_ratio_rss": ratio("peak_rss_sum_mib", False),
            "memory_ratio_pss": ratio("peak_pss_sum_mib", False),
            "ratio_of_median_samples_per_s": _ratio(med["meshsl"]["samples_per_s"], med["secretflow"]["samples_per_s"]),
            "per_round_speedup": per_round("samples_per_s", True),
            "per_round_wall_speedup": per_round("wall_s", False),
            "accuracy_gap_held_out_samples": accuracy_gap, "test_rows": test_rows,
            "errors": [r["error"] for r in [*runs, *peer_runs] if "error" in r],
        })
    return rows


def compare(python: str, rounds: int, cases: list[str], variants: bool = True,
            on_run: Optional[Callable[[str, dict], None]] = None) -> dict:
    meshsl_runs = {c: {v: [] for v in (CASES[c]["meshsl"] if variants else list(CASES[c]["meshsl"])[:1])}
                   for c in cases}
    peer_runs: dict[str, list[dict]] = {c: [] for c in cases}
    loads = []
    for round_ in range(rounds):
        for case in cases:
            spec = CASES[case]

            def mine():
                for variant in meshsl_runs[case]:
                    row = run_meshsl(spec["meshsl"][variant](), spec["task"])
                    row["round"] = round_
                    meshsl_runs[case][variant].append(row)
                    loads.append(row["load_avg_1m"])
                    if on_run:
                        on_run(f"meshsl {case} {variant} round {round_}", row)

            def theirs():
                row = run_secretflow(python, spec["peer_args"])
                row["round"] = round_
                peer_runs[case].append(row)
                loads.append(row["load_avg_1m"])
                if on_run:
                    on_run(f"secretflow {case} round {round_}", row)

            for side in ((mine, theirs) if round_ % 2 == 0 else (theirs, mine)):
                side()
    rows = [row for case in cases for row in summarise(case, meshsl_runs[case], peer_runs[case])]
    return {"rows": rows, "runs": {"meshsl": meshsl_runs, "secretflow": peer_runs}, "rounds": rounds,
            "load_avg_1m": {"min": min(loads), "median": statistics.median(loads), "max": max(loads)} if loads else None}


def meshsl_half(python: Optional[str], version: str) -> dict:
    """The meshsl half alone, as the comparison runs it (`meshsl run` of vanilla.yaml, here for 2 epochs),
    summarised and tabled against no SecretFlow run: SecretFlow's side (Ray's start-up alone) outlasts a
    smoke run, so it is not run even where configured; `secretflow` says whether it is at hand."""
    document = _vanilla()
    document["training"]["epochs"] = 2  # the steady rate is read after the first epoch
    variant, spec = next(iter(CASES["vanilla"]["meshsl"])), CASES["vanilla"]
    row = dict(run_meshsl(document, spec["task"]), round=0)
    return {"rows": summarise("vanilla", {variant: [row]}, []), "runs": {"meshsl": {"vanilla": {variant: [row]}}},
            "rounds": 1, "load_avg_1m": {"min": row["load_avg_1m"], "median": row["load_avg_1m"],
                                         "max": row["load_avg_1m"]},
            "secretflow": f"not run in smoke mode ({version} at {python})" if python else version}


def measure(quick: bool = False, smoke: bool = False) -> dict:
    python, version = find_peer()
    if smoke:
        return meshsl_half(python, version)
    if python is None:
        return {"skipped": version}
    if quick:  # a smoke run: one round of the vanilla task
        result = compare(python, rounds=1, cases=["vanilla"], variants=False, on_run=_progress)
    else:
        result = compare(python, rounds=3, cases=list(CASES), on_run=_progress)
    result["secretflow_version"] = version
    result["secretflow_python"] = python
    return result


def _progress(what: str, row: dict) -> None:
    brief = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
             if k in ("samples_per_s", "steady_samples_per_s", "wall_s", "peak_rss_sum_mib", "peak_pss_sum_mib", "processes", "accuracy",
                      "cpu_s", "runqueue_wait_s", "load_avg_1m", "error")}
    print(what, json.dumps(brief), file=sys.stderr, flush=True)


def table(result: dict) -> str:
    if result.get("skipped"):
        return f"SecretFlow comparison | skipped: {result['skipped']}"
    fmt = lambda v, spec=",.0f": format(v, spec) if isinstance(v, (int, float)) else "-"
    load = result.get("load_avg_1m") or {}
    lines = [f"vs SecretFlow {result.get('secretflow_version', '')} SLModel (torch, Ray simulation); medians of "
             f"{result['rounds']} alternating rounds; load avg {fmt(load.get('min'), '.1f')}-{fmt(load.get('max'), '.1f')}"
             f" (median {fmt(load.get('median'), '.1f')})",
             "task | meshsl | samples/s meshsl / SF | x (per round) | after epoch 1 meshsl / SF | x | "
             "start-to-finish s meshsl / SF | x | "
             "CPU s meshsl / SF | x | peak RSS sum MiB meshsl / SF (processes) | peak PSS MiB meshsl / SF | "
             "accuracy meshsl / SF (samples apart)"]
    for r in result["rows"]:
        m, s = r["meshsl"], r["secretflow"]
        lines.append(
            f"{r['label']} | {r['meshsl_config']} | {fmt(m['samples_per_s'])} / {fmt(s['samples_per_s'])} | "
            f"{fmt(r['speedup_samples_per_s'], '.1f')} ({', '.join(str(x) for x in r['per_round_speedup'])}) | "
            f"{fmt(m.get('steady_samples_per_s'))} / {fmt(s.get('steady_samples_per_s'))} | "
            f"{fmt(r.get('speedup_steady'), '.1f')} | "
            f"{fmt(m['wall_s'], '.1f')} / {fmt(s['wall_s'], '.1f')} | {fmt(r['speedup_wall'], '.1f')} | "
            f"{fmt(m.get('cpu_s'), '.1f')} / {fmt(s.get('cpu_s'), '.1f')} | {fmt(r.get('cpu_ratio'), '.1f')} | "
            f"{fmt(m['peak_rss_sum_mib'])} ({fmt(m['processes'], '.0f')}) / {fmt(s['peak_rss_sum_mib'])} "
            f"({fmt(s['processes'], '.0f')}) | {fmt(m['peak_pss_sum_mib'])} / {fmt(s['peak_pss_sum_mib'])} | "
            f"{fmt(m['accuracy'], '.3f')} / {fmt(s['accuracy'], '.3f')} ({fmt(r['accuracy_gap_held_out_samples'], '.0f')})"
            + (f" | errors: {len(r['errors'])}" if r["errors"] else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.secretflow_compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--no-variants", action="store_true", help="meshsl: only the topology's own micro-batching")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    python, version = find_peer()
    if python is None:
        print(table({"skipped": version}))
        return 0

    done: list = []

    def progress(what: str, row: dict) -> None:
        _progress(what, row)
        if args.out:  # every run as it finishes, so that an interrupted comparison keeps what it measured
            done.append({"run": what, **row})
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.with_suffix(".partial.json").write_text(json.dumps(done, indent=1, default=str))

    result = compare(python, args.rounds, args.cases, variants=not args.no_variants, on_run=progress)
    result.update(secretflow_version=version, secretflow_python=python)
    print(table(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1, default=str))
        print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
