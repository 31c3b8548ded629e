"""The `meshsl` command line: validate, plan, run, node, keys, monitoring."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from meshsl.errors import ConfigError, MeshslError

app = typer.Typer(help="meshsl: declarative, pipelined, fault-tolerant split learning over ZeroMQ.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
monitoring_app = typer.Typer(help="Monitoring helpers (Prometheus targets).", no_args_is_help=True)
app.add_typer(monitoring_app, name="monitoring")


class _LazyConsole:
    """A rich Console made on first use: importing rich costs ~0.1 s, and `meshsl node` prints no tables."""

    def __init__(self, **options) -> None:
        self._options, self._console = options, None

    def real(self):
        if self._console is None:
            from rich.console import Console
            self._console = Console(**self._options)
        return self._console

    def __getattr__(self, name: str):
        return getattr(self.real(), name)


console = _LazyConsole(stderr=True)
# Piped or captured output (CI logs, `| less`) gets 160 columns instead of Rich's 80, so tables do not wrap.
out = _LazyConsole(soft_wrap=True, width=None if sys.stdout.isatty() or "COLUMNS" in __import__("os").environ else 160)


def fail(exc: Exception, code: int = 2) -> None:
    problems = getattr(exc, "problems", None) or [exc]
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    raise typer.Exit(code)


def load(path: Path, base_dir: Optional[Path] = None):
    from meshsl.topology.model import load_topology, topology_from_spec
    try:
        if base_dir is None:
            return load_topology(path)
        from meshsl.config.loader import load_spec
        return topology_from_spec(load_spec(path), str(path), base_dir)
    except ConfigError as exc:
        fail(exc)


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_logging = {"level": "WARNING", "json": False}  # what the root options chose (nodes re-apply it with their name)


def _configure_logging(level: str, node: Optional[str] = None) -> str:
    from meshsl.logs import configure_logging
    level = level.upper()
    if level not in LOG_LEVELS:
        fail(ConfigError(f"--log-level {level!r}: expected one of {', '.join(LOG_LEVELS)}"))
    _logging["level"] = level
    configure_logging(level, node=node, json=_logging["json"])
    return level


@app.callback()
def root(log_level: str = typer.Option("WARNING", "--log-level", help="DEBUG, INFO, WARNING or ERROR"),
         log_format: str = typer.Option("text", "--log-format", envvar="MESHSL_LOG_FORMAT",
                                        help="text or json: one line per event either way")) -> None:
    import os
    if log_format not in ("text", "json"):
        fail(ConfigError(f"--log-format {log_format!r}: expected text or json"))
    _logging["json"] = log_format == "json"
    os.environ["MESHSL_LOG_FORMAT"] = log_format  # node processes started by `meshsl run` inherit it
    _configure_logging(log_level)


@app.command()
def validate(topology: Path = typer.Argument(..., help="topology YAML")) -> None:
    """Check a topology; exit 0 when valid, print `error: ...` lines otherwise."""
    topo = load(topology)
    for warning in topo.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    out.print(f"{topology}: valid ({', '.join(topo.recognised_configurations())}; "
              f"{len(topo.nodes)} nodes, {len(topo.segments)} segments, {len(topo.tasks)} tasks)")


@app.command()
def plan(topology: Path = typer.Argument(...), as_json: bool = typer.Option(False, "--json", help="machine-readable"),
         cuts: bool = typer.Option(False, "--cuts", help="evaluate candidate cut points")) -> None:
    """Explain a topology: per-node plan, bytes per hop, the privacy contract, an ASCII drawing."""
    from rich.table import Table
    from meshsl.plan.explain import ascii_graph, plan_document
    topo = load(topology)
    document = plan_document(topo)
    if cuts:
        from meshsl.privacy_cuts import cut_candidates
        document["cut_candidates"] = cut_candidates(topo)
    if as_json:
        out.print_json(json.dumps(document, default=str))
        return
    out.print(f"[bold]{topo.spec.name}[/bold]  hash {topo.hash}  coordinator {topo.coordinator}")
    out.print("configurations: " + ", ".join(document["configurations"]))
    out.print(ascii_graph(topo), markup=False, highlight=False)
    nodes = Table(title="nodes")
    for column in ("node", "party", "endpoint", "segments", "params", "fwd FLOPs/sample", "peers"):
        nodes.add_column(column)
    for name, p in document["nodes"].items():
        nodes.add_row(name, p["party"], p["endpoint"] or "(dials out)", ", ".join(p["segments"]), f"{p['parameters']:,}",
                      f"{p['forward_flops_per_sample']:,}", ", ".join(p["peers"]))
    out.print(nodes)
    edges = Table(title="hops (bytes per sample)")
    for column in ("edge", "shape", "crosses party", "forward B", "backward B", "codec fwd/bwd"):
        edges.add_column(column)
    for name, e in document["edges"].items():
        edges.add_row(name, str(e["shape"]), "yes" if e["cross_party"] else "no",
                      *(f"{e[f'{d}_bytes_per_sample']:,}" + (f" (wire {e[f'{d}_wire_bytes_per_sample']:,})"
                                                                   if e[f"{d}_codec"] != "none" else "")
                        for d in ("forward", "backward")),
                      f"{e['forward_codec']}/{e['backward_codec']}")
    out.print(edges)
    contract = Table(title="privacy contract: what each party sends and receives")
    for column in ("party", "node", "sends/receives", "edge", "tensor", "peer (party)"):
        contract.add_column(column)
    for name, p in document["nodes"].items():
        for verb, rows in (("sends", p["sends"]), ("receives", p["receives"])):
            for t in rows:
                contract.add_row(p["party"], name, f"{verb} {t['direction']}", t["edge"],
                                 f"{t['dtype']}\\[{', '.join(map(str, t['shape']))}] ({t['codec']})", f"{t['peer']} ({t['peer_party']})")
    out.print(contract)
    if document.get("alignment"):
        from meshsl.cli_align import print_alignment_step
        print_alignment_step(out, document["alignment"])
    from meshsl.cli_privacy import print_plan_privacy
    print_plan_privacy(document)
    if cuts:
        table = Table(title="cut-layer candidates")
        for column in ("segment", "cut after", "bytes/sample", "client params", "client FLOPs/sample", "dCor (leakage)"):
            table.add_column(column)
        for c in document["cut_candidates"]:
            table.add_row(c["segment"], c["cut_after"], f"{c['bytes_per_sample']:,}", f"{c['client_parameters']:,}",
                          f"{c['client_flops_per_sample']:,}", f"{c['dcor']:.3f}")
        out.print(table)
    for warning in topo.warnings:
        out.print(f"[yellow]warning:[/yellow] {warning}")


def _print_summary(summary: dict) -> None:
    from rich.table import Table
    table = Table(title=f"{summary['topology']}: {summary['steps']} steps, {summary['epochs']} epochs, "
                        f"{summary['samples_per_s']:.0f} samples/s, {summary['wall_seconds']:.1f} s")
    for column in ("task", "train loss", "eval loss", "eval accuracy", "other"):
        table.add_column(column)
    for name, t in summary["tasks"].items():
        ev = t.get("eval", {})
        other = ", ".join(f"{k}={ev[k]:.3f}" for k in ("f1", "auroc") if isinstance(ev.get(k), float))
        table.add_row(name, f"{t['train'].get('loss', float('nan')):.4f}", f"{ev.get('loss', float('nan')):.4f}",
                      f"{ev.get('accuracy', float('nan')):.4f}", other)
    out.print(table)
    edges = Table(title="bytes per edge")
    for column in ("edge", "forward", "backward", "per sample"):
        edges.add_column(column)
    for name, e in summary["edges"].items():
        edges.add_row(name, f"{e['forward_bytes']:,}", f"{e['backward_bytes']:,}",
                      f"{summary['bytes_per_sample'][name]:.0f}")
    out.print(edges)
    if summary.get("rejected_messages"):
        out.print(f"[yellow]rejected messages:[/yellow] {summary['rejected_messages']}")
    from meshsl.cli_privacy import print_run_privacy
    print_run_privacy(summary)


@app.command()
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
    from meshsl.runtime.launcher import LocalRun, default_run_dir
    level = _configure_logging(log_level) if log_level else _logging["level"]
    topo = load(topology)
    for warning in topo.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    from meshsl.plan.steps import training_steps
    try:
        total = len(training_steps(topo, steps, epochs))  # with sample ids: reads every party's ids here
    except MeshslError as exc:
        fail(exc)
    from meshsl.runtime.launcher import DEFAULT_CHECKPOINT_EVERY
    if topo.spec.privacy or topo.spec.training.label_dp:
        from meshsl.runtime.coordinator import privacy_budget_of
        try:
            privacy_budget_of(topo, total)  # a run over a declared epsilon budget does not start
        except ConfigError as exc:
            fail(exc)
    if resume and run_dir is None:
        fail(ConfigError("--resume needs the --run-dir of the interrupted run"))
    every = 0 if no_checkpoint else (checkpoint_every or DEFAULT_CHECKPOINT_EVERY)
    launcher = LocalRun(topology, run_dir or default_run_dir(topo.spec.name), steps=steps, epochs=epochs,
                        free_ports=free_ports, weights_out=weights_out, resume=resume, log_level=level,
                        weights_in=weights, checkpoint_every=every, warm_standby=warm_standby)
    resolved = launcher.prepare()
    console.print(f"run directory: {launcher.run_dir} (logs, checkpoints, summary)")
    resolved_topo = load(resolved, topology.parent)
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console.real(), disable=not progress)
    history = []
    with bar:
        job = bar.add_task(f"training {topo.spec.name}", total=total, info="")

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
    _print_summary(summary)
    if summary_json:
        summary_json.parent.mkdir(parents=True, exist_ok=True)
        summary_json.write_text(json.dumps(summary, indent=2, default=float))
        out.print(f"summary written to {summary_json}")
    if report:
        from meshsl.report import write_report
        paths = write_report(summary, summary.get("history", history), report)
        out.print(f"report: {', '.join(str(p) for p in paths)}")


@app.command()
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
         progress_stream: bool = typer.Option(False, "--progress-stream", hidden=True)) -> None:
    """Run one node (one per machine); it waits for its peers and the coordinator."""
    from meshsl.runtime.coordinator import RunOptions
    from meshsl.runtime.entry import node_main
    topo = load(topology, base_dir)
    if name not in topo.nodes:
        fail(ConfigError(f"unknown node {name!r} (nodes: {', '.join(topo.nodes)})", str(topology)))
    overrides = _endpoint_overrides(topo, name, topology, bind, peer)
    _configure_logging(_logging["level"], node=name)  # every line of this process names its node
    from meshsl.security.curve import warn_if_plaintext_exposed
    import logging
    if topo.nodes[name].endpoint:  # a dial-out node binds nothing
        warn_if_plaintext_exposed(bind or topo.nodes[name].endpoint, topo.spec.security.curve, logging.getLogger("meshsl.node"))
    options = RunOptions(steps=steps, epochs=epochs, evaluate=not no_eval, startup_timeout_s=startup_timeout)
    if endpoint is not None and endpoint not in [topo.nodes[name].endpoint, *topo.nodes[name].standby]:
        fail(ConfigError(f"--endpoint {endpoint} is neither the endpoint nor a standby of node {name!r}", str(topology)))
    runtime_options = {"resume": resume, "endpoint": endpoint, "weights_dir": weights, **overrides}
    if standby:
        runtime_options["standby"] = True
    if partial_weights_out is not None:
        runtime_options["partial_weights_out"] = partial_weights_out
    if checkpoint_dir is not None:
        runtime_options["checkpoint_dir"] = checkpoint_dir
    try:
        if predict or predict_input or predict_output:
            from meshsl.predict import node_predict_options
            options.predict, runtime_options["inference"] = node_predict_options(
                topo, name, predict_input, predict_output, predict_batch_size)
        code = node_main(topo, name, summary_json, options, progress_stream, weights_out, **runtime_options)
    except MeshslError as exc:  # bad keys, data or checkpoints: a restart would fail the same way
        from meshsl.runtime.entry import EXIT_ABORTED
        fail(exc, EXIT_ABORTED)
    raise typer.Exit(code)


def _endpoint_overrides(topo, name: str, topology: Path, bind: Optional[str], peers: list[str]) -> dict:
    """Per-node overrides (command line or environment) of where this node binds and where it reaches
    its peers; the topology, and so its hash, stays the one every party agreed on."""
    from meshsl.config.schema import _check_endpoint
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


@monitoring_app.command("prometheus")
def monitoring_prometheus(topology: Path = typer.Argument(...),
                          output: Optional[Path] = typer.Option(None, "-o", "--output", help="file_sd JSON path")) -> None:
    """Write Prometheus file_sd scrape targets for every node with a metrics port."""
    from meshsl.metrics import scrape_targets
    topo = load(topology)
    rows = []
    for name, n in topo.nodes.items():
        if n.metrics_port and not n.inbound:  # behind its firewall: only a Prometheus on its own host reaches it
            print(f"note: {name} dials out; its metrics are served on 127.0.0.1:{n.metrics_port} of its own host "
                  f"(not listed)", file=sys.stderr)
            continue
        if n.metrics_port:
            host = n.endpoint[len("tcp://"):].rsplit(":", 1)[0] if (n.endpoint or "").startswith("tcp://") else "127.0.0.1"
            rows.append((name, n.party, "127.0.0.1" if host in ("*", "0.0.0.0") else host, n.metrics_port))
    text = json.dumps(scrape_targets(rows, topo.spec.name), indent=2)
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text + "\n")
        out.print(f"wrote {len(rows)} targets to {output}")
    else:
        print(text)


def _mount_optional() -> None:
    from meshsl.cli_keys import app as keys_app
    app.add_typer(keys_app, name="keys")
    __import__("meshsl.cli_privacy", fromlist=["mount"]).mount(app)  # meshsl audit
    __import__("meshsl.cli_model", fromlist=["mount"]).mount(app)  # meshsl predict / export / assemble / evaluate
    __import__("meshsl.cli_align", fromlist=["mount"]).mount(app)  # meshsl align
    __import__("meshsl.cli_simulate", fromlist=["mount"]).mount(app)  # meshsl simulate (in-process or Ray)


def _starting_a_node(argv: list[str]) -> bool:
    """This process is `meshsl [root options] node ...`: it needs none of the optional commands, whose
    modules import rich (start-up to the first step counts; docs/performance.md)."""
    entry = Path(argv[0]) if argv else None
    if entry is None or not (entry.name == "meshsl" or (entry.name == "__main__.py" and entry.parent.name == "meshsl")):
        return False
    args = iter(argv[1:])
    for arg in args:
        if arg in ("--log-level", "--log-format"):
            next(args, None)
        elif not arg.startswith("-"):
            return arg == "node"
    return False


if not _starting_a_node(sys.argv):
    _mount_optional()


def main() -> None:
    app()
