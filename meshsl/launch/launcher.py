"""`meshsl run`: start every node of a topology as its own local process and follow the coordinator."""
from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import yaml

from meshsl.config.overrides import apply_overrides
from meshsl.errors import MeshslError, PeerFailed, RunAborted, RunCancelled
from meshsl.launch.entry import EXIT_ABORTED, EXIT_CONFIG, PROGRESS_PREFIX

# `meshsl run` checkpoints every this many steps unless the topology says otherwise or --no-checkpoint
# (docs/failover.md has the measured cost per step).
DEFAULT_CHECKPOINT_EVERY = 10
# After a node exits 3 (run aborted): how long the others, and the coordinator, get to exit by themselves.
ABORT_GRACE_S = 5.0
ABORT_GRACE_COORDINATOR_S = 20.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_free_ports(document: dict) -> dict:
    """Rewrite tcp endpoints and metrics ports to free loopback ports (parallel runs, tests)."""
    replicas = (document.get("clients") or {}).get("count", 1)
    replicated = set((document.get("clients") or {}).get("replicate", []))
    taken: set[int] = set()  # every port handed out here: no two nodes get the same one
    for node in document["nodes"]:
        span = replicas if node["name"] in replicated else 1
        if str(node.get("endpoint")).startswith("tcp://"):  # a dial-out node (inbound: false) has none
            base = _free_block(span, taken)
            node["endpoint"] = f"tcp://127.0.0.1:{base}"
            node["standby"] = [f"tcp://127.0.0.1:{_free_block(span, taken)}" for _ in node.get("standby", [])]
        if node.get("metrics_port"):
            node["metrics_port"] = _free_block(span, taken)
    return document


def _free_block(span: int, taken: set[int] | None = None) -> int:
    """A base port whose next `span` ports are free (replicated nodes use base+lane) and not in `taken`
    (the kernel may hand the same ephemeral port out twice in a row once the probe socket is closed)."""
    taken = set() if taken is None else taken
    for _ in range(200):
        base = free_port()
        if base + span >= 65535:
            continue
        ok = True
        for port in range(base, base + span):
            if port in taken:
                ok = False
                break
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
                    break
        if ok:
            taken.update(range(base, base + span))
            return base
    raise MeshslError(f"no block of {span} free ports found")


class ExitReports:
    """Tells the coordinator's process at once when the process of another node ends: a line `exited NAME
    PID` on its stdin (it runs with `meshsl node --exit-reports`). The crash of a node is then detected
    without a heartbeat timeout, a round timeout or its replacement's start-up, and only that node is named."""

    def __init__(self) -> None:
        self.attached: Optional[subprocess.Popen] = None  # the coordinator process that reads them
        self.told: set[int] = set()

    def attach(self, coordinator: subprocess.Popen) -> None:
        self.attached = coordinator

    def exited(self, name: str, proc: subprocess.Popen, coordinator: subprocess.Popen) -> None:
        """`proc` of node `name` ended; told once per process, and only to a coordinator that reads reports
        (one that took over from a warm standby does not)."""
        if proc is coordinator or coordinator is not self.attached or proc.pid in self.told:
            return
        self.told.add(proc.pid)
        if coordinator.stdin is None:
            return  # started without a pipe: it reads no reports
        try:
            coordinator.stdin.write(f"exited {name} {proc.pid}\n".encode())
            coordinator.stdin.flush()
        except (OSError, ValueError):  # the coordinator is gone too: its own exit decides
            pass


@dataclass
class LocalRun:
    topology_path: Path
    run_dir: Path
    steps: Optional[int] = None
    epochs: Optional[int] = None
    free_ports: bool = False
    evaluate: bool = True
    on_progress: Optional[Callable[[dict], None]] = None
    log_level: str = "WARNING"
    weights_out: Optional[Path] = None
    weights_in: Optional[Path] = None  # every node starts from these saved weights (`--weights`)
    node_args: dict = field(default_factory=dict)  # node name (or "*" for all) -> extra `meshsl node` arguments
    resume: bool = False
    # None: as the topology says; N > 0: checkpoint every N steps where the topology declares no
    # checkpoint.every (failover on by default); 0: never (overrides the topology).
    checkpoint_every: Optional[int] = None
    # A second, already started process per node waits (`meshsl node --standby`) and takes over when the
    # node dies: recovery does not pay process start-up (docs/failover.md).
    warm_standby: bool = False
    exit_reports: bool = True  # the coordinator hears at once when a node's process ends (ExitReports)
    # The topology as data (the Python API), instead of reading `topology_path`, whose folder stays the base
    # of relative data paths; `overrides`: `--set` key paths applied before it is written (config.overrides).
    document: Optional[dict] = None
    overrides: Optional[list] = None
    standbys: dict = field(default_factory=dict)  # node -> its waiting standby process
    restarts: dict = field(default_factory=dict)
    events: list = field(default_factory=list)  # failover events with monotonic timestamps
    _lost: list = field(default_factory=list)
    cancel_requested: threading.Event = field(default_factory=threading.Event)  # set: follow() stops every node
    last_step: int = -1  # the last committed step the coordinator reported
    _failures: dict = field(default_factory=dict)  # node -> (last log line, last step seen) at its last failure
    _last_step_seen: Optional[float] = None  # when the coordinator last reported a committed step
    started_at: dict = field(default_factory=dict)
    processes: dict = field(default_factory=dict)
    _exit_reports: ExitReports = field(default_factory=ExitReports)

    def prepare(self) -> Path:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        resolved = self.run_dir / "topology.yaml"
        if self.resume and resolved.exists():
            return resolved  # same endpoints and hash as the interrupted run
        document = copy.deepcopy(self.document) if self.document is not None else \
            yaml.safe_load(self.topology_path.read_text())
        document = apply_overrides(document, self.overrides)
        if self.free_ports:
            document = with_free_ports(document)
        self._apply_checkpoint_default(document)
        resolved = self.run_dir / "topology.yaml"
        resolved.write_text(yaml.safe_dump(document, sort_keys=False))
        return resolved

    def _apply_checkpoint_default(self, document: dict) -> None:
        if self.checkpoint_every is None or not isinstance(document, dict):
            return
        section = document.get("checkpoint")
        section = section if isinstance(section, dict) else {}
        if self.checkpoint_every == 0:
            section["every"] = 0
        elif "every" not in section:
            section["every"] = self.checkpoint_every
        document["checkpoint"] = section

    def command(self, resolved: Path, node: str, coordinator: bool, resume: bool = False,
                endpoint: Optional[str] = None, standby: bool = False) -> list[str]:
        cmd = [sys.executable, "-m", "meshsl", "--log-level", self.log_level, "node", node,
               "--topology", str(resolved), "--base-dir", str(self.topology_path.parent.resolve()),
               "--checkpoint-dir", str(self.checkpoint_dir)]
        if resume or self.resume:
            cmd.append("--resume")
        if endpoint:
            cmd += ["--endpoint", endpoint]
        if standby:
            cmd.append("--standby")
        if self.weights_out is not None:
            cmd += ["--weights-out", str(self.weights_out.resolve())]
        if self.weights_in is not None:
            cmd += ["--weights", str(Path(self.weights_in).resolve())]
        cmd += [*self.node_args.get("*", []), *self.node_args.get(node, [])]
        if coordinator:
            cmd += ["--summary-json", str(self.run_dir / "summary.json"), "--progress-stream",
                    *(["--exit-reports"] if self.exit_reports and not standby else [])]
            if self.steps is not None:  # 0: no training (evaluate saved weights)
                cmd += ["--steps", str(self.steps)]
            if self.epochs is not None:
                cmd += ["--epochs", str(self.epochs)]
            if not self.evaluate:
                cmd += ["--no-eval"]
        return cmd

    @property
    def checkpoint_dir(self) -> Path:
        return (self.run_dir / "checkpoints").resolve()

    def start(self, topology, resolved: Path, elsewhere=()) -> None:
        """One process per node of `topology` (`resolved`: its file), but none for the nodes run
        `elsewhere` (on other machines: `meshsl predict --remote`)."""
        self._topology, self._resolved = topology, resolved
        local = [name for name in topology.nodes if name not in elsewhere]
        for name in local:
            self._spawn(name)
        if self.warm_standby:
            for name in local:
                self._spawn_standby(name)

    def _spawn(self, name: str, resume: bool = False, endpoint: Optional[str] = None,
               standby: bool = False) -> subprocess.Popen:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        coordinator = name == self._topology.coordinator
        log_file = open(self.run_dir / f"{name}.log", "ab")
        proc = subprocess.Popen(self.command(self._resolved, name, coordinator, resume, endpoint, standby), env=env,
                                stdout=subprocess.PIPE if coordinator else log_file, stderr=log_file,
                                stdin=subprocess.PIPE if standby or coordinator else None)
        log_file.close()
        if coordinator:
            threading.Thread(target=self._read_progress, args=(proc,), daemon=True).start()
        if standby:
            return proc
        if coordinator and self.exit_reports:
            self._exit_reports.attach(proc)
        self.processes[name] = proc
        self.started_at[name] = time.monotonic()
        return proc

    def _next_endpoint(self, name: str) -> Optional[str]:
        """Where the node's next replacement binds: its declared standby endpoints in turn, else its own."""
        node = self._topology.nodes[name]
        return node.standby[self.restarts.get(name, 0) % len(node.standby)] if node.standby else None

    def _spawn_standby(self, name: str) -> None:
        self.standbys[name] = self._spawn(name, resume=True, endpoint=self._next_endpoint(name), standby=True)

    def restart(self, name: str) -> None:
        """Start a failed node again from its last checkpoint (at its standby endpoint if it has one);
        with a warm standby waiting, that process takes over instead and a new standby starts."""
        node = self._topology.nodes[name]
        endpoint = self._next_endpoint(name)
        self.restarts[name] = self.restarts.get(name, 0) + 1
        standby = self.standbys.pop(name, None)
        if standby is not None and standby.poll() is None:
            try:
                standby.stdin.write(b"takeover\n")
                standby.stdin.flush()
            except OSError:
                standby = None
        else:
            standby = None
        self.events.append({"event": "takeover" if standby else "restart", "node": name,
                            "endpoint": endpoint or node.endpoint, "time": time.monotonic()})
        if standby is None:
            self._spawn(name, resume=True, endpoint=endpoint)
        else:
            self.processes[name] = standby
            self.started_at[name] = time.monotonic()
        if self.warm_standby:
            self._spawn_standby(name)  # waits for the next failure

    def follow(self, topology, timeout: Optional[float] = None) -> dict:
        """Follow the run until the coordinator finishes; restart nodes that die (failover)."""
        deadline = time.monotonic() + timeout if timeout else None
        budget = topology.spec.retry.max_restarts
        recoverable = topology.spec.checkpoint.every > 0
        while True:
            coordinator = self.processes[topology.coordinator]
            if coordinator.poll() == 0:
                break
            silence = topology.spec.retry.heartbeat_timeout_s
            for name, noticed in self._lost_by_coordinator():
                proc = self.processes.get(name)
                # Replace a process that went silent (e.g. paused); not a replacement started since (on
                # a busy machine the coordinator notices late: one started after the last step is new).
                since_step = self._last_step_seen is None or self.started_at[name] < self._last_step_seen
                if proc is not None and proc.poll() is None and self.started_at[name] < noticed - silence \
                        and since_step:
                    proc.kill()
                    proc.wait()
            # The coordinator first: when it fails, the nodes it told stop too (non-zero), and the run is its.
            for name, proc in sorted(self.processes.items(), key=lambda item: item[0] != topology.coordinator):
                code = proc.poll()
                if code is None or code == 0:  # a coordinator that just finished: the check above ends the loop
                    continue
                if code == EXIT_ABORTED:  # an orderly failure: the run is over for every party
                    raise self._aborted(topology, name)
                self._exit_reports.exited(name, proc, coordinator)
                hopeless = self._not_worth_restarting(name, code)
                if hopeless:  # a restart would fail the same way: end now, with the node's own error
                    self.stop()
                    raise PeerFailed(name, hopeless)
                if not recoverable or self.restarts.get(name, 0) >= budget:
                    if recoverable and _droppable(topology, name):
                        continue  # clients.on_loss: drop: the run goes on without this client
                    self.stop()
                    why = "" if recoverable else " (set checkpoint.every to recover from node loss)"
                    raise PeerFailed(name, self.log_tail(name) + why)
                self.restart(name)
            if deadline and time.monotonic() > deadline:
                self.stop()
                raise PeerFailed(topology.coordinator, f"the run did not finish within {timeout:.0f}s")
            if self.cancel_requested.is_set():
                self.stop()
                raise RunCancelled(self.last_step, str(self.run_dir))
            time.sleep(0.02)
        self._dismiss_standbys()
        path = self.run_dir / "summary.json"
        left_out = _dropped_at_end(json.loads(path.read_text())) if path.exists() else set()  # their exit
        # does not decide the run: clients dropped and not readmitted (clients.on_loss: drop)
        for name, proc in self.processes.items():
            try:
                proc.wait(timeout=5 if name in left_out else 30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        bad = [n for n, p in self.processes.items() if p.returncode != 0 and n not in left_out]
        if bad:
            raise PeerFailed(bad[0], self.log_tail(bad[0]))
        return json.loads(path.read_text())

    def _aborted(self, topology, first: str) -> RunAborted:
        """Every party stops by itself once the run is aborted; give them a moment to say why, then
        stop what is left. The coordinator's own error, when it wrote one, names the cause: it gets
        longer (it tells every other node first, lost ones included), so it exits 3 with its `error:` line."""
        start = time.monotonic()
        for name, proc in sorted(self.processes.items(), key=lambda item: item[0] == topology.coordinator):
            grace = ABORT_GRACE_COORDINATOR_S if name == topology.coordinator else ABORT_GRACE_S
            try:
                proc.wait(timeout=max(0.1, start + grace - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        self.stop()
        path = self.run_dir / "summary.json"
        reason = _summary_error(path) or self._last_error_line(first) or self.log_tail(first)
        codes = ", ".join(f"{n}={p.returncode}" for n, p in self.processes.items())
        return RunAborted(topology.coordinator if path.exists() else first, f"{reason} (exit codes: {codes})")

    def _last_error_line(self, node: str) -> str:
        return _first_error_line(self.run_dir / f"{node}.log")

    def _not_worth_restarting(self, name: str, code: int) -> str:
        """Why restarting node `name` (exit `code`) cannot help, or "" (see `_hopeless`)."""
        verdict, self._failures[name] = _hopeless(self.run_dir / f"{name}.log", code, self._failures.get(name),
                                                  self._last_step_seen)
        return verdict or ("" if code != EXIT_CONFIG else self.log_tail(name))

    def _lost_by_coordinator(self) -> list[tuple[str, float]]:
        lost: list[tuple[str, float]] = []
        while self._lost:
            lost.extend(self._lost.pop())
        return lost

    def _read_progress(self, proc: subprocess.Popen) -> None:
        for raw in proc.stdout or ():  # no pipe: no progress lines
            line = raw.decode("utf-8", "replace")
            if not line.startswith(PROGRESS_PREFIX):
                continue
            try:
                row = json.loads(line[len(PROGRESS_PREFIX):])
            except ValueError:
                continue
            if "step" in row and not row.get("event"):
                self._last_step_seen = time.monotonic()
                self.last_step = int(row["step"])
            if row.get("event"):
                self.events.append(dict(row, time=time.monotonic()))
                if row["event"] == "nodes_lost":
                    self._lost.append([(n, time.monotonic()) for n in row.get("nodes", [])])
            if self.on_progress:
                self.on_progress(row)

    def log_tail(self, node: str, lines: int = 15) -> str:
        path = self.run_dir / f"{node}.log"
        text = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
        tail = "\n".join(text[-lines:])
        return f"log {path}:\n{tail}" if tail else f"exit code {self.processes[node].returncode}, log {path} is empty"

    def _dismiss_standbys(self) -> None:
        standbys, self.standbys = list(self.standbys.values()), {}
        _dismiss(standbys)

    def stop(self) -> None:
        self._dismiss_standbys()
        for proc in self.processes.values():
            if proc.poll() is None:
                proc.terminate()
                try:
                    os.kill(proc.pid, signal.SIGCONT)  # a paused (SIGSTOP) process wakes up to die
                except ProcessLookupError:
                    pass
        for proc in self.processes.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _dismiss(standbys: list) -> None:
    """The run is over: each waiting standby reads end of input and exits without doing anything."""
    for proc in standbys:
        try:
            proc.stdin.close()
        except OSError:
            pass
        if proc.poll() is None:
            proc.terminate()  # it may still be importing torch: no need to wait until it reads stdin
    for proc in standbys:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _summary_error(path: Path) -> str:
    """The coordinator's error in its summary file ("" if it wrote none)."""
    try:
        return str(json.loads(path.read_text()).get("error") or "") if path.exists() else ""
    except ValueError:
        return ""


def _first_error_line(log: Path) -> str:
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    errors = [line[len("error: "):] for line in lines if line.startswith("error: ")]
    return errors[0] if errors else ""


def _hopeless(log: Path, code: int, previous: Optional[tuple], last_step_seen: Optional[float]) -> tuple[str, tuple]:
    """(why a restart cannot help or "", what to remember of this failure). Hopeless: a configuration or
    pre-flight error (exit 2), or a crash (exit > 0) ending on the same log line as the node's previous
    one with no step committed in between (a signal, e.g. SIGKILL of a lost machine, never counts)."""
    lines = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
    last = lines[-1].strip() if lines else ""
    remembered = (last, last_step_seen)
    if code == EXIT_CONFIG:
        error = _first_error_line(log)
        return (f"{error} (not restarted: it would fail the same way)" if error else ""), remembered
    if code > 0 and last and previous == remembered:
        return (f"it failed twice the same way before any new step, so it is not restarted again: {last} "
                f"(log {log})"), remembered
    return "", remembered


def _droppable(topology, name: str) -> bool:
    """A client node of a topology whose lost clients are dropped (clients.on_loss: drop)."""
    clients = topology.spec.clients
    return clients is not None and clients.on_loss == "drop" and any(
        topology.is_replicated(n) and name in topology.placement[n] for n in topology.placement)


def _dropped_at_end(summary: dict) -> set[str]:
    """Client nodes whose last drop/rejoin event in the summary is a drop."""
    last: dict[str, str] = {}
    for event in summary.get("client_events", []):
        for node in event.get("nodes", []):
            last[node] = event.get("event")
    return {node for node, event in last.items() if event == "drop"}


RUNS_DIR = Path("runs")


def default_run_dir(topology_name: str = "run") -> Path:
    """runs/<topology>-<UTC timestamp> under the working directory (printed by `meshsl run`): logs,
    resolved topology, checkpoints and summary stay where the user can find them."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    path = RUNS_DIR / f"{topology_name}-{stamp}"
    suffix = 1
    while path.exists():
        suffix += 1
        path = RUNS_DIR / f"{topology_name}-{stamp}-{suffix}"
    return path
