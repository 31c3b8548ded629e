"""Training from Python: every node as a local process (`run`, `start`), or all in this process (`simulate`).

Both return a RunResult. A progress callback sees each committed step's history row; returning False
from it (or calling `Run.cancel()`) stops every node cleanly, and so does KeyboardInterrupt (the stop
button of a notebook), which is raised again once every node process has ended."""
from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path
from typing import Any, Callable, Optional, Union

from meshsl.api.result import RunResult
from meshsl.api.topology import TopologySource, document_of, load
from meshsl.config.loader import load_spec
from meshsl.errors import RunCancelled
from meshsl.privacy.leakage_warnings import run_warnings
from meshsl.launch.launcher import DEFAULT_CHECKPOINT_EVERY, LocalRun, default_run_dir
from meshsl.launch.preflight import preflight
from meshsl.topology.model import topology_from_spec

log = logging.getLogger("meshsl.api")

ProgressCallback = Callable[[dict], Optional[bool]]  # a history row (or an event row) -> False: stop the run


class Run:
    """A run in progress: node processes on this machine, followed from this process. Made by `start`."""

    def __init__(self, launcher: LocalRun, topology, resolved: Path, on_progress: Optional[ProgressCallback]) -> None:
        self._launcher, self._topology, self._resolved = launcher, topology, resolved
        self._on_progress = on_progress
        self._callback_error: Optional[BaseException] = None
        self._lock = threading.Lock()
        self.history: list[dict] = []  # the history rows seen so far (the reader thread appends)
        launcher.on_progress = self._row
        launcher.start(topology, resolved)

    @property
    def run_dir(self) -> Path:
        """Logs (one per node), the resolved topology, checkpoints and summary.json."""
        return self._launcher.run_dir

    @property
    def pids(self) -> dict[str, int]:
        """The node processes' ids (replacements included once they started)."""
        return {name: proc.pid for name, proc in self._launcher.processes.items()}

    def running(self) -> dict[str, bool]:
        """Which node processes are still alive."""
        return {name: proc.poll() is None for name, proc in self._launcher.processes.items()}

    def cancel(self) -> None:
        """Stop every node; `wait` then raises RunCancelled. Safe from any thread and from a callback."""
        self._launcher.cancel_requested.set()

    def _row(self, row: dict) -> None:
        if not row.get("event"):
            with self._lock:
                self.history.append(row)
        if self._on_progress is None:
            return
        try:
            if self._on_progress(row) is False:
                self.cancel()
        except BaseException as exc:  # noqa: BLE001 - the callback's error ends the run, raised by wait()
            self._callback_error = exc
            self.cancel()

    def wait(self, timeout: Optional[float] = None) -> RunResult:
        """Follow the run to its end (failover included) and return its result.

        Raises:
            RunAborted, PeerFailed: the run failed (the cause names the node).
            RunCancelled: `cancel()` was called, or the progress callback returned False.
            KeyboardInterrupt: raised again after every node process was stopped.
        """
        try:
            summary = self._launcher.follow(self._topology, timeout)
        except KeyboardInterrupt:
            self._launcher.stop()
            raise
        except RunCancelled:
            if self._callback_error is not None:
                raise self._callback_error from None
            raise
        warnings = run_warnings(summary)
        for warning in warnings:
            log.warning("%s", warning)
        history = summary.get("history") or list(self.history)
        return RunResult(summary=summary, history=history, run_dir=self.run_dir,
                         weights_dir=self._launcher.weights_out, leakage_warnings=warnings)


def start(topology: TopologySource, *, steps: Optional[int] = None, epochs: Optional[int] = None,
          run_dir: Union[str, Path, None] = None, weights_out: Union[str, Path, None] = None,
          weights: Union[str, Path, None] = None, free_ports: bool = False,
          checkpoint_every: Optional[int] = DEFAULT_CHECKPOINT_EVERY, evaluate: bool = True,
          on_progress: Optional[ProgressCallback] = None, log_level: str = "WARNING", **load_options: Any) -> Run:
    """Start every node of a topology as its own local process (what ``meshsl run`` does); returns at once.

    Args:
        topology: a YAML path, a dict or a Topology (``load_options``: ``overrides``, ``device``, ``base_dir``).
        steps, epochs: train this many steps or epochs instead of the topology's.
        run_dir: logs, checkpoints, summary (default ``runs/<name>-<UTC time>``).
        weights_out: where each node saves its final segment weights (default ``run_dir/weights``).
        weights: start from the segment weights saved in this folder (fine-tuning).
        free_ports: use free loopback ports instead of the declared endpoints and metrics ports.
        checkpoint_every: checkpoint every N steps where the topology sets none (0: never; failover off).
        evaluate: evaluate on the held-out rows (at each epoch's end or ``training.eval_every``).
        on_progress: called with each history row from a background thread; returning False stops the run.

    Raises:
        ConfigError: the topology is invalid, or this machine cannot run it (a CUDA device it lacks, a
            declared port in use, a directory it cannot write): nothing was started.
    """
    topo = load(topology, **load_options)
    document, base_dir = document_of(topo)
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(topo.spec.name)
    weights_out = Path(weights_out) if weights_out is not None else run_dir / "weights"
    preflight(topo, ports=not free_ports, directories={"run_dir": run_dir, "weights_out": weights_out},
              port_hint="`free_ports=True`")
    launcher = LocalRun(Path(base_dir) / Path(topo.source).name, run_dir, steps=steps, epochs=epochs,
                        free_ports=free_ports, evaluate=evaluate, log_level=log_level, weights_out=weights_out,
                        weights_in=Path(weights) if weights is not None else None,
                        checkpoint_every=checkpoint_every or 0, document=document)
    resolved = launcher.prepare()
    resolved_topology = topology_from_spec(load_spec(resolved), str(resolved), base_dir)
    return Run(launcher, resolved_topology, resolved, on_progress)


def run(topology: TopologySource, *, timeout: Optional[float] = None, **options: Any) -> RunResult:
    """Train a topology with every node as a local process over real ZeroMQ sockets, like ``meshsl run``
    (same topology and seed: the same weights); blocks until the run ends. Options: see `start`.

    Raises:
        ConfigError: invalid topology or a failed pre-flight check (nothing started).
        RunAborted, PeerFailed: the run failed.
        RunCancelled: the progress callback returned False.
        KeyboardInterrupt: every node process was stopped first.
    """
    return start(topology, **options).wait(timeout)


def simulate(topology: TopologySource, *, steps: Optional[int] = None, epochs: Optional[int] = None,
             evaluate: bool = True, weights_out: Union[str, Path, None] = None,
             on_progress: Optional[ProgressCallback] = None, timeout: Optional[float] = None,
             **load_options: Any) -> RunResult:
    """Train every logical node in this process over the in-process transport (``meshsl simulate``):
    no sockets, no processes; the same weights as `run` for the same topology and seed.

    Raises:
        ConfigError: invalid topology, or a CUDA device this machine lacks.
        PeerFailed: the run failed. RunCancelled: the progress callback returned False.
        TimeoutError: it did not finish within `timeout` seconds.
    """
    from meshsl.compute.weights import save_weights  # torch: loaded by the topology's shape inference anyway
    from meshsl.coordinator.runtime import RunOptions
    from meshsl.launch.simulate import simulate as simulate_here
    topo = load(topology, **load_options)
    preflight(topo, ports=False)
    job = _InProcess()
    history: list[dict] = []

    def progress(row: dict) -> None:
        if not row.get("event"):
            history.append(row)
        if on_progress is not None and on_progress(row) is False:
            job.cancel(history[-1]["step"] if history else -1)

    summary, runtimes = job.run(simulate_here(topo, RunOptions(steps=steps, epochs=epochs, evaluate=evaluate,
                                                               progress=progress)), timeout)
    if weights_out is not None:
        for runtime in runtimes.values():
            if runtime.worker is not None and not runtime.dropped:
                save_weights(runtime, Path(weights_out))
    return RunResult(summary=summary, history=summary.get("history") or history,
                     weights_dir=Path(weights_out) if weights_out is not None else None,
                     leakage_warnings=run_warnings(summary))


class _InProcess:
    """Runs a simulation's coroutine to its end on a fresh event loop: in this thread, or in a helper
    thread when this one already runs a loop (Jupyter). `cancel` (from the loop) stops every node."""

    def __init__(self) -> None:
        self._task: Optional[asyncio.Task] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._cancelled_at: Optional[int] = None

    def cancel(self, step: int = -1) -> None:
        self._cancelled_at = step
        if self._task is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._task.cancel)

    async def _main(self, coroutine, timeout: Optional[float]):
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.ensure_future(coroutine)
        try:
            return await asyncio.wait_for(self._task, timeout) if timeout else await self._task
        except asyncio.CancelledError:
            if self._cancelled_at is not None:
                raise RunCancelled(self._cancelled_at) from None
            raise

    def run(self, coroutine, timeout: Optional[float]):
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self._main(coroutine, timeout))  # Ctrl-C cancels the task: every node stops
        outcome: dict = {}

        def body() -> None:
            try:
                outcome["value"] = asyncio.run(self._main(coroutine, timeout))
            except BaseException as exc:  # noqa: BLE001 - raised again in the caller's thread
                outcome["error"] = exc

        helper = threading.Thread(target=body, name="meshsl-simulate", daemon=True)
        helper.start()
        try:
            while helper.is_alive():
                helper.join(0.1)
        except KeyboardInterrupt:
            self.cancel()
            helper.join()
            raise
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]
