"""Prediction through the topology: forward-only rounds over the same nodes and hops as training.

Every party reads ITS OWN input file (the same columns as its data source; rows are aligned by
position across parties, as training rows are aligned by sample id), activations travel the cut
edges exactly as in training (pipelined micro-batches, no gradients, no optimizer step), and the
node owning a task's output writes the predictions to its own file. The coordinator only learns
how many rows each party has and how many predictions each owner wrote, never a prediction.

Pieces:
- `read_node_input`: a node's input file -> tensors per data source (typed errors name node and file);
- `NodeInference`: a node's side (attach the input to its worker, write the predictions it owns);
- `coordinate_prediction`: the coordinator's predict rounds (`RunOptions.predict`);
- `predict_local` / `evaluate_local`: every local node as its own process (what the CLI runs).
"""
from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from meshsl.align.ids import data_nodes, id_column_of, read_node_ids, uses_ids  # noqa: F401  (re-exported)
from meshsl.align.outcomes import outcome_of
from meshsl.compute.node_data import feature_tensor
from meshsl.config.loader import load_spec, parse_spec
from meshsl.data import load_source, selection_of
from meshsl.apps.llm_generate import Decoder, read_prompts, start_generating
from meshsl.errors import ConfigError, DataError, PartyOffline, PeerFailed, PeerTimeout  # noqa: F401  (re-exported)
from meshsl.launch.entry import EXIT_ABORTED
from meshsl.launch.launcher import LocalRun, default_run_dir
from meshsl.coordinator.prediction import (  # noqa: F401  (re-exported)
    PredictSettings, lane_client, predict_lanes, prediction_file)
from meshsl.topology.model import load_topology, topology_from_spec



# ---- reading a party's own input ---------------------------------------------------------------
def feature_sources(topology, node: str) -> list:
    return [d for d in topology.spec.data if d.kind == "features" and node in topology.placement[d.name]]


COLUMNAR = {".parquet": "parquet", ".arrow": "arrow", ".feather": "arrow", ".ipc": "arrow"}


def _read_matrix(path: Path, where: str, drop_column: Optional[str] = None, allow_missing: bool = False) -> np.ndarray:
    """A CSV (optional header) or .npy input: the node's feature columns side by side, as float32."""
    if not path.is_file():
        raise DataError(f"input file {path} does not exist", where)
    if path.suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False, mmap_mode="r")  # never unpickle
        except (ValueError, OSError, EOFError) as exc:
            raise DataError(f"cannot load {path} (pickled/object arrays are refused): {exc}", where) from None
        if not np.issubdtype(array.dtype, np.number) or array.ndim < 1:
            raise DataError(f"{path} holds {array.dtype} of shape {array.shape}, expected numbers [rows, ...]", where)
        return array.reshape(len(array), -1) if array.ndim == 1 else array
    from meshsl.data.arrow_files import read_input_csv  # pyarrow only where a CSV is read
    return read_input_csv(path, drop_column, allow_missing, where)


def _columnar_input(topology, sources: list, path: Path, where: str) -> dict[str, np.ndarray]:
    """A Parquet / Arrow input holds the same columns as the training file: each source reads its own."""
    if not path.is_file():
        raise DataError(f"input file {path} does not exist", where)
    out = {}
    for d in sources:
        options = {**d.dataset.options, "path": str(path.resolve())}
        spec = d.model_copy(update={"dataset": d.dataset.model_copy(update={"name": COLUMNAR[path.suffix],
                                                                           "options": options})})
        try:
            out[d.name] = load_source(spec, topology.base_dir).features
        except DataError as exc:
            if "label_column" not in exc.where or "label_column" not in options:
                raise DataError(exc.message, where) from None
            options.pop("label_column")  # rows to predict need not carry the training label
            spec = spec.model_copy(update={"dataset": spec.dataset.model_copy(update={"options": options})})
            out[d.name] = load_source(spec, topology.base_dir).features
    return out


def read_node_input(topology, node: str, path: Path) -> tuple[dict[str, Any], int]:
    """`node`'s input rows: the columns of its feature sources, in declaration order (several sources
    side by side). CSV (optional header) or .npy ([rows, columns] or [rows, *feature shape])."""
    path = Path(path)
    where = f"--input {node}={path}"
    if node not in topology.nodes:
        raise ConfigError(f"unknown node {node!r} (nodes: {', '.join(topology.nodes)})", where)
    sources = feature_sources(topology, node)
    ids = read_node_ids(topology, node, path)
    if not sources and ids is not None:
        return {}, len(ids)  # a label holder's list of the samples to predict: it takes part in the PSI
    if not sources:
        raise ConfigError(f"node {node!r} holds no feature data, so it takes no prediction input", where)
    if sources[0].dataset.name == "text":  # prompts to continue (meshsl.apps.llm_generate)
        feed = read_prompts(sources[0], path, topology.base_dir, where)
        return {sources[0].name: feed}, len(feed)
    shapes = [tuple(topology.shapes[d.name]) for d in sources]
    widths = [math.prod(s) for s in shapes]
    if path.suffix in COLUMNAR:
        blocks = _columnar_input(topology, sources, path, where)
        rows = len(next(iter(blocks.values())))
        return {d.name: feature_tensor(b).reshape(rows, *shape) for (d, shape), b in
                zip(zip(sources, shapes), blocks.values())}, rows
    missing_ok = any(selection_of(d).allow_missing for d in sources)
    array = _read_matrix(path, where, id_column_of(topology, node), missing_ok)
    if len(sources) == 1 and tuple(array.shape[1:]) == shapes[0]:
        array = array.reshape(len(array), -1)
    elif array.ndim != 2:
        array = array.reshape(len(array), -1)
    if array.shape[1] != sum(widths):
        needs = ", ".join(f"{d.name}: {w}" for d, w in zip(sources, widths))
        raise DataError(f"input file {path} has {array.shape[1]} columns; "
                        f"node {node!r} needs {sum(widths)} ({needs})", where)
    bad = np.isinf(array) if missing_ok else ~np.isfinite(array)
    if bad.any():
        row, column = (int(v[0]) for v in np.nonzero(bad))
        raise DataError(f"node {node!r}: input file {path}, data row {row + 1}, column {column + 1}: "
                        f"{array[row, column]} (missing values need `preprocess: {{impute: ...}}`)", where)
    tensors, start = {}, 0
    for d, shape, width in zip(sources, shapes, widths):
        block = np.ascontiguousarray(array[:, start:start + width], dtype=np.float32)
        tensors[d.name] = feature_tensor(block).reshape(len(array), *shape)
        start += width
    return tensors, len(array)


def predict_rows(topology, node: str, path: Path) -> Optional[np.ndarray]:
    """Row of `node`'s prediction input for each common sample after the PSI, in the agreed order."""
    outcome = outcome_of(topology, node, predict=True)
    if outcome is None or outcome.ids is None:
        return None
    held = read_node_ids(topology, node, path)
    if held is None:
        return None
    position = {value: row for row, value in enumerate(held)}
    return np.fromiter((position[i] for i in outcome.ids), dtype=np.int64, count=len(outcome.ids))


# ---- a node's side -----------------------------------------------------------------------------
def _header(topology, task, width: int, with_ids: bool = False) -> list[str]:
    head = ["row"] + (["id"] if with_ids else []) + (["client"] if topology.lanes > 1 else [])
    if task.loss == "cross_entropy":
        return head + ["prediction"] + [f"prob_{k}" for k in range(width)]
    if task.loss == "bce_with_logits":
        return head + ["prediction", "prob_1"]
    return head + [f"value_{k}" for k in range(width)]


@dataclass
class NodeInference:
    """One node in a predict run: its own input file (if it holds features) and the folder where it
    writes the predictions of the task outputs it owns (if it owns any)."""

    input_path: Optional[Path] = None
    output_dir: Optional[Path] = None
    rows: Optional[int] = None  # of the input (announced to the coordinator; the rows themselves stay)
    written: dict = field(default_factory=dict)  # task -> predictions written
    files: dict = field(default_factory=dict)  # task -> path
    ids: Optional[list] = None  # the common sample ids in row order (this node took part in the PSI)
    decoders: dict = field(default_factory=dict)  # causal_lm task -> its Decoder (generation)

    def attach(self, worker) -> None:
        """On the compute thread at node start: read the input, start the output files."""
        topology = worker.topology
        if self.input_path is not None:
            tensors, self.rows = read_node_input(topology, worker.node, self.input_path)
            order = predict_rows(topology, worker.node, self.input_path)
            if order is not None:  # matched by sample id: row i is the i-th common sample
                tensors = {k: v[torch.as_tensor(order)].contiguous() for k, v in tensors.items()}
                self.rows = len(order)
            worker.data.predict_inputs.update(tensors)
        aligned = outcome_of(topology, worker.node, predict=True)
        self.ids = aligned.ids if aligned is not None else None
        start_generating(worker)
        for task in worker.my_tasks():
            if self.output_dir is None:
                raise ConfigError(f"node {worker.node!r} owns the output of task {task.name!r}; give it "
                                  f"--predict-output DIR", "--predict-output")
            path = prediction_file(topology, task, worker.node, self.output_dir)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("")  # a fresh file per run; the header follows with the first rows
            self.files[task.name] = path
            self.written[task.name] = 0
            if task.loss == "causal_lm":
                self.decoders[task.name] = Decoder(worker, task, path)

    def write(self, worker) -> dict[str, int]:
        """After a predict round: append this round's predictions (in row order) to the owner's files."""
        context = worker.context
        counts = {}
        for task in worker.my_tasks():
            outputs = worker.predictions.get(task.name, {})
            if task.name in self.decoders:  # a generated token per round; a prompt done: its line written
                done = sum(self.decoders[task.name].step(outputs[key]) for key in sorted(outputs))
                self.written[task.name] += done
                counts[task.name] = done
                continue
            blocks = []
            for (lane, mb) in sorted(outputs):
                rows = worker.data.rows("predict", lane, 0, 0, mb, context.micro_batches,
                                        offset=context.offset, count=context.count)
                blocks.append((lane, rows, prediction_values(task, outputs[(lane, mb)].float())))
            with self.files[task.name].open("ab") as handle:
                for lane, rows, values in blocks:
                    if self.written[task.name] == 0:
                        width = values.shape[1] - (1 if task.loss != "mse" else 0)
                        handle.write((",".join(_header(worker.topology, task, width, self.ids is not None))
                                      + "\n").encode())
                    client = lane_client(worker.topology, lane) if worker.topology.lanes > 1 else None
                    handle.write(_prediction_lines(task, rows, values, self.ids, client))
                    self.written[task.name] += len(rows)
                    counts[task.name] = counts.get(task.name, 0) + len(rows)
        return counts


def prediction_values(task, output: torch.Tensor) -> np.ndarray:
    """[rows, columns]: the class (or label) then its probabilities; mse: the values."""
    if task.loss == "cross_entropy":
        probs = output.reshape(len(output), -1).softmax(dim=1)
        return torch.cat([probs.argmax(dim=1, keepdim=True).float(), probs], dim=1).numpy()
    if task.loss == "bce_with_logits":
        probs = torch.sigmoid(output.reshape(-1, 1))
        return torch.cat([(probs > 0.5).float(), probs], dim=1).numpy()
    return output.reshape(len(output), -1).numpy()


def _prediction_lines(task, rows: np.ndarray, values: np.ndarray, ids, client: Optional[str]) -> bytes:
    """CSV lines written by Arrow (800,000 rows in about half a second; a Python loop took 2.5 s). Floats
    in their shortest form that reads back as the same float32."""
    import pyarrow as pa  # the writer only where predictions are written
    import pyarrow.csv as pa_csv
    columns: dict[str, pa.Array] = {"row": pa.array(rows.astype(np.int64))}
    if ids is not None:
        columns["id"] = pa.array([ids[r] for r in rows.tolist()], type=pa.string())
    if client is not None:
        columns["client"] = pa.array([client] * len(rows), type=pa.string())
    numbers = values.astype(np.float32)
    if task.loss != "mse":
        columns["prediction"] = pa.array(numbers[:, 0].astype(np.int64))
        numbers = numbers[:, 1:]
    for k in range(numbers.shape[1]):
        columns[f"v{k}"] = pa.array(np.ascontiguousarray(numbers[:, k]))
    sink = pa.BufferOutputStream()
    pa_csv.write_csv(pa.table(columns), sink, pa_csv.WriteOptions(include_header=False))
    return sink.getvalue().to_pybytes()


def node_predict_options(topology, node: str, input_path: Optional[Path], output_dir: Optional[Path],
                         batch_size: Optional[int] = None) -> tuple[PredictSettings, NodeInference]:
    """`meshsl node NAME --predict [--predict-input FILE] [--predict-output DIR]`."""
    if input_path is not None:
        read_node_input(topology, node, input_path)  # fail before binding any socket
    owns = [t.name for t in topology.spec.tasks if node in topology.placement[t.output]]
    if owns and output_dir is None:
        raise ConfigError(f"node {node!r} owns the output of task(s) {', '.join(owns)}; give it --predict-output DIR",
                          "--predict-output")
    return PredictSettings(batch_size=batch_size), NodeInference(input_path=input_path, output_dir=output_dir)


# ---- the coordinator's side --------------------------------------------------------------------
# ---- running it locally (one process per node) -------------------------------------------------
def _raise_from_summary(summary: dict, topology) -> None:
    kind, message = summary.get("error_type"), str(summary.get("error", ""))
    if kind in ("PeerTimeout", "PartyOffline") and summary.get("peer"):
        peers = [p.strip() for p in str(summary["peer"]).split(",")]
        parties = ", ".join(topology.nodes[p].party for p in peers if p in topology.nodes)
        raise PartyOffline(str(summary["peer"]), float(summary.get("waited_s") or 0.0), parties)
    if kind == "DataError":
        raise DataError(message.split(": ", 1)[-1] if message.startswith("predict: ") else message, "predict")
    if kind == "ConfigError":
        raise ConfigError(message)
    raise PeerFailed(topology.coordinator, message)


def _exits_soon(proc, seconds: float = 10.0) -> bool:
    try:
        proc.wait(timeout=seconds)
    except Exception:  # noqa: BLE001 - subprocess.TimeoutExpired
        return False
    return True


def follow_local(run, topology, timeout: Optional[float] = None) -> dict:
    """Wait for the local processes; the coordinator's typed error (offline party, bad input) is re-raised."""
    deadline = time.monotonic() + timeout if timeout else None
    coordinator = topology.coordinator
    summary_path = run.run_dir / "summary.json"
    try:
        while True:
            head = run.processes.get(coordinator)
            if head is not None and head.poll() is not None:
                break
            if head is None and all(p.poll() is not None for p in run.processes.values()):
                break
            for name, proc in run.processes.items():
                if name != coordinator and proc.poll() not in (None, 0):
                    if proc.returncode == EXIT_ABORTED and head is not None and _exits_soon(head):
                        break  # an abort the coordinator started: its summary says why
                    raise PeerFailed(name, run.log_tail(name))
            if deadline and time.monotonic() > deadline:
                raise PeerTimeout(coordinator, timeout or 0.0, "finish")
            time.sleep(0.05)
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        if head is not None and head.returncode != 0:  # the others are stopped (finally) without waiting
            if summary.get("error"):
                _raise_from_summary(summary, topology)
            raise PeerFailed(coordinator, run.log_tail(coordinator))
        for proc in run.processes.values():
            try:
                proc.wait(timeout=30)
            except Exception:
                proc.kill()
        bad = [n for n, p in run.processes.items() if p.returncode != 0]
        if bad:
            raise PeerFailed(bad[0], run.log_tail(bad[0]))
        return summary
    finally:
        run.stop()


def _launch(topology_path: Path, run_dir: Optional[Path], free_ports: bool, remote, **launch) -> tuple:
    run = LocalRun(Path(topology_path), Path(run_dir) if run_dir else default_run_dir(), free_ports=free_ports,
                   **launch)
    resolved = run.prepare()
    topology = topology_from_spec(load_spec(resolved), str(resolved), Path(topology_path).parent)
    unknown = [n for n in remote if n not in topology.nodes]
    if unknown:
        raise ConfigError(f"unknown node(s) {', '.join(unknown)} (nodes: {', '.join(topology.nodes)})", "--remote")
    run.start(topology, resolved, elsewhere=remote)
    return run, topology


def check_inputs(topology, inputs: dict[str, Path], remote=()) -> dict[str, int]:
    """Before starting anything: every input is readable, has its node's columns, and rows line up."""
    rows = {node: read_node_input(topology, node, path)[1] for node, path in inputs.items()}
    sources = [d.name for d in topology.spec.data if d.kind == "features"]
    if uses_ids(topology):  # rows are matched by PSI: every data node takes part, counts may differ
        missing = [n for n in data_nodes(topology) if n not in inputs and n not in remote]
        if missing:
            raise ConfigError(f"no --input for {', '.join(missing)}: rows are matched by sample id, so every "
                              f"party holding data takes part in the alignment (a label holder gives a csv "
                              f"with just its id column: the samples it wants predicted)", "--input")
        return rows
    if topology.lanes == 1:
        needed = sorted({topology.node_of(s) for s in sources})
        missing = [n for n in needed if n not in inputs and n not in remote]
        if missing:
            raise ConfigError(f"no --input for {', '.join(missing)} (every feature holder needs one: "
                              f"{', '.join(f'{n}=FILE' for n in needed)})", "--input")
    predict_lanes(topology, {**rows, **{n: next(iter(rows.values())) for n in remote if rows}})
    return rows


def predict_local(topology_path: Path, weights: Path, inputs: dict[str, Path], output: Path, *,
                  remote=(), run_dir: Optional[Path] = None, free_ports: bool = False,
                  startup_timeout: Optional[float] = None, batch_size: Optional[int] = None,
                  timeout: Optional[float] = None, log_level: str = "WARNING", document: Optional[dict] = None) -> dict:
    """`meshsl predict`: start the local nodes (those not in `remote`) in prediction mode; returns the summary.
    `document`: the topology as data (the Python API), relative paths starting from `topology_path`'s folder."""
    topology = load_topology(topology_path) if document is None else \
        topology_from_spec(parse_spec(document, str(topology_path)), str(topology_path), Path(topology_path).parent)
    check_inputs(topology, {n: Path(p) for n, p in inputs.items()}, remote)
    node_args: dict = {"*": ["--predict", "--predict-output", str(Path(output).resolve())]}
    if batch_size:
        node_args["*"] += ["--predict-batch-size", str(batch_size)]
    if startup_timeout:
        node_args["*"] += ["--startup-timeout", str(startup_timeout)]
    for node, path in inputs.items():
        node_args[node] = ["--predict-input", str(Path(path).resolve())]
    run, resolved = _launch(topology_path, run_dir, free_ports, remote, weights_in=Path(weights),
                            node_args=node_args, evaluate=False, log_level=log_level, document=document)
    return follow_local(run, resolved, timeout)


def evaluate_local(topology_path: Path, weights: Path, *, run_dir: Optional[Path] = None, free_ports: bool = False,
                   startup_timeout: Optional[float] = None, timeout: Optional[float] = None,
                   log_level: str = "WARNING", document: Optional[dict] = None) -> dict:
    """`meshsl evaluate`: an evaluation round only (steps=0) on the held-out rows, from saved weights."""
    node_args = {"*": ["--startup-timeout", str(startup_timeout)]} if startup_timeout else {}
    run, resolved = _launch(topology_path, run_dir, free_ports, (), weights_in=Path(weights), steps=0,
                            evaluate=True, node_args=node_args, log_level=log_level, document=document)
    summary = follow_local(run, resolved, timeout)
    summary["weights"] = str(Path(weights).resolve())
    return summary


def load_predictions(path: Path) -> dict[str, np.ndarray]:
    """A predictions CSV as columns (row, [client,] prediction, prob_k / value_k)."""
    with Path(path).open(newline="") as handle:
        rows = list(csv.reader(handle))
    header, body = rows[0], rows[1:]
    columns = {}
    for i, name in enumerate(header):
        values = [r[i] for r in body]
        columns[name] = np.array(values) if name in ("client", "id") else np.array(values, dtype=np.float64)
    return columns
