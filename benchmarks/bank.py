"""Bank-scale vertical split learning: SecretFlow's published benchmark shape on one machine.

SecretFlow's split-learning benchmark (overall_benchmark.md, 2024-02-21) gives two parties 800,000 rows x
1,500 features each (the first holds the label; three parties: 800,000 x 1,000 each) over a 100 Mbit/s,
50 ms link, and reports the time to train a split DNN to a train AUC within 0.02 of the same model in
the clear. Here every party runs on this machine, each in its own network namespace behind the same
emulated link (benchmarks/wan.py), reading its own Parquet file.

    python -m benchmarks.bank generate --parties 2 --rows 800000 --features 1500 --out runs/bank-data/2x800000x1500
    sudo python -m benchmarks.bank [--quick] [--shapes 2x800000x1500 3x800000x1000] [--out runs/bank.json]
    python -m benchmarks --only bank [--quick]

Reported per shape: load time per party (meshsl's Parquet reader against pyarrow's own read_table of the
same file, and CSV where generated), peak memory per party against its float32 feature matrix, time from
process start to the end of training, the train AUC against the same model trained in one process in the
clear, samples/s, bytes on the wire per epoch, and the time to predict every training row.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "runs" / "bank-data"
NODE_PORT = 7600
INFORMATIVE = 24  # columns per party that carry the signal
SECRETFLOW = {  # overall_benchmark.md (2024-02-21), 32 vCPUs per party, 100 Mbit/s, 50 ms
    2: {"train_s": 6844, "predict_s": 5}, 3: {"train_s": 2477, "predict_s": 3}}
FULL_SHAPES = ((2, 800_000, 1_500), (3, 800_000, 1_000))
QUICK_SHAPES = ((2, 20_000, 150), (3, 20_000, 100))
# smoke (does every part still run?): one small table pair (the split model still learns what the clear
# one does: tests/integration/test_benchmarks_quick.py checks it), party 0's Parquet and CSV loaded once each, no
# out-of-core run (a memory cgroup, a dropped page cache: tests/e2e/test_out_of_core.py runs it at --quick size).
SMOKE_SHAPE = (2, 6_000, 40)
HIDDEN = 64  # each party's bottom: Linear(features, 64) + ReLU; the top: Linear(64 * parties, 64), ReLU, Linear(64, 2)


# ---- synthetic vertical tables with a known signal -----------------------------------------------
def teacher(parties: int, features: int, seed: int = 7) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    weights = []
    for _ in range(parties):
        w = np.zeros(features, np.float32)
        w[:INFORMATIVE] = rng.standard_normal(INFORMATIVE) / np.sqrt(INFORMATIVE * parties)
        weights.append(w)
    return weights


def generate(parties: int, rows: int, features: int, out: Path, csv_rows: int = 0, block: int = 65_536) -> dict:
    """One Parquet file per party (party 0 also holds `label`); labels from a logistic teacher over every
    party's informative columns, so no party alone predicts well. `csv_rows` > 0: party 0's first rows
    also as CSV (for the CSV load comparison)."""
    import pyarrow as pa
    import pyarrow.csv as pa_csv
    import pyarrow.parquet as pq
    out.mkdir(parents=True, exist_ok=True)
    weights = teacher(parties, features)
    names = [[f"p{p}_f{j}" for j in range(features)] for p in range(parties)]
    writers = [pq.ParquetWriter(out / f"party{p}.parquet",
                                pa.schema([(n, pa.float32()) for n in names[p]]
                                          + ([("label", pa.int8())] if p == 0 else [])),
                                compression="snappy", use_dictionary=False) for p in range(parties)]
    csv_writer = None
    rng = np.random.default_rng(11)
    positives = 0
    start = time.perf_counter()
    for first in range(0, rows, block):
        count = min(block, rows - first)
        blocks = [rng.standard_normal((count, features), dtype=np.float32) for _ in range(parties)]
        logit = sum(b @ w for b, w in zip(blocks, weights)) * 4.0
        label = (rng.random(count) < 1 / (1 + np.exp(-logit))).astype(np.int8)
        positives += int(label.sum())
        for p, (writer, values) in enumerate(zip(writers, blocks)):
            columns = [pa.array(values[:, j]) for j in range(features)]
            table = pa.table(columns + ([pa.array(label)] if p == 0 else []),
                             names=names[p] + (["label"] if p == 0 else []))
            writer.write_table(table, row_group_size=block)
            if p == 0 and first < csv_rows:
                if csv_writer is None:
                    csv_writer = pa_csv.CSVWriter(out / "party0.csv", table.schema)
                csv_writer.write_table(table.slice(0, min(count, csv_rows - first)))
        del blocks
    for writer in writers:
        writer.close()
    if csv_writer is not None:
        csv_writer.close()
    meta = {"parties": parties, "rows": rows, "features": features, "positives": positives,
            "csv_rows": min(csv_rows, rows), "seconds": round(time.perf_counter() - start, 1)}
    (out / "meta.json").write_text(json.dumps(meta))
    return meta


def dataset_dir(parties: int, rows: int, features: int, csv_rows: int) -> Path:
    folder = DATA / f"{parties}x{rows}x{features}"
    meta = folder / "meta.json"
    if not meta.exists() or json.loads(meta.read_text()).get("csv_rows", 0) < min(csv_rows, rows):
        print(f"generating {folder} ...", file=sys.stderr, flush=True)
        generate(parties, rows, features, folder, csv_rows)
    return folder


# ---- loading: meshsl's readers against pyarrow's own ----------------------------------------------
LOAD_PROBE = """
import json, sys, time
import pyarrow.csv as pc, pyarrow.parquet as pq
from meshsl.config.specs import DatasetSpec
from meshsl.data import Selection, load_dataset
from meshsl.data import arrow_files  # imported before the clock starts, as pyarrow is
import torch  # a node process has it loaded before it reads its data
kind, path, label = sys.argv[1], sys.argv[2], sys.argv[3] or None
def hwm_mib():  # VmHWM: reset at exec, unlike ru_maxrss
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) / 1024
base = hwm_mib()
start = time.perf_counter()
if kind == "pyarrow-parquet":
    t = pq.read_table(path); rows = t.num_rows
elif kind == "pyarrow-csv":
    t = pc.read_csv(path); rows = t.num_rows
else:
    options = {"path": path, **({"label_column": label} if label else {})}
    t = load_dataset(DatasetSpec(name=kind, options=options), "/", Selection()); rows = len(t.features)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "rows": rows, "peak_rss_mib": hwm_mib(), "baseline_rss_mib": base}))
"""


def load_once(kind: str, path: Path, label: Optional[str]) -> dict:
    out = subprocess.run([sys.executable, "-c", LOAD_PROBE, kind, str(path), label or ""], cwd=ROOT,
                         capture_output=True, text=True, timeout=1800, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if out.returncode != 0:
        raise RuntimeError(f"{kind} load of {path} failed: {out.stderr[-1500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare_load(path: Path, fmt: str, label: Optional[str], features: int, repeats: int) -> dict:
    """Alternating runs (warm page cache for both), best of each: meshsl's reader / pyarrow's read."""
    subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)  # warm the page cache
    ours, theirs = [], []
    for _ in range(repeats):
        theirs.append(load_once(f"pyarrow-{fmt}", path, label))
        ours.append(load_once(fmt, path, label))
    best_ours = min(ours, key=lambda r: r["seconds"])
    best_theirs = min(theirs, key=lambda r: r["seconds"])
    matrix_mib = best_ours["rows"] * features * 4 / 2**20
    return {"file": path.name, "format": fmt, "file_mib": round(path.stat().st_size / 2**20),
            "meshsl_s": round(best_ours["seconds"], 2), "pyarrow_s": round(best_theirs["seconds"], 2),
            "ratio": round(best_ours["seconds"] / best_theirs["seconds"], 3),
            "meshsl_runs_s": [round(r["seconds"], 2) for r in ours],
            "pyarrow_runs_s": [round(r["seconds"], 2) for r in theirs],
            "meshsl_peak_rss_mib": round(best_ours["peak_rss_mib"]),
            "pyarrow_peak_rss_mib": round(best_theirs["peak_rss_mib"]),
            "float32_matrix_mib": round(matrix_mib),
            "within_memory_bound": best_ours["peak_rss_mib"] <= 1.3 * matrix_mib + 1024}


# ---- the split run ---------------------------------------------------------------------------------
def topology_document(folder: Path, parties: int, features: int, addresses: list[str], epochs: int,
                      batch_size: int, micro_batches: int, lr: float) -> dict:
    nodes = [{"name": f"party{p}", "endpoint": f"tcp://{addresses[p]}:{NODE_PORT + p}", "party": f"bank{p}",
              "threads": 1} for p in range(parties)]
    data = [{"name": f"features{p}", "node": f"party{p}",
             "dataset": {"name": "parquet", "test_fraction": 0.0,
                         "options": {"path": str(folder / f"party{p}.parquet"),
                                     **({"label_column": "label"} if p == 0 else {})}}}
            for p in range(parties)]
    data.append({"name": "label", "node": "party0", "kind": "labels",
                 "dataset": {"name": "parquet", "test_fraction": 0.0,
                             "options": {"path": str(folder / "party0.parquet"), "label_column": "label"}}})
    segments = [{"name": f"bottom{p}", "node": f"party{p}", "inputs": [f"features{p}"],
                 "layers": [["Linear", features, HIDDEN], ["ReLU"]]} for p in range(parties)]
    segments.append({"name": "top", "node": "party0", "inputs": [f"bottom{p}" for p in range(parties)],
                     "merge": "concat", "layers": [["Linear", HIDDEN * parties, HIDDEN], ["ReLU"],
                                                   ["Linear", HIDDEN, 2]]})
    privacy = [{"segment": f"bottom{p}", "forward": {"codec": "bf16"}, "backward": {"codec": "bf16"}}
               for p in range(1, parties)]
    return {"name": f"bank-{parties}x{features}", "nodes": nodes, "data": data, "segments": segments,
            "tasks": [{"name": "default", "output": "top", "labels": "label", "metrics": ["auroc"]}],
            "privacy": privacy,
            "training": {"epochs": epochs, "batch_size": batch_size, "micro_batches": micro_batches,
                         "schedule": "1f1b", "optimizer": {"name": "adam", "lr": lr}, "seed": 0},
            "retry": {"timeout_s": 600, "heartbeat_timeout_s": 120, "startup_timeout_s": 900}}


def run_split(sites, folder: Path, parties: int, features: int, epochs: int, batch_size: int, micro_batches: int,
              lr: float, work: Path) -> dict:
    """Train across the parties' sites, then predict every training row through the same links."""
    from benchmarks.common import PeakRss
    document = topology_document(folder, parties, features, sites.addresses, epochs, batch_size, micro_batches, lr)
    path = work / "bank.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    names = [n["name"] for n in document["nodes"]]
    weights = work / "weights"
    train = _run_nodes(sites, names, PeakRss, lambda name: [
        "node", name, "--topology", str(path), "--base-dir", str(ROOT), "--no-eval",
        "--summary-json", str(work / f"{name}.json"), "--weights-out", str(weights)], work, "train")
    summary = json.loads((work / "party0.json").read_text())
    predictions = work / "predictions"
    predict = _run_nodes(sites, names, PeakRss, lambda name: [
        "node", name, "--topology", str(path), "--base-dir", str(ROOT), "--predict", "--weights", str(weights),
        "--predict-input", str(folder / f"{name}.parquet"), "--summary-json", str(work / f"predict-{name}.json"),
        *(["--predict-output", str(predictions)] if name == "party0" else [])], work, "predict")
    predict["rounds_seconds"] = round(json.loads((work / "predict-party0.json").read_text())["wall_seconds"], 1)
    return {"train": train, "predict": predict, "summary": summary, "predictions": predictions}


def _run_nodes(sites, names: list[str], peak_rss, args_of, work: Path, phase: str) -> dict:
    from benchmarks.common import kill_left
    procs, rss = {}, peak_rss(interval=0.2).start()
    start = time.perf_counter()
    try:
        for i, name in enumerate(names):
            log = open(work / f"{name}.{phase}.log", "w")
            cmd = sites.exec(sites.names[i], sys.executable, "-m", "meshsl", "--log-level", "warning", *args_of(name))
            procs[name] = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
            rss.pids[name] = procs[name].pid
        for name, proc in procs.items():
            if proc.wait(timeout=7200) != 0:
                tail = (work / f"{name}.{phase}.log").read_text()[-2000:]
                raise RuntimeError(f"{phase}: {name} exited with {proc.returncode}: {tail}")
        seconds = time.perf_counter() - start
    finally:
        peaks = rss.stop()
        kill_left(procs)
    return {"seconds": round(seconds, 1), "peak_rss_mib": peaks}


def train_auc(predictions: Path, folder: Path) -> float:
    import pyarrow.csv as pa_csv
    import pyarrow.parquet as pq
    from sklearn.metrics import roc_auc_score
    files = sorted(predictions.rglob("*.csv"))
    if not files:
        raise RuntimeError(f"no predictions under {predictions}")
    table = pa_csv.read_csv(files[0])
    rows = table.column("row").to_numpy()
    labels = pq.read_table(folder / "party0.parquet", columns=["label"]).column("label").to_numpy()
    return float(roc_auc_score(labels[rows], table.column("prob_1").to_numpy()))


# ---- the same model in the clear, in one process --------------------------------------------------
def clear_main(args) -> None:
    import torch
    from sklearn.metrics import roc_auc_score
    from meshsl.config.specs import DatasetSpec
    from meshsl.data import Selection, load_dataset
    torch.set_num_threads(2)
    torch.manual_seed(0)
    folder = Path(args.folder)
    start = time.perf_counter()
    blocks, labels = [], None
    for p in range(args.parties):
        options = {"path": str(folder / f"party{p}.parquet"), **({"label_column": "label"} if p == 0 else {})}
        table = load_dataset(DatasetSpec(name="parquet", options=options), "/", Selection())
        blocks.append(torch.from_numpy(table.features))
        labels = torch.as_tensor(table.labels) if p == 0 else labels
    loaded = time.perf_counter() - start
    bottoms = [torch.nn.Sequential(torch.nn.Linear(args.features, HIDDEN), torch.nn.ReLU()) for _ in blocks]
    top = torch.nn.Sequential(torch.nn.Linear(HIDDEN * len(blocks), HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, 2))
    params = [p for m in [*bottoms, top] for p in m.parameters()]
    optimizer = torch.optim.Adam(params, lr=args.lr)
    rows = len(labels)
    for _epoch in range(args.epochs):
        order = torch.randperm(rows)
        for first in range(0, rows, args.batch_size):
            index = order[first:first + args.batch_size]
            hidden = torch.cat([b(x[index]) for b, x in zip(bottoms, blocks)], dim=1)
            loss = torch.nn.functional.cross_entropy(top(hidden), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    trained = time.perf_counter() - start
    scores = []
    with torch.no_grad():
        for first in range(0, rows, 65_536):
            hidden = torch.cat([b(x[first:first + 65_536]) for b, x in zip(bottoms, blocks)], dim=1)
            scores.append(top(hidden).softmax(dim=1)[:, 1])
    auc = float(roc_auc_score(labels.numpy(), torch.cat(scores).numpy()))
    print(json.dumps({"auc": auc, "load_s": round(loaded, 1), "train_s": round(trained - loaded, 1)}))


def run_clear(folder: Path, parties: int, features: int, epochs: int, batch_size: int, lr: float) -> dict:
    out = subprocess.run([sys.executable, "-m", "benchmarks.bank", "clear", "--folder", str(folder),
                          "--parties", str(parties), "--features", str(features), "--epochs", str(epochs),
                          "--batch-size", str(batch_size), "--lr", str(lr)],
                         cwd=ROOT, capture_output=True, text=True, timeout=7200)
    if out.returncode != 0:
        raise RuntimeError(f"clear training failed: {out.stderr[-1500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- a party whose table is larger than its memory ----------------------------------------------
def out_of_core_files(folder: Path, rows: int, features: int) -> None:
    """party1.npy: float32 [rows, features] (the big one); party0.parquet: the label and 8 columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    if (folder / "done").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    big = np.lib.format.open_memmap(folder / "party1.npy", mode="w+", dtype=np.float32, shape=(rows, features))
    w = teacher(1, features)[0] * 4.0
    rng = np.random.default_rng(5)
    labels, small = np.empty(rows, np.int8), np.empty((rows, 8), np.float32)
    for first in range(0, rows, 65_536):
        block = rng.standard_normal((min(65_536, rows - first), features), dtype=np.float32)
        big[first:first + len(block)] = block
        labels[first:first + len(block)] = rng.random(len(block)) < 1 / (1 + np.exp(-(block @ w)))
        small[first:first + len(block)] = rng.standard_normal((len(block), 8), dtype=np.float32)
    big.flush()
    del big
    table = pa.table({**{f"s{j}": small[:, j] for j in range(8)}, "label": labels})
    pq.write_table(table, folder / "party0.parquet")
    (folder / "done").write_text("")


def out_of_core_document(folder: Path, ports: tuple[int, int], features: int, steps: int) -> dict:
    return {
        "name": "bank-out-of-core",
        "nodes": [{"name": "party0", "endpoint": f"tcp://127.0.0.1:{ports[0]}", "party": "bank0"},
                  {"name": "party1", "endpoint": f"tcp://127.0.0.1:{ports[1]}", "party": "bank1"}],
        "data": [{"name": "small", "node": "party0", "dataset": {"name": "parquet", "test_fraction": 0.05, "options": {
                      "path": str(folder / "party0.parquet"), "label_column": "label"}}},
                 {"name": "label", "node": "party0", "kind": "labels", "dataset": {
                     "name": "parquet", "test_fraction": 0.05,
                     "options": {"path": str(folder / "party0.parquet"), "label_column": "label"}}},
                 {"name": "big", "node": "party1", "dataset": {"name": "numpy", "test_fraction": 0.05,
                                                              "options": {"path": str(folder / "party1.npy")}}}],
        "segments": [{"name": "bottom1", "node": "party1", "inputs": ["big"],
                      "layers": [["Linear", features, HIDDEN], ["ReLU"]]},
                     {"name": "top", "node": "party0", "inputs": ["bottom1", "small"], "merge": "concat",
                      "layers": [["Linear", HIDDEN + 8, HIDDEN], ["ReLU"], ["Linear", HIDDEN, 2]]}],
        "tasks": [{"name": "default", "output": "top", "labels": "label", "metrics": ["auroc"]}],
        "training": {"steps": steps, "batch_size": 2048, "micro_batches": 2, "schedule": "1f1b",
                     "optimizer": {"name": "adam", "lr": 2e-3}, "seed": 0, "eval_batch_size": 4096},
        "retry": {"timeout_s": 300, "heartbeat_timeout_s": 120, "startup_timeout_s": 300}}


def out_of_core(folder: Path, rows: int, features: int, limit_mib: int, steps: int, work: Path) -> dict:
    """Train with party1 in a cgroup of `limit_mib` while its .npy is larger; then show the limit bites:
    reading the same file into memory under the same limit is killed."""
    from benchmarks.memory_limit import MemoryLimit, drop_page_cache
    from meshsl.launch.launcher import free_port
    out_of_core_files(folder, rows, features)
    path = work / "out_of_core.yaml"
    path.write_text(yaml.safe_dump(out_of_core_document(folder, (free_port(), free_port()), features, steps)))
    drop_page_cache()
    start = time.perf_counter()
    with MemoryLimit(limit_mib << 20) as limit:
        procs = {}
        for name in ("party0", "party1"):
            argv = [sys.executable, "-m", "meshsl", "--log-level", "warning", "node", name, "--topology", str(path),
                    "--summary-json", str(work / f"ooc-{name}.json")]
            log = open(work / f"ooc-{name}.log", "w")
            procs[name] = subprocess.Popen(limit.wrap(argv) if name == "party1" else argv, cwd=ROOT, stdout=log,
                                           stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        codes = {name: proc.wait(timeout=1800) for name, proc in procs.items()}
        seconds = time.perf_counter() - start
        peak, killed = limit.peak_bytes(), limit.oom_killed()
    with MemoryLimit(limit_mib << 20) as control:
        read = subprocess.run(control.wrap([sys.executable, "-c", "import numpy, sys; numpy.load(sys.argv[1]).sum()",
                                            str(folder / "party1.npy")]), capture_output=True)
        control_killed = read.returncode != 0 and control.oom_killed()
    summary = json.loads((work / "ooc-party0.json").read_text()) if codes["party0"] == 0 else {}
    return {"file_mib": round((folder / "party1.npy").stat().st_size / 2**20), "limit_mib": limit_mib,
            "exit_codes": codes, "seconds": round(seconds, 1), "cgroup_peak_mib": round(peak / 2**20),
            "oom_killed": killed, "whole_read_killed_under_same_limit": control_killed,
            "eval": summary.get("tasks", {}).get("default", {}).get("eval", {}),
            "log_tail": "" if codes["party1"] == 0 else (work / "ooc-party1.log").read_text()[-1500:]}


# ---- the whole comparison --------------------------------------------------------------------------
def measure(quick: bool = False, shapes: Optional[list[tuple[int, int, int]]] = None, epochs: int = 2,
            batch_size: int = 4096, micro_batches: int = 4, lr: float = 2e-3, rtt_ms: float = 50.0,
            rate_mbit: float = 100.0, csv_rows: Optional[int] = None, repeats: int = 2,
            out_of_core_shape: Optional[tuple[int, int, int, int]] = (), smoke: bool = False) -> dict:
    """`out_of_core_shape`: (rows, features, memory limit MiB, steps) of the out-of-core run; () picks the
    mode's default, None skips it. `smoke`: SMOKE_SHAPE for 2 epochs, party 0's loads once, no out-of-core run."""
    from benchmarks.memory_limit import unavailable as memory_unavailable
    from benchmarks.wan import Sites, measure_rtt, unavailable
    if smoke:
        shapes, epochs, batch_size, repeats = shapes or [SMOKE_SHAPE], 2, 512, 1
        out_of_core_shape = None if out_of_core_shape == () else out_of_core_shape
    if out_of_core_shape == ():
        out_of_core_shape = (250_000, 1_000, 640, 20) if quick else (1_000_000, 1_000, 2_048, 200)
    why = unavailable()
    if why:
        return {"skipped": why}
    shapes = shapes or list(QUICK_SHAPES if quick else FULL_SHAPES)
    results = []
    for parties, rows, features in shapes:
        csv_count = csv_rows if csv_rows is not None else (rows if quick or smoke else 100_000)
        folder = dataset_dir(parties, rows, features, csv_count if parties == shapes[0][0] else 0)
        row = {"parties": parties, "rows": rows, "features": features, "epochs": epochs, "batch_size": batch_size,
               "micro_batches": micro_batches, "load_avg_1m_at_start": os.getloadavg()[0]}
        row["load"] = [compare_load(folder / f"party{p}.parquet", "parquet", "label" if p == 0 else None, features,
                                    repeats) for p in range(1 if smoke else parties)]
        if (folder / "party0.csv").exists():
            row["load"].append(compare_load(folder / "party0.csv", "csv", "label", features, repeats))
        with Sites(parties) as sites, tempfile.TemporaryDirectory(prefix="meshsl-bank-") as tmp:
            sites.set_link(rtt_ms, rate_mbit)
            row["echo_rtt_ms"] = round(measure_rtt(sites), 1)
            split = run_split(sites, folder, parties, features, epochs, batch_size, micro_batches, lr, Path(tmp))
            row["auc_split"] = round(train_auc(split["predictions"], folder), 4)
        summary = split["summary"]
        row["train_s"] = split["train"]["seconds"]
        row["predict_s"] = split["predict"]["seconds"]  # from process start: loading both tables included
        row["predict_rounds_s"] = split["predict"]["rounds_seconds"]  # first round to last prediction written
        row["peak_rss_mib"] = split["train"]["peak_rss_mib"]
        row["predict_peak_rss_mib"] = split["predict"]["peak_rss_mib"]
        row["float32_matrix_mib"] = round(rows * features * 4 / 2**20)
        row["samples_per_s"] = round(rows * epochs / row["train_s"])
        row["wire_mib_per_epoch"] = round(_wire_bytes(summary) / epochs / 2**20, 1)
        clear = run_clear(folder, parties, features, epochs, batch_size, lr)
        row["auc_clear"] = round(clear["auc"], 4)
        row["clear"] = clear
        row["auc_gap"] = round(row["auc_clear"] - row["auc_split"], 4)
        row["secretflow"] = SECRETFLOW.get(parties)
        row["load_avg_1m_at_end"] = os.getloadavg()[0]
        results.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    result = {"rtt_ms": rtt_ms, "rate_mbit": rate_mbit, "rows": results}
    if out_of_core_shape is not None and memory_unavailable() is None:
        rows, features, limit_mib, steps = out_of_core_shape
        with tempfile.TemporaryDirectory(prefix="meshsl-ooc-") as tmp:
            result["out_of_core"] = out_of_core(DATA / f"ooc-{rows}x{features}", rows, features, limit_mib, steps,
                                                Path(tmp))
    return result


def _wire_bytes(summary: dict) -> int:
    """Cut-edge bytes of the run (activations forward, gradients back; each transfer counted at its sender)."""
    return int(sum(e["forward_bytes"] + e["backward_bytes"] for e in summary.get("edges", {}).values()))


def table(result: dict) -> str:
    if "skipped" in result:
        return f"bank: skipped ({result['skipped']})"
    lines = [f"bank-scale vertical split learning ({result['rate_mbit']:.0f} Mbit/s, RTT {result['rtt_ms']:.0f} ms)",
             "shape | train s (from process start) | SecretFlow s | predict s (rounds / from process start) | "
             "AUC split / clear | samples/s | "
             "wire MiB/epoch | peak RSS MiB per party (float32 matrix MiB)"]
    for r in result["rows"]:
        sf = r.get("secretflow") or {}
        lines.append(" | ".join(str(c) for c in (
            f"{r['parties']} x {r['rows']:,} x {r['features']:,}", r["train_s"], sf.get("train_s", ""),
            f"{r['predict_rounds_s']} / {r['predict_s']}",
            f"{r['auc_split']:.4f} / {r['auc_clear']:.4f}", f"{r['samples_per_s']:,}", r["wire_mib_per_epoch"],
            " ".join(f"{v:.0f}" for v in r["peak_rss_mib"].values()) + f" ({r['float32_matrix_mib']})")))
        for load in r["load"]:
            lines.append(f"  load {load['file']} ({load['format']}, {load['file_mib']} MiB): meshsl {load['meshsl_s']} s, "
                         f"pyarrow {load['pyarrow_s']} s, ratio {load['ratio']:.2f}; peak RSS {load['meshsl_peak_rss_mib']}"
                         f" MiB vs float32 matrix {load['float32_matrix_mib']} MiB (bound 1.3x + 1 GiB: "
                         f"{'met' if load['within_memory_bound'] else 'NOT met'})")
    ooc = result.get("out_of_core")
    if ooc:
        lines.append(f"out of core: a {ooc['file_mib']} MiB .npy under a {ooc['limit_mib']} MiB cgroup limit: exit codes "
                     f"{ooc['exit_codes']}, {ooc['seconds']} s, cgroup peak {ooc['cgroup_peak_mib']} MiB, held-out "
                     f"AUC {ooc['eval'].get('auroc', float('nan')):.3f}; the whole file read under the same limit "
                     f"{'was killed' if ooc['whole_read_killed_under_same_limit'] else 'was NOT killed'}")
    return "\n".join(lines)


def _shape(text: str) -> tuple[int, int, int]:
    parties, rows, features = (int(v) for v in text.lower().split("x"))
    return parties, rows, features


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bank", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    gen = sub.add_parser("generate")
    gen.add_argument("--parties", type=int, default=2)
    gen.add_argument("--rows", type=int, default=800_000)
    gen.add_argument("--features", type=int, default=1_500)
    gen.add_argument("--csv-rows", type=int, default=0)
    gen.add_argument("--out", type=Path, required=True)
    clear = sub.add_parser("clear")
    for name in ("--parties", "--features", "--epochs", "--batch-size"):
        clear.add_argument(name, type=int, required=True)
    clear.add_argument("--folder", required=True)
    clear.add_argument("--lr", type=float, required=True)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--shapes", type=_shape, nargs="+", help="PARTIESxROWSxFEATURES, e.g. 2x800000x1500")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--csv-rows", type=int)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.command == "generate":
        print(json.dumps(generate(args.parties, args.rows, args.features, args.out, args.csv_rows)))
        return
    if args.command == "clear":
        clear_main(args)
        return
    import signal
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # still tear the namespaces down
    result = measure(args.quick, args.shapes, args.epochs, args.batch_size, args.micro_batches, args.lr,
                     csv_rows=args.csv_rows, smoke=args.smoke)
    print(table(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
