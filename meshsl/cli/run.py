"""`meshsl run`: train a topology locally, one process per node."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from meshsl.cli.common import (DEVICE_HELP, SET_HELP, _configure_logging, _logging, console, fail, load, out,
                               overrides_of)
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
                                                help="DEBUG, INFO, WARNING or ERROR, here and in every node's log"),
        assignments: list[str] = typer.Option([], "--set", help=SET_HELP),
        device: Optional[str] = typer.Option(None, "--device", help=DEVICE_HELP)) -> None:
    """Train a topology locally: every node is its own process, talking over real ZeroMQ sockets."""
    from meshsl.launch.launcher import (  # torch: not for `meshsl --help`
        DEFAULT_CHECKPOINT_EVERY, LocalRun, default_run_dir)
    level = _configure_logging(log_level) if log_level else _logging["level"]
    overrides = overrides_of(assignments, device)
    topo = load(topology, overrides=overrides)
    for warning in topo.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    total = _planned_steps(topo, steps, epochs)
    if resume and run_dir is None:
        fail(ConfigError("--resume needs the --run-dir of the interrupted run"))
    run_dir = run_dir or default_run_dir(topo.spec.name)
    _preflight(topo, free_ports or resume, {"--run-dir": run_dir, "--weights-out": weights_out, "--report": report,
                                            "--summary-json": summary_json.parent if summary_json else None})
    every = 0 if no_checkpoint else (checkpoint_every or DEFAULT_CHECKPOINT_EVERY)
    launcher = LocalRun(topology, run_dir, steps=steps, epochs=epochs,
                        free_ports=free_ports, weights_out=weights_out, resume=resume, log_level=level,
                        weights_in=weights, checkpoint_every=every, warm_standby=warm_standby, overrides=overrides)
    resolved = launcher.prepare()
    console.print(f"run directory: {launcher.run_dir} (logs, checkpoints, summary)")
    summary, history = _train_with_progress(launcher, load(resolved, topology.parent), resolved,
                                            f"training {topo.spec.name}", total, progress, timeout,
                                            resume_hint=f"meshsl run {topology} --resume --run-dir {launcher.run_dir}")
    print_summary(summary)
    from meshsl.cli.privacy import print_leakage_warnings  # rich: never in a node process
    print_leakage_warnings(summary)
    _write_outputs(summary, history, summary_json, report)


def _preflight(topo, skip_ports: bool, directories: dict) -> None:
    """What a restart would not fix, found before any process starts (exit 2): a missing CUDA device, a
    declared port in use (not with --free-ports; on --resume the interrupted run's ports are reused), a
    directory that cannot be written."""
    from meshsl.launch.preflight import preflight  # torch: not for `meshsl --help`
    try:
        preflight(topo, ports=not skip_ports, directories=directories)
    except ConfigError as exc:
        fail(exc)


def _planned_steps(topo, steps: Optional[int], epochs: Optional[int]) -> int:
    """How many steps the run trains; a run over a declared epsilon budget does not start."""
    from meshsl.schedule.steps import training_steps  # start-up: `meshsl --help` parses nothing
    try:
        total = len(training_steps(topo, steps, epochs))  # with sample ids: reads every party's ids here
    except MeshslError as exc:
        fail(exc)
    if topo.spec.privacy or topo.spec.training.label_dp:
        from meshsl.coordinator.runtime import privacy_budget_of  # torch: not for `meshsl --help`
        try:
            privacy_budget_of(topo, total)  # a run over a declared epsilon budget does not start
        except ConfigError as exc:
            fail(exc)
    return total


def _train_with_progress(launcher, resolved_topo, resolved: Path, title: str, total: int, progress: bool,
                         timeout: Optional[float], resume_hint: str = "") -> tuple[dict, list[dict]]:
    """Start the nodes and follow them to the end under a progress bar (whole lines without a terminal);
    returns the summary and the progress rows seen (the history when the summary carries none)."""
    from meshsl.cli.progress import interrupted_text, progress_display  # rich: never in a node process
    history: list[dict] = []
    with progress_display(console.real(), title, total, progress) as display:

        def on_progress(row: dict) -> None:
            if not row.get("event"):
                history.append(row)
            display.row(row)

        launcher.on_progress = on_progress
        launcher.start(resolved_topo, resolved)
        try:
            return launcher.follow(resolved_topo, timeout), history
        except MeshslError as exc:
            fail(exc, 1)
        except KeyboardInterrupt:
            launcher.stop()
            interrupted = interrupted_text(history, launcher.run_dir, resume_hint,
                                           resolved_topo.spec.checkpoint.every > 0)
    console.print(interrupted, markup=False, highlight=False, soft_wrap=True)  # below the bar, once closed
    raise typer.Exit(130)


def _write_outputs(summary: dict, history: list[dict], summary_json: Optional[Path], report: Optional[Path]) -> None:
    if summary_json:
        summary_json.parent.mkdir(parents=True, exist_ok=True)
        summary_json.write_text(json.dumps(summary, indent=2, default=float))
        out.print(f"summary written to {summary_json}")
    if report:
        from meshsl.apps.report import write_report  # matplotlib: only for --report
        paths = write_report(summary, summary.get("history", history), report)
        out.print(f"report: {', '.join(str(p) for p in paths)}")
