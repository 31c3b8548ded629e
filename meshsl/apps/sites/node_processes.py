"""The node processes a site runs for one job: started with --resume (a restarted site continues from its
checkpoints), restarted when they fail for a reason a restart can fix, stopped as a process group."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

from meshsl.data.catalogue import CATALOGUE_ENV

EXIT_CONFIG, EXIT_ABORTED = 2, 3  # meshsl.launch.entry: a restart would fail the same way
MAX_RESTARTS = 3
STOP_GRACE_S = 4.0


@dataclass
class NodeProcess:
    name: str
    process: asyncio.subprocess.Process | None = None
    restarts: int = 0
    exit_code: int | None = None
    stopped: bool = False


@dataclass
class JobNodes:
    """The nodes of one job on this site; `folder` is the job's folder under the site's state directory."""
    folder: Path
    catalogue: Path | None
    endpoints: dict[str, str | None] = field(default_factory=dict)  # node -> declared endpoint (None: dials out)
    nodes: dict[str, NodeProcess] = field(default_factory=dict)

    def command(self, name: str, endpoint: str | None) -> list[str]:
        # An inbound node binds every interface at its declared port: on a site (a container, a host behind
        # NAT) the declared name is how peers reach it, rarely an address it can bind.
        bind = ["--bind", f"tcp://0.0.0.0:{endpoint.rsplit(':', 1)[1]}"] if endpoint else []
        return [sys.executable, "-m", "meshsl", "node", name, "--topology", str(self.folder / "topology.yaml"),
                "--resume", "--checkpoint-dir", str(self.folder / "checkpoints" / name),
                "--weights-out", str(self.folder / "weights" / name),
                "--summary-json", str(self.folder / f"summary-{name}.json"), *bind]

    def finished(self, name: str) -> bool:
        """The node already ended well (its weights and summary are written): a site that restarts after
        that must report the job done, not start the node again for a run its peers have ended."""
        weights = self.folder / "weights" / name
        return (self.folder / f"summary-{name}.json").is_file() and weights.is_dir() and any(weights.iterdir())

    async def start(self, name: str) -> NodeProcess:
        node = self.nodes.setdefault(name, NodeProcess(name))
        logs = self.folder / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **({CATALOGUE_ENV: str(self.catalogue)} if self.catalogue else {})}
        with await asyncio.to_thread(open, logs / f"{name}.log", "ab") as out:
            node.process = await asyncio.create_subprocess_exec(
                *self.command(name, self.endpoints.get(name)), stdout=out, stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL,
                env=env, cwd=self.folder, start_new_session=True)  # its own group: stopped with its children
        node.exit_code = None
        return node

    async def wait(self, name: str) -> int:
        """Until the node ends for good: a failure a restart may fix starts it again (MAX_RESTARTS times)."""
        node = self.nodes[name]
        while True:
            assert node.process is not None
            code = await node.process.wait()
            node.exit_code = code
            if code == 0 or node.stopped or code in (EXIT_CONFIG, EXIT_ABORTED) or node.restarts >= MAX_RESTARTS:
                return code
            node.restarts += 1
            await self.start(name)

    async def stop(self) -> None:
        for node in self.nodes.values():
            node.stopped = True
            _signal(node, signal.SIGTERM)
        waiting = [n.process.wait() for n in self.nodes.values() if n.process and n.process.returncode is None]
        if waiting:
            _, pending = await asyncio.wait([asyncio.ensure_future(w) for w in waiting], timeout=STOP_GRACE_S)
            for node in self.nodes.values():
                _signal(node, signal.SIGKILL)
            if pending:
                await asyncio.wait(pending)

    def log_tail(self, lines: int = 20) -> list[str]:
        tail: list[str] = []
        for name in sorted(self.nodes):
            path = self.folder / "logs" / f"{name}.log"
            if path.is_file():
                with open(path, "rb") as f:
                    f.seek(max(0, path.stat().st_size - 16384))
                    text = f.read().decode("utf-8", "replace").splitlines()[-lines:]
                tail += [f"{name}: {line}"[:3000] for line in text]
        return tail[-200:]

    def summary(self) -> dict:
        """What the nodes' summaries say about the model: metrics, steps, losses (never weights)."""
        released: dict = {}
        for name in sorted(self.nodes):
            path = self.folder / f"summary-{name}.json"
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            released[name] = {k: v for k, v in data.items() if k in RELEASED_KEYS}
        return released


RELEASED_KEYS = ("topology_hash", "steps", "epochs", "samples", "samples_per_s", "wall_seconds", "tasks", "failovers",
                 "privacy_budget")


def _signal(node: NodeProcess, sig: int) -> None:
    if node.process is not None and node.process.returncode is None:
        try:
            os.killpg(node.process.pid, sig)
        except ProcessLookupError:
            pass
