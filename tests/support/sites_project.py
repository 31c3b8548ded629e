"""Three sites (lab hosts the broker) as real `meshsl site start` processes on loopback, each with its own
state folder, data and policy: the project examples/sites/setup_project.py makes.

Imported as `support.sites_project` (tests/ is on the path: [tool.pytest] pythonpath)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import yaml

from meshsl.apps.sites.client import JobClient
from support.prometheus_server import free_port

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples" / "sites"))
import setup_project  # noqa: E402  (the example's own setup, as its users run it)

SITES = tuple(setup_project.SITES)


class Project:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.broker = f"tcp://127.0.0.1:{free_port()}"
        self.kits = setup_project.make_project(folder, self.broker, f"tcp://127.0.0.1:{free_port()}")
        self.agents: dict[str, subprocess.Popen] = {}

    def state(self, site: str) -> Path:
        return self.folder / "sites" / site / "state"

    def set_policy(self, site: str, **changes) -> None:
        path = self.state(site) / "policy.yaml"
        path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), **changes}))

    def command(self, site: str) -> list[str]:
        return [sys.executable, "-m", "meshsl", "--log-level", "INFO", "site", "start", "--kit", str(self.kits[site]),
                "--state", str(self.state(site)), "--catalogue",
                str(self.folder / "sites" / site / "data" / "catalogue.yaml"),
                *(["--host-broker"] if site == "lab" else [])]

    def start(self, site: str) -> subprocess.Popen:
        log = open(self.folder / f"{site}.agent.log", "ab")
        self.agents[site] = subprocess.Popen(self.command(site), stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, start_new_session=True)
        return self.agents[site]

    def start_all(self) -> None:
        for site in SITES:
            self.start(site)

    def kill(self, site: str) -> None:
        """What killing the site's container does: its agent and every node it runs die at once."""
        agent = self.agents[site]
        nodes = _children_of(agent.pid)
        os.killpg(agent.pid, signal.SIGKILL)
        for pid in nodes:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        agent.wait()

    def stop_all(self) -> None:
        for agent in self.agents.values():
            if agent.poll() is None:
                agent.terminate()
        for agent in self.agents.values():
            try:
                agent.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(agent.pid, signal.SIGKILL)
                agent.wait()

    def client(self) -> JobClient:
        return JobClient(self.kits["lab"], self.folder / "alice", "alice")

    def job(self, allowed: bool = True, **training) -> str:
        text = (self.folder / "job.yaml").read_text()
        text = setup_project.without_forbidden_column(text) if allowed else text
        if training:
            document = yaml.safe_load(text)
            document["training"].update(training)
            text = yaml.safe_dump(document, sort_keys=False)
        return text

    def weights(self, site: str, job: str) -> Path:
        return self.state(site) / "jobs" / job / "weights"

    def node_pids(self, site: str) -> list[int]:
        return _children_of(self.agents[site].pid)


def _children_of(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]
