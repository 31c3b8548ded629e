"""Using the trained model: `meshsl predict`, `export`, `assemble`, `evaluate` (see docs/using-the-model.md)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from meshsl.cli.common import _logging, fail, load
from meshsl.errors import ConfigError, MeshslError

out = Console(soft_wrap=True)


def _inputs(values: list[str]) -> dict[str, Path]:
    inputs: dict[str, Path] = {}
    for value in values:
        node, sep, path = value.partition("=")
        if not sep or not node or not path:
            raise ConfigError(f"{value!r} is not NODE=FILE", "--input")
        if node in inputs:
            raise ConfigError(f"two inputs for node {node!r}", "--input")
        inputs[node] = Path(path)
    return inputs


def predict(topology: Path = typer.Argument(..., help="topology YAML"),
            weights: Path = typer.Option(..., "--weights", help="segment weights from `meshsl run --weights-out DIR`"),
            input: list[str] = typer.Option([], "--input", help="NODE=FILE: that party's own rows (CSV or .npy)"),
            output: Path = typer.Option(..., "--output", help="each task-output owner writes DIR/<task>.csv"),
            remote: list[str] = typer.Option([], "--remote", help="NODE started by its owner elsewhere (not here)"),
            batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="rows per micro-batch"),
            startup_timeout: Optional[float] = typer.Option(None, "--startup-timeout",
                                                            help="seconds to wait for every party to come online"),
            run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="logs and resolved topology (default: temp)"),
            free_ports: bool = typer.Option(False, "--free-ports", help="use free loopback ports"),
            timeout: Optional[float] = typer.Option(None, help="give up after this many seconds")) -> None:
    """Forward-only prediction through the same nodes and hops; predictions stay with the task-output owner."""
    from meshsl.apps.predict import predict_local  # torch: not for `meshsl --help`
    load(topology)  # a clean error for a bad topology
    try:
        summary = predict_local(topology, weights, _inputs(input), output, remote=tuple(remote), run_dir=run_dir,
                                free_ports=free_ports, startup_timeout=startup_timeout, batch_size=batch_size,
                                timeout=timeout, log_level=_logging["level"])
    except MeshslError as exc:
        fail(exc, 1)
    for name, task in summary.get("tasks", {}).items():
        files = ", ".join(str(output / f) for f in task["files"])
        out.print(f"{name}: {task['rows']} predictions written by {', '.join(task['owners'])} to {files}")
    if summary:
        out.print(f"{summary['rounds']} rounds, {summary['rows_per_s']:.0f} rows/s")


def export(topology: Path = typer.Argument(..., help="topology YAML"),
           weights: Path = typer.Option(..., "--weights", help="this node's saved weights"),
           node: str = typer.Option(..., "--node", help="export only this node's own segments"),
           out_dir: Path = typer.Option(..., "--out", help="directory for <segment>.safetensors + <segment>.json")) -> None:
    """Export one party's own segments: safetensors state dict + JSON segment spec, loadable with plain torch."""
    from meshsl.apps.export import export_node  # torch: not for `meshsl --help`
    topo = load(topology)
    try:
        paths = export_node(topo, weights, node, out_dir)
    except MeshslError as exc:
        fail(exc)
    for path in paths:
        out.print(f"wrote {path}")


def assemble(topology: Path = typer.Argument(..., help="topology YAML"),
             export_dirs: list[Path] = typer.Argument(..., help="export directories, one or more per owner"),
             out_path: Path = typer.Option(..., "--out", help="model.pt (one file) or a directory"),
             client: Optional[str] = typer.Option(None, "--client", help="multi-client topologies: whose segments")) -> None:
    """Combine every owner's export into one single-process model (refused while any owner's export is missing)."""
    from meshsl.apps.export import assemble as run_assemble  # torch: not for `meshsl --help`
    topo = load(topology)
    try:
        path = run_assemble(topo, export_dirs, out_path, client)
    except MeshslError as exc:
        fail(exc)
    out.print(f"assembled {topo.spec.name} ({len(topo.segments)} segments) into {path}")


def evaluate(topology: Path = typer.Argument(..., help="topology YAML"),
             weights: Path = typer.Option(..., "--weights", help="segment weights from `meshsl run --weights-out DIR`"),
             summary_json: Optional[Path] = typer.Option(None, "--summary-json", help="write the metrics here"),
             startup_timeout: Optional[float] = typer.Option(None, "--startup-timeout"),
             run_dir: Optional[Path] = typer.Option(None, "--run-dir"),
             free_ports: bool = typer.Option(False, "--free-ports", help="use free loopback ports"),
             timeout: Optional[float] = typer.Option(None, help="give up after this many seconds")) -> None:
    """Held-out metrics per task (and per client) of saved weights: one evaluation round, no training."""
    from meshsl.apps.predict import evaluate_local  # torch: not for `meshsl --help`
    load(topology)
    try:
        summary = evaluate_local(topology, weights, run_dir=run_dir, free_ports=free_ports,
                                 startup_timeout=startup_timeout, timeout=timeout, log_level=_logging["level"])
    except MeshslError as exc:
        fail(exc, 1)
    table = Table(title=f"{summary['topology']}: held-out metrics")
    for column in ("task", "client", "samples", "loss", "accuracy", "f1", "auroc"):
        table.add_column(column)

    def row(task: str, who: str, m: dict) -> None:
        cells = [f"{m[k]:.4f}" if isinstance(m.get(k), float) else "-" for k in ("loss", "accuracy", "f1", "auroc")]
        table.add_row(task, who, str(m.get("samples", "-")), *cells)

    for name, t in summary["tasks"].items():
        ev = t.get("eval", {})
        row(name, "all", ev)
        for client, metrics in ev.get("by_client", {}).items():
            row(name, client, metrics)
    out.print(table)
    for name, t in summary["tasks"].items():
        if t.get("eval", {}).get("confusion_matrix") is not None:
            out.print(f"{name} confusion matrix (rows: true class): {t['eval']['confusion_matrix']}")
    if summary_json:
        summary_json.parent.mkdir(parents=True, exist_ok=True)
        summary_json.write_text(json.dumps(summary, indent=2, default=float))
        out.print(f"summary written to {summary_json}")


def mount(app: typer.Typer) -> None:
    app.command("predict")(predict)
    app.command("export")(export)
    app.command("assemble")(assemble)
    app.command("evaluate")(evaluate)
