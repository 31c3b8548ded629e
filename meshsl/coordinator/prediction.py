"""The coordinator's side of `meshsl predict`: forward-only rounds over every lane with inputs.

Pure helpers (which lanes, how many rows, the file names) and the round loop, which drives the
coordinator only through its public `forward_round`."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from meshsl.config.specs import GenerateSpec
from meshsl.errors import DataError, PeerFailed
from meshsl.protocol import control


ROUND_ROWS = 65_536  # rows per predict round by default


@dataclass
class PredictSettings:
    """How the coordinator cuts the input into rounds: micro-batches of `batch_size` rows, `micro_batches`
    of them in flight per round (the pipeline); None: the topology's eval_batch_size / max(2, micro_batches)."""

    batch_size: Optional[int] = None
    micro_batches: Optional[int] = None


def lane_client(topology, lane: int) -> str:
    """Name of the client (replicated node) of `lane`, for per-client rows and metrics."""
    for name in topology.spec.data:
        if topology.is_replicated(name.name):
            return topology.node_of(name.name, lane)
    for name in topology.segment_order:
        if topology.is_replicated(name):
            return topology.node_of(name, lane)
    return f"lane{lane}"


def prediction_file(topology, task, node: str, directory: Path) -> Path:
    stem = f"{task.name}@{node}" if topology.is_replicated(task.output) else task.name
    return Path(directory) / f"{stem}.{'jsonl' if task.loss == 'causal_lm' else 'csv'}"


def generation_rounds(topology) -> Optional[int]:
    """A causal_lm task generates: one predict round per new token of each prompt (meshsl.apps.llm_generate)."""
    tasks = [t for t in topology.spec.tasks if t.loss == "causal_lm"]
    return (tasks[0].generate or GenerateSpec()).max_new_tokens if tasks else None


def _rounds(total: int, chunk: int, rows_per_mb: int, new_tokens: Optional[int]):
    """(offset, count, micro_batches) of each predict round: a chunk of rows, or a prompt per new token."""
    if new_tokens is not None:
        return [(row, 1, 1) for row in range(total) for _ in range(new_tokens)]
    return [(offset, min(chunk, total - offset), math.ceil(min(chunk, total - offset) / rows_per_mb))
            for offset in range(0, total, chunk)]


def predict_lanes(topology, rows: dict[str, int]) -> list[tuple[int, int]]:
    """(lane, rows) to predict: a lane runs when its feature holders all announced inputs of one length."""
    sources = [d.name for d in topology.spec.data if d.kind == "features"]
    plan = []
    for lane in range(topology.lanes):
        needed = sorted({topology.node_of(s, lane) for s in sources})
        have = {n: rows[n] for n in needed if n in rows}
        if not have:
            continue
        missing = [n for n in needed if n not in have]
        if missing:
            raise DataError(f"{', '.join(missing)} gave no prediction input, but {', '.join(have)} did; every "
                            f"party holding features of the same rows needs one", "predict")
        if len(set(have.values())) > 1:
            counts = ", ".join(f"{n}: {k} rows" for n, k in have.items())
            raise DataError(f"prediction inputs are not aligned (rows pair up by position): {counts}", "predict")
        plan.append((lane, next(iter(have.values()))))
    if not plan:
        raise DataError("no node has a prediction input", "predict")
    return plan


async def coordinate_prediction(coordinator, settings: PredictSettings) -> dict:
    """Forward-only rounds over every lane with inputs; returns the run summary (counts only)."""
    topology = coordinator.topology
    training = topology.spec.training
    plan = predict_lanes(topology, coordinator.predict_rows)
    wire_limit = max(training.eval_batch_size, training.batch_size)  # rows a node accepts per message
    rows_per_mb = min(settings.batch_size or training.eval_batch_size, wire_limit)
    # A round waits for its last prediction before the next begins: big rounds (>= ROUND_ROWS rows, still
    # pipelined micro-batch by micro-batch) pay that round trip a few times, not once per micro-batch group.
    per_round = settings.micro_batches or max(2, training.micro_batches, math.ceil(ROUND_ROWS / rows_per_mb))
    chunk = rows_per_mb * per_round
    written: dict[str, int] = {t: 0 for t in topology.tasks}
    started = time.perf_counter()
    rounds = 0
    new_tokens = generation_rounds(topology)
    for lane, total in plan:
        for offset, count, micro_batches in _rounds(total, chunk, rows_per_mb, new_tokens):
            rounds += 1
            begin = control.Begin(lanes=(lane,), micro_batches=micro_batches, offset=offset, count=count)
            done = await coordinator.forward_round("predict", begin, "finish its prediction round")
            for received in done.values():
                for task, n in received.message.predicted.items():
                    if task in written:
                        written[task] += n
    expected = sum(n for _, n in plan)
    wall = time.perf_counter() - started
    tasks = {}
    for task in topology.spec.tasks:
        owners = sorted({topology.node_of(task.output, lane) for lane, _ in plan})
        if written[task.name] != expected:
            raise PeerFailed(owners[0], f"wrote {written[task.name]} of {expected} predictions of task {task.name!r}")
        tasks[task.name] = {"rows": written[task.name], "owners": owners,
                            "files": [prediction_file(topology, task, o, Path(".")).name for o in owners]}
    return {"topology": topology.spec.name, "topology_hash": topology.hash, "mode": "predict",
            "rows": {lane_client(topology, lane) if topology.lanes > 1 else "all": n for lane, n in plan},
            "rounds": rounds, "rows_per_micro_batch": rows_per_mb, "micro_batches_per_round": per_round,
            "wall_seconds": wall, "rows_per_s": expected / wall if wall > 0 else 0.0, "tasks": tasks}
