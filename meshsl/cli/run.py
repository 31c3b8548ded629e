"""`meshsl run`: train a topology locally, one process per node."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from meshsl.cli.common import _configure_logging, _logging, console, fail, load, out
from meshsl.cli.summary import print_summary
from meshsl.errors import ConfigError, MeshslError


def run(topology: Path = typer.Argument(...),
        steps: Optional[int] = typer.Option(None, help="train this many steps (overrides epochs)"),
        epochs: Optional[int] = typer.Option(None, help="train this many epochs"),
        summary_json: Optional[Path] = typer.Option(None, "--summary-json", help="write the summary here"),
        report: Optional[Path] = typer.Option(None, "--report", help="write plots and summary.json to DIR"),
        run_dir: Optional[Path] = typer.Option(None, "--run-dir",
                                               help="logs, checkpoints, resolved topology (default: runs/<name>-<time>)"),
        free_ports: bool = typer.Option(False, "--free-ports", help="use free loopback ports instead of the declared ones"),
        weights_out: Optional[Path] = typer.Option(None, "--weights-out", help="each node saves its final segment weights here"),
        weights: Optional[Path] = typer.Option(None, "--weights", help="start from the segment weights saved in DIR (fine-tuning)"),
        resume: bool = typer.Option(False, "--resume", help="continue from the last consistent checkpoint in --run-dir"),
        checkpoint_every: Optional[int] = typer.Option(
            None, "--checkpoint-every", min=1,
            help="checkpoint every N steps where the topology sets no checkpoint.every (default 10: failover on)"),
        no_checkpoint: bool = typer.Option(False, "--no-checkpoint", help="no checkpoints: a lost node ends the run"),
        progress: bool = typer.Option(True, "--progress/--no-progress"),
        timeout: Optional[float] = typer.Option(None, help="give up after this many seconds"),
        warm_standby: bool = typer.Option(False, "--warm-standby", help="a waiting second process per node takes "
                                          "over when the node dies (no start-up in recovery)"),
        log_level: Optional[str] = typer.Option(None, "--log-level",
                                                help="DEBUG, INFO, WARNING or ERROR, here and in every node's log")) -> None:
    """Train a topology locally: every node is its own process, talking over real ZeroMQ sockets."""
    from meshsl.runtime.launcher import (  # torch: not for `meshsl --help`
        DEFAULT_CHECKPOINT_EVERY, LocalRun, default_run_dir)
    level = _configure_logging(log_level) if log_level else _logging["level"]
    topo = load(topology)
    for warning in topo.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    total = _planned_steps(topo, steps, epochs)
    if resume and run_dir is None:
        fail(ConfigError("--resume needs the --run-dir of the interrupted run"))
    every = 0 if no_checkpoint else (checkpoint_every or DEFAULT_CHECKPOINT_EVERY)
    launcher = LocalRun(topology, run_dir or default_run_dir(topo.spec.name), steps=steps, epochs=epochs,
                        free_ports=free_ports, weights_out=weights_out, resume=resume, log_level=level,
                        weights_in=weights, checkpoint_every=every, warm_standby=warm_standby)
    resolved = launcher.prepare()
    console.print(f"run directory: {launcher.run_dir} (logs, checkpoints, summary)")
    summary, history = _train_with_progress(launcher, load(resolved, topology.parent), resolved,
                                            f"training {topo.spec.name}", total, progress, timeout)
    print_summary(summary)
    _write_outputs(summary, history, summary_json, report)


def _planned_steps(topo, steps: Optional[int], epochs: Optional[int]) -> int:
    """How many steps the run trains; a run over a declared epsilon budget does not start."""
    from meshsl.plan.steps import training_steps  # start-up: `meshsl --help` parses nothing
    try:
        total = len(training_steps(topo, steps, epochs))  # with sample ids: reads every party's ids here
    except MeshslError as exc:
        fail(exc)
    if topo.spec.privacy or topo.spec.training.label_dp:
        from meshsl.runtime.coordinator import privacy_budget_of  # torch: not for `meshsl --help`
        try:
            privacy_budget_of(topo, total)  # a run over a declared epsilon budget does not start
        except ConfigError as exc:
            fail(exc)
    return total


def _train_with_progress(launcher, resolved_topo, resolved: Path, title: str, total: int, progress: bool,
                         timeout: Optional[float]) -> tuple[dict, list[dict]]:
    """Start the nodes and follow them to the end under a progress bar; returns the summary and the
    progress rows seen (the history when the summary carries none)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn  # rich: never in a node process
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console.real(), disable=not progress)
    history = []
    with bar:
        job = bar.add_task(title, total=total, info="")

        def on_progress(row: dict) -> None:
            if row.get("event"):
                console.print(f"[yellow]{row['event']}[/yellow]: " + ", ".join(
                    f"{k}={v}" for k, v in row.items() if k not in ("event", "time")))
                return
            history.append(row)
            losses = " ".join(f"{k} loss {v['loss']:.3f}" for k, v in row.get("tasks", {}).items())
            bar.update(job, completed=row["step"] + 1,
                       info=f"epoch {row['epoch']} {losses} {row.get('samples_per_s', 0):.0f} samples/s")

        launcher.on_progress = on_progress
        launcher.start(resolved_topo, resolved)
        try:
            summary = launcher.follow(resolved_topo, timeout)
        except MeshslError as exc:
            fail(exc, 1)
        except KeyboardInterrupt:
            launcher.stop()
            raise typer.Exit(130)
    return summary, history


def _write_outputs(summary: dict, history: list[dict], summary_json: Optional[Path], report: Optional[Path]) -> None:
    if summary_json:
        summary_json.parent.mkdir(parents=True, exist_ok=True)
        summary_json.write_text(json.dumps(summary, indent=2, default=float))
        out.print(f"summary written to {summary_json}")
    if report:
        from meshsl.report import write_report  # matplotlib: only for --report
        paths = write_report(summary, summary.get("history", history), report)
        out.print(f"report: {', '.join(str(p) for p in paths)}")
