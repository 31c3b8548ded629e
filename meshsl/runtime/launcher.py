"""`meshsl run`: start every node of a topology as its own local process and follow the coordinator."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import yaml

from meshsl.errors import MeshslError, PeerFailed
from meshsl.runtime.entry import PROGRESS_PREFIX


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_free_ports(document: dict) -> dict:
    """Rewrite tcp endpoints and metrics ports to free loopback ports (parallel runs, tests)."""
    replicas = (document.get("clients") or {}).get("count", 1)
    replicated = set((document.get("clients") or {}).get("replicate", []))
    for node in document["nodes"]:
        span = replicas if node["name"] in replicated else 1
        if str(node["endpoint"]).startswith("tcp://"):
            base = _free_block(span)
            node["endpoint"] = f"tcp://127.0.0.1:{base}"
            node["standby"] = [f"tcp://127.0.0.1:{_free_block(span)}" for _ in node.get("standby", [])]
        if node.get("metrics_port"):
            node["metrics_port"] = _free_block(span)
    return document


def _free_block(span: int) -> int:
    """A base port whose next `span` ports are free (replicated nodes use base+lane)."""
    for _ in range(200):
        base = free_port()
        if base + span >= 65535:
            continue
        ok = True
        for port in range(base, base + span):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise MeshslError(f"no block of {span} free ports found")


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
    processes: dict = field(default_factory=dict)

    def prepare(self) -> Path:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        document = yaml.safe_load(self.topology_path.read_text())
        if self.free_ports:
            document = with_free_ports(document)
        resolved = self.run_dir / "topology.yaml"
        resolved.write_text(yaml.safe_dump(document, sort_keys=False))
        return resolved

    def command(self, resolved: Path, node: str, coordinator: bool) -> list[str]:
        cmd = [sys.executable, "-m", "meshsl", "--log-level", self.log_level, "node", node,
               "--topology", str(resolved), "--base-dir", str(self.topology_path.parent.resolve())]
        if self.weights_out is not None:
            cmd += ["--weights-out", str(self.weights_out.resolve())]
        if coordinator:
            cmd += ["--summary-json", str(self.run_dir / "summary.json"), "--progress-stream"]
            if self.steps:
                cmd += ["--steps", str(self.steps)]
            if self.epochs is not None:
                cmd += ["--epochs", str(self.epochs)]
            if not self.evaluate:
                cmd += ["--no-eval"]
        return cmd

    def start(self, topology, resolved: Path) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        for name in topology.nodes:
            coordinator = name == topology.coordinator
            log_file = open(self.run_dir / f"{name}.log", "wb")
            self.processes[name] = subprocess.Popen(
                self.command(resolved, name, coordinator), env=env,
                stdout=subprocess.PIPE if coordinator else log_file, stderr=log_file)

    def follow(self, topology, timeout: Optional[float] = None) -> dict:
        """Read the coordinator's progress until it exits; then reap every node."""
        coordinator = self.processes[topology.coordinator]
        reader = threading.Thread(target=self._read_progress, args=(coordinator,), daemon=True)
        reader.start()
        deadline = time.monotonic() + timeout if timeout else None
        failed = None
        while True:
            code = coordinator.poll()
            if code is not None:
                break
            for name, proc in self.processes.items():
                if proc.poll() not in (None, 0) and failed is None:
                    failed = name
            if failed:
                break
            if deadline and time.monotonic() > deadline:
                failed = topology.coordinator
                break
            time.sleep(0.1)
        reader.join(timeout=5)
        if failed:
            self.stop()
            raise PeerFailed(failed, self.log_tail(failed))
        for name, proc in self.processes.items():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        if coordinator.returncode != 0:
            raise PeerFailed(topology.coordinator, self.log_tail(topology.coordinator))
        bad = [n for n, p in self.processes.items() if p.returncode != 0]
        if bad:
            raise PeerFailed(bad[0], self.log_tail(bad[0]))
        return json.loads((self.run_dir / "summary.json").read_text())

    def _read_progress(self, proc: subprocess.Popen) -> None:
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace")
            if line.startswith(PROGRESS_PREFIX) and self.on_progress:
                try:
                    self.on_progress(json.loads(line[len(PROGRESS_PREFIX):]))
                except ValueError:
                    pass

    def log_tail(self, node: str, lines: int = 15) -> str:
        path = self.run_dir / f"{node}.log"
        text = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
        tail = "\n".join(text[-lines:])
        return f"log {path}:\n{tail}" if tail else f"exit code {self.processes[node].returncode}, log {path} is empty"

    def stop(self) -> None:
        for proc in self.processes.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.processes.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def default_run_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="meshsl-run-"))
