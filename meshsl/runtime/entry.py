"""Run one node in this process (the body of `meshsl node`)."""
from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Optional

from meshsl.runtime.coordinator import Coordinator, RunOptions
from meshsl.runtime.node import NodeRuntime

log = logging.getLogger("meshsl.node")

PROGRESS_PREFIX = "MESHSL_PROGRESS "

# Exit codes of `meshsl node`. A node that crashed (1, or killed by a signal) may be restarted from its
# checkpoint; a run that was aborted (3: the coordinator stopped it on an error, or went silent past
# every timeout) is over for every party, and a launcher must not restart anything.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_ABORTED = 3


def make_metrics(topology, node: str):
    spec = topology.nodes[node]
    if spec.metrics_port is None:
        return None
    from meshsl.metrics import NodeMetrics
    role = "coordinator" if node == topology.coordinator else "node"
    metrics = NodeMetrics(node, spec.party, role, topology.spec.name, topology.hash)
    security = topology.spec.security
    # Training figures (the label holder's loss and accuracy) are readable by whoever reaches this
    # port: loopback unless the topology says otherwise, and HTTPS with client certificates if asked.
    tls = {}
    if security.metrics_tls is not None:
        base = Path(topology.base_dir)
        tls = {"certfile": str(base / security.metrics_tls.certfile), "keyfile": str(base / security.metrics_tls.keyfile)}
        if security.metrics_tls.client_cafile:
            tls.update(client_cafile=str(base / security.metrics_tls.client_cafile), client_auth_required=True)
    metrics.serve(spec.metrics_port, security.metrics_bind, **tls)
    return metrics


def save_weights(runtime: NodeRuntime, directory: Path) -> list[Path]:
    """Each segment's final weights as safetensors (replicated client segments get the node name too)."""
    from safetensors.torch import save_file
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for segment, module in runtime.worker.modules.items():
        name = f"{segment}@{runtime.node}" if runtime.topology.is_replicated(segment) else segment
        path = directory / f"{name}.safetensors"
        save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, str(path))
        paths.append(path)
    return paths


def weights_file(runtime_or_topology, segment: str, node: str, directory: Path) -> Path:
    topology = getattr(runtime_or_topology, "topology", runtime_or_topology)
    name = f"{segment}@{node}" if topology.is_replicated(segment) else segment
    return Path(directory) / f"{name}.safetensors"


def load_saved_weights(worker, directory: Path) -> list[Path]:
    """Start a node from the weights `save_weights` wrote (`meshsl node --weights DIR`).

    Optimizer state is not restored: saved weights are for evaluation, prediction or fine-tuning."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from meshsl.errors import ConfigError
    paths = []
    for segment, module in worker.modules.items():
        path = weights_file(worker.topology, segment, worker.node, directory)
        if not path.is_file():
            raise ConfigError(f"no saved weights for segment {segment!r} of node {worker.node!r}: {path} is missing",
                              "--weights")
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}", "--weights") from None
        expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in state.items()}
        if expected != got:
            raise ConfigError(f"{path} does not fit segment {segment!r}: it holds {got}, the topology needs {expected}",
                              "--weights")
        module.load_state_dict(state)
        paths.append(path)
    return paths


async def run_node(topology, node: str, options: Optional[RunOptions] = None, progress_stream: bool = False,
                   transport=None, metrics=None, weights_out: Optional[Path] = None, executor=None,
                   partial_weights_out: Optional[Path] = None, **runtime_options) -> tuple[NodeRuntime, dict]:
    """`runtime_options` go to NodeRuntime: checkpoint_dir, resume, endpoint (a standby's).

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
        return Coordinator(runtime, options)

    runtime = NodeRuntime(topology, node, transport=transport, metrics=metrics,
                          coordinator_factory=coordinator_factory, **runtime_options)
    await runtime.run()
    if runtime.stood_down:  # a warm standby that was not needed: no weights, no summary
        return runtime, {}
    if weights_out is not None and not runtime.failure:
        save_weights(runtime, weights_out)
    elif partial_weights_out is not None and runtime.failure and runtime.worker is not None:
        save_weights(runtime, partial_weights_out)  # asked for: the weights of a failed run, kept apart
        log.warning("%s: the run failed; partial weights saved to %s", node, partial_weights_out)
    summary = runtime.coordinator.summary if runtime.coordinator else {}
    if runtime.coordinator is not None:
        summary = dict(summary, history=runtime.coordinator.history)
    return runtime, summary


def node_main(topology, node: str, summary_json: Optional[Path], options: RunOptions, progress_stream: bool,
              weights_out: Optional[Path] = None, **runtime_options) -> int:
    runtime, summary = asyncio.run(run_node(topology, node, options, progress_stream, weights_out=weights_out,
                                            **runtime_options))
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
    if summary and summary_json:
        summary_json.parent.mkdir(parents=True, exist_ok=True)
        summary_json.write_text(json.dumps(summary, indent=2, default=float))
    return 0
