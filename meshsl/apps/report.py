"""Plots and a summary file for one finished run.

`write_report(summary, history, out_dir)` writes, when the data for them exists:

* ``loss.png``        loss per task over steps (training rows),
* ``accuracy.png``    accuracy per task at evaluation points (falls back to training accuracy),
* ``throughput.png``  samples/s over steps,
* ``edge_bytes.png``  forward/backward bytes per edge (bars),
* ``summary.json``    the summary as given (always).

Rows with missing or non-numeric fields are skipped, so a partial history still gives plots.
Uses matplotlib's object API with the Agg canvas: no display, no global pyplot state.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

from matplotlib.figure import Figure


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _series(rows: Iterable[dict], section: str, field: str) -> dict[str, tuple[list[float], list[float]]]:
    """task -> (steps, values) for rows[i][section][task][field]."""
    out: dict[str, tuple[list[float], list[float]]] = {}
    for row in rows:
        step = _number(row.get("step"))
        tasks = row.get(section)
        if step is None or not isinstance(tasks, dict):
            continue
        for task, values in tasks.items():
            value = _number(values.get(field)) if isinstance(values, dict) else None
            if value is not None:
                xs, ys = out.setdefault(str(task), ([], []))
                xs.append(step)
                ys.append(value)
    return out


def _line_plot(path: Path, title: str, ylabel: str, series: dict[str, tuple[list, list]],
               marker: str = "") -> Path:
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    for label, (xs, ys) in sorted(series.items()):
        ax.plot(xs, ys, marker=marker, label=label)
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    ax.grid(alpha=0.3)
    if len(series) > 1 or any(label for label in series):
        ax.legend()
    fig.savefig(path, dpi=100)
    return path


def _edge_bytes_plot(path: Path, edges: dict[str, dict]) -> Path:
    names = sorted(edges)
    forward = [_number(edges[n].get("forward_bytes")) or 0.0 for n in names]
    backward = [_number(edges[n].get("backward_bytes")) or 0.0 for n in names]
    fig = Figure(figsize=(max(5, 1.2 * len(names) + 2), 4), layout="constrained")
    ax = fig.add_subplot()
    positions = range(len(names))
    width = 0.4
    ax.bar([p - width / 2 for p in positions], forward, width, label="forward")
    ax.bar([p + width / 2 for p in positions], backward, width, label="backward")
    ax.set_xticks(list(positions), names, rotation=20, ha="right")
    ax.set(title="Bytes per edge", ylabel="bytes")
    ax.legend()
    fig.savefig(path, dpi=100)
    return path


def write_report(summary: dict, history: list[dict], out_dir: Path) -> list[Path]:
    """Write the plots the data supports plus summary.json; returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [row for row in history if isinstance(row, dict)]
    written: list[Path] = []

    losses = _series(rows, "tasks", "loss")
    if losses:
        written.append(_line_plot(out_dir / "loss.png", "Loss per task", "loss", losses))

    accuracy = _series(rows, "eval", "accuracy")
    title = "Evaluation accuracy per task"
    if not accuracy:
        accuracy, title = _series(rows, "tasks", "accuracy"), "Training accuracy per task"
    if accuracy:
        written.append(_line_plot(out_dir / "accuracy.png", title, "accuracy", accuracy, marker="o"))

    throughput = [(s, v) for s, v in ((_number(r.get("step")), _number(r.get("samples_per_s")))
                                      for r in rows) if s is not None and v is not None]
    if throughput:
        series = {"": ([s for s, _ in throughput], [v for _, v in throughput])}
        written.append(_line_plot(out_dir / "throughput.png", "Throughput", "samples/s", series))

    edges = summary.get("edges") if isinstance(summary, dict) else None
    edges = {str(k): v for k, v in (edges or {}).items() if isinstance(v, dict)}
    if edges:
        written.append(_edge_bytes_plot(out_dir / "edge_bytes.png", edges))

    summary_path = out_dir / "summary.json"
    summary_path.write_text(json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
    written.append(summary_path)
    return written
