"""`meshsl node`: run one node of a topology in this process (what `meshsl run` starts per node)."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from meshsl.cli.common import SET_HELP, _configure_logging, _logging, fail, load, overrides_of
from meshsl.cli.progress import LineProgress
from meshsl.errors import ConfigError, MeshslError


def node(name: str = typer.Argument(..., help="node name from the topology"),
         topology: Path = typer.Option(..., "--topology", "-t"),
         base_dir: Optional[Path] = typer.Option(None, "--base-dir", help="folder that relative data paths start from"),
         summary_json: Optional[Path] = typer.Option(None, "--summary-json"),
         steps: Optional[int] = typer.Option(None), epochs: Optional[int] = typer.Option(None),
         no_eval: bool = typer.Option(False, "--no-eval"),
         weights_out: Optional[Path] = typer.Option(None, "--weights-out", help="save final segment weights here"),
         partial_weights_out: Optional[Path] = typer.Option(
             None, "--partial-weights-out", help="if the run fails, save this node's weights here (never to --weights-out)"),
         resume: bool = typer.Option(False, "--resume", help="continue from this node's last complete checkpoint"),
         checkpoint_dir: Optional[Path] = typer.Option(None, "--checkpoint-dir", help="overrides checkpoint.directory"),
         endpoint: Optional[str] = typer.Option(None, "--endpoint", help="bind here instead (a declared standby endpoint)"),
         weights: Optional[Path] = typer.Option(None, "--weights", help="start from the segment weights saved in DIR"),
         predict: bool = typer.Option(False, "--predict", help="forward-only prediction rounds instead of training"),
         predict_input: Optional[Path] = typer.Option(None, "--predict-input", help="this node's own input rows (CSV/.npy)"),
         predict_output: Optional[Path] = typer.Option(None, "--predict-output", help="write the predictions this node owns to DIR"),
         predict_batch_size: Optional[int] = typer.Option(None, "--predict-batch-size", min=1, help="rows per micro-batch"),
         startup_timeout: Optional[float] = typer.Option(None, "--startup-timeout", help="coordinator: wait this long for every node"),
         bind: Optional[str] = typer.Option(None, "--bind", envvar="MESHSL_BIND",
                                            help="bind the socket here (e.g. tcp://0.0.0.0:7003 in a container); "
                                                 "peers keep using the topology's endpoint"),
         peer: list[str] = typer.Option([], "--peer", help="NAME=ENDPOINT: reach peer NAME there instead of at the "
                                         "topology's endpoint (repeatable; also MESHSL_PEERS=NAME=ENDPOINT,...)"),
         standby: bool = typer.Option(False, "--standby", help="warm standby: start and wait; a line 'takeover' on "
                                      "stdin (after the primary died) takes over its endpoint and resumes"),
         progress_stream: bool = typer.Option(False, "--progress-stream", hidden=True),
         exit_reports: bool = typer.Option(False, "--exit-reports", hidden=True),  # launcher: entry.read_exit_reports
         assignments: list[str] = typer.Option([], "--set", help=SET_HELP + " (every party must set the same)")) -> None:
    """Run one node (one per machine); it waits for its peers and the coordinator."""
    from meshsl.launch import entry  # torch: not for `meshsl --help` (entry.node_main: looked up per call)
    from meshsl.coordinator.runtime import RunOptions  # torch: not for `meshsl --help`
    topo = load(topology, base_dir, overrides_of(assignments))
    if name not in topo.nodes:
        fail(ConfigError(f"unknown node {name!r} (nodes: {', '.join(topo.nodes)})", str(topology)))
    _preflight(topo, name, checkpoint_dir, weights_out, check_port=not (standby or bind or endpoint or resume))
    overrides = _endpoint_overrides(topo, name, topology, bind, peer)
    from meshsl.security.curve import warn_if_plaintext_exposed  # start-up: `meshsl --help` parses nothing
    _configure_logging(_logging["level"], node=name)  # every line of this process names its node
    if topo.nodes[name].endpoint:  # a dial-out node binds nothing
        warn_if_plaintext_exposed(bind or topo.nodes[name].endpoint, topo.spec.security.curve, logging.getLogger("meshsl.node"))
    options = RunOptions(steps=steps, epochs=epochs, evaluate=not no_eval, startup_timeout_s=startup_timeout)
    if not progress_stream and name == topo.coordinator:  # `meshsl run` reads its progress from stdout instead
        options.progress = LineProgress(f"node {name}", steps or topo.spec.training.steps).row
    if endpoint is not None and endpoint not in [topo.nodes[name].endpoint, *topo.nodes[name].standby]:
        fail(ConfigError(f"--endpoint {endpoint} is neither the endpoint nor a standby of node {name!r}", str(topology)))
    runtime_options = {"resume": resume, "endpoint": endpoint, "weights_dir": weights, **overrides,
                       **({"standby": True} if standby else {}), **({"exit_reports": True} if exit_reports else {}),
                       **({"partial_weights_out": partial_weights_out} if partial_weights_out is not None else {}),
                       **({"checkpoint_dir": checkpoint_dir} if checkpoint_dir is not None else {})}
    try:
        if predict or predict_input or predict_output:
            from meshsl.apps.predict import node_predict_options  # torch: not for `meshsl --help`
            options.predict, runtime_options["inference"] = node_predict_options(
                topo, name, predict_input, predict_output, predict_batch_size)
        code = entry.node_main(topo, name, summary_json, options, progress_stream, weights_out, **runtime_options,
                               on_finish=lambda runtime, summary: print_final_line(runtime, summary, weights_out, summary_json))
    except MeshslError as exc:  # bad keys, data or checkpoints: a restart would fail the same way
        fail(exc, entry.EXIT_ABORTED)
    raise typer.Exit(code)


def _preflight(topo, name: str, checkpoint_dir: Optional[Path], weights_out: Optional[Path], check_port: bool) -> None:
    """What a restart would not fix, before the node builds anything (exit 2, never restarted): a CUDA
    device this machine lacks, its port in use, a checkpoint or weights directory it cannot write."""
    from meshsl.launch.preflight import preflight  # torch: not for `meshsl --help`
    directories: dict[str, Optional[Path]] = {"--checkpoint-dir" if checkpoint_dir else "checkpoint.directory":
                   checkpoint_dir or Path(topo.spec.checkpoint.directory)} if topo.spec.checkpoint.every else {}
    directories["--weights-out"] = weights_out
    try:
        preflight(topo, [name], ports=check_port, directories=directories,
                  port_hint="another --endpoint/--bind, or stop the process holding it")
    except ConfigError as exc:
        fail(exc)


def print_final_line(runtime, summary: dict, weights_out: Optional[Path], summary_json: Optional[Path]) -> None:
    """The node's last line on stderr: how the run ended for it (errors have their own `error:` lines)."""
    if runtime.failure or runtime.stood_down:
        return
    where = f"; weights saved to {weights_out}" if weights_out is not None and not runtime.dropped else ""
    if runtime.coordinator is None or not summary:
        print(f"node {runtime.node}: finished{where}", file=sys.stderr, flush=True)
        return
    figures = ", ".join(f"{task} " + " ".join(f"{k} {v:.4f}" for k, v in t.get("eval", {}).items()
                                               if k in ("loss", "accuracy", "f1", "auroc") and isinstance(v, float))
                        for task, t in summary.get("tasks", {}).items())
    saved = f"; summary written to {summary_json}" if summary_json else ""
    print(f"node {runtime.node}: run finished: {summary.get('steps', 0)} steps, {summary.get('epochs', 0)} epochs, "
          f"{summary.get('wall_seconds', 0.0):.1f} s; {figures or 'no evaluation'}{where}{saved}",
          file=sys.stderr, flush=True)


def _endpoint_overrides(topo, name: str, topology: Path, bind: Optional[str], peers: list[str]) -> dict:
    """Per-node overrides (command line or environment) of where this node binds and where it reaches
    its peers; the topology, and so its hash, stays the one every party agreed on."""
    from meshsl.config.schema import _check_endpoint  # start-up: `meshsl --help` parses nothing
    where = str(topology)
    options: dict = {}
    if bind is not None:
        if not topo.nodes[name].inbound:
            fail(ConfigError(f"--bind/MESHSL_BIND: node {name!r} has `inbound: false` and binds nothing", where))
        try:
            options["bind"] = _check_endpoint(bind)
        except ValueError as exc:
            fail(ConfigError(f"--bind/MESHSL_BIND: {exc}", where))
    entries = [*peers, *[e for e in os.environ.get("MESHSL_PEERS", "").split(",") if e.strip()]]
    book: dict[str, str] = {}
    for entry in entries:
        peer_name, sep, endpoint = entry.strip().partition("=")
        source = "--peer" if entry in peers else "MESHSL_PEERS"
        if not sep or peer_name not in topo.nodes:
            fail(ConfigError(f"{source} {entry!r}: expected NAME=ENDPOINT with NAME one of {', '.join(topo.nodes)}",
                             where))
        if not topo.nodes[peer_name].inbound:
            fail(ConfigError(f"{source} {entry!r}: node {peer_name!r} dials out and has no endpoint to override",
                             where))
        try:
            book.setdefault(peer_name, _check_endpoint(endpoint.strip()))  # the command line wins
        except ValueError as exc:
            fail(ConfigError(f"{source} {entry!r}: {exc}", where))
    if book:
        options["peer_endpoints"] = book
    return options
