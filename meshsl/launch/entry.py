"""Run one node in this process (the body of `meshsl node`)."""
from __future__ import annotations

import asyncio
import json
import logging
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Optional

from meshsl.compute.weights import load_saved_weights, save_weights, weights_file  # noqa: F401  (re-exported)
from meshsl.launch.metrics import NodeMetrics
from meshsl.coordinator.runtime import Coordinator, RunOptions
from meshsl.node.runtime import NodeRuntime

log = logging.getLogger("meshsl.node")

PROGRESS_PREFIX = "MESHSL_PROGRESS "

# Exit codes of `meshsl node`. A node that crashed (1, or killed by a signal) may be restarted from its
# checkpoint; a configuration error (2) would recur; a run that was aborted (3: the coordinator stopped it on an error, or went silent past
# every timeout) is over for every party, and a launcher must not restart anything.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2  # a bad topology or argument, or a failed pre-flight check: never restarted
EXIT_ABORTED = 3


EXIT_REPORT = "exited"  # `exited NAME PID` on the coordinator's stdin (meshsl node --exit-reports)


def read_exit_reports(coordinator: Coordinator, loop: asyncio.AbstractEventLoop, stream=None) -> threading.Thread:
    """Hand each `exited NAME PID` line of `stream` (stdin) to `coordinator`: its launcher saw that process
    of node NAME end. A thread (stdin is a pipe); it ends at end of input or once the loop is closed."""
    def read() -> None:
        for line in stream if stream is not None else sys.stdin:
            parts = line.split()
            if len(parts) != 3 or parts[0] != EXIT_REPORT or not parts[2].isdigit():
                continue
            try:
                loop.call_soon_threadsafe(coordinator.process_exited, parts[1], int(parts[2]))
            except RuntimeError:  # the loop is closed: the node has finished
                return

    thread = threading.Thread(target=read, name="exit-reports", daemon=True)
    thread.start()
    return thread


def make_metrics(topology, node: str):
    spec = topology.nodes[node]
    if spec.metrics_port is None:
        return None
    role = "coordinator" if node == topology.coordinator else "node"
    metrics = NodeMetrics(node, spec.party, role, topology.spec.name, topology.hash)
    security = topology.spec.security
    # Training figures (the label holder's loss and accuracy) are readable by whoever reaches this
    # port: loopback unless the topology says otherwise, and HTTPS with client certificates if asked.
    tls: dict[str, Any] = {}
    if security.metrics_tls is not None:
        base = Path(topology.base_dir)
        tls = {"certfile": str(base / security.metrics_tls.certfile), "keyfile": str(base / security.metrics_tls.keyfile)}
        if security.metrics_tls.client_cafile:
            tls.update(client_cafile=str(base / security.metrics_tls.client_cafile), client_auth_required=True)
    metrics.serve(spec.metrics_port, security.metrics_bind, **tls)
    return metrics


async def run_node(topology, node: str, options: Optional[RunOptions] = None, progress_stream: bool = False,
                   transport=None, metrics=None, weights_out: Optional[Path] = None, executor=None,
                   partial_weights_out: Optional[Path] = None, exit_reports: bool = False,
                   **runtime_options) -> tuple[NodeRuntime, dict]:
    """`runtime_options` go to NodeRuntime: checkpoint_dir, resume, endpoint (a standby's). `exit_reports`:
    the coordinator reads its launcher's reports of ended processes from stdin (read_exit_reports).

    `executor`: a concurrent.futures.Executor the node runs its compute on (a simulation shares one
    single-thread executor between all its nodes); None: the node's own compute thread."""
    runtime_options["executor"] = executor
    options = options or RunOptions()
    if progress_stream:
        def emit(row: dict) -> None:
            sys.stdout.write(PROGRESS_PREFIX + json.dumps(row, default=float) + "\n")
            sys.stdout.flush()
        options.progress = emit
    if metrics is None and runtime_options.pop("serve_metrics", True):
        if runtime_options.get("standby"):  # the primary holds the port until the standby takes over
            runtime_options["metrics_factory"] = lambda: make_metrics(topology, node)
        else:
            metrics = make_metrics(topology, node)

    def coordinator_factory(runtime: NodeRuntime) -> Coordinator:
        coordinator = Coordinator(runtime, options)
        if exit_reports:
            read_exit_reports(coordinator, asyncio.get_running_loop())
        return coordinator

    runtime = NodeRuntime(topology, node, transport=transport, metrics=metrics,
                          coordinator_factory=coordinator_factory, **runtime_options)
    await runtime.run()
    if runtime.stood_down:  # a warm standby that was not needed: no weights, no summary
        return runtime, {}
    if runtime.worker is not None and runtime.worker.recorder.active and not runtime.failure:
        runtime.worker.recorder.save()  # privacy[].record: kept at this (receiving) node only
    if weights_out is not None and not runtime.failure and not runtime.dropped:  # dropped: no final weights
        save_weights(runtime, weights_out)
    elif partial_weights_out is not None and runtime.failure and runtime.worker is not None:
        save_weights(runtime, partial_weights_out)  # asked for: the weights of a failed run, kept apart
        log.warning("%s: the run failed; partial weights saved to %s", node, partial_weights_out)
    summary = runtime.coordinator.summary if runtime.coordinator else {}
    if runtime.coordinator is not None:
        summary = dict(summary, history=runtime.coordinator.history)
    return runtime, summary


def node_main(topology, node: str, summary_json: Optional[Path], options: RunOptions, progress_stream: bool,
              weights_out: Optional[Path] = None, on_finish: Optional[Callable[[NodeRuntime, dict], None]] = None,
              **runtime_options) -> int:
    """Run the node to its end; `on_finish(runtime, summary)` says how it ended (the node's last line)."""
    runtime, summary = asyncio.run(run_node(topology, node, options, progress_stream, weights_out=weights_out,
                                            **runtime_options))
    if on_finish is not None:
        on_finish(runtime, summary)
    if runtime.failure:
        print(f"error: {runtime.failure}", file=sys.stderr)
        if weights_out is not None:
            print(f"error: node {node!r} wrote no weights to {weights_out} (the run failed)", file=sys.stderr)
        exc = getattr(runtime.coordinator, "exception", None)
        if summary_json and runtime.coordinator is not None:  # the launcher re-raises it typed
            summary_json.parent.mkdir(parents=True, exist_ok=True)
            summary_json.write_text(json.dumps({"error": runtime.failure, "error_type": type(exc).__name__ if exc else None,
                                                "peer": getattr(exc, "peer", None),
                                                "waited_s": getattr(exc, "waited_s", None)}))
        return EXIT_ABORTED  # an orderly failure with a reason: restarting this node would not help
    if runtime.dropped:
        print(f"warning: {runtime.dropped}", file=sys.stderr)
    if summary and summary_json:
        summary_json.parent.mkdir(parents=True, exist_ok=True)
        summary_json.write_text(json.dumps(summary, indent=2, default=float))
    return 0
