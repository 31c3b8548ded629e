"""Chaos tests with real processes: killing any node mid-training loses nothing and changes nothing."""
import os
import signal
import threading
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from meshsl.config.loader import load_spec
from meshsl.errors import PeerFailed
from meshsl.runtime.launcher import LocalRun
from meshsl.topology.model import topology_from_spec

ROOT = Path(__file__).resolve().parent.parent


def chaos_topology(tmp_path: Path, name: str = "vanilla.yaml", every: int = 1, standby: bool = False,
                   steps: int = 24, **retry) -> Path:
    document = yaml.safe_load((ROOT / "topologies" / name).read_text())
    document["training"]["steps"] = steps
    document["training"]["eval_every"] = 0
    document["checkpoint"] = {"every": every}
    document["retry"] = {"heartbeat_interval_s": 0.2, "heartbeat_timeout_s": 2.0, "timeout_s": 20,
                         "startup_timeout_s": 30, "max_restarts": 3, **retry}
    for node in document["nodes"]:
        node.pop("metrics_port", None)
        if standby:
            node["standby"] = [node["endpoint"].rsplit(":", 1)[0] + ":1"]  # rewritten to a free port
    path = tmp_path / name
    path.write_text(yaml.safe_dump(document))
    return path


def train(path: Path, run_dir: Path, fault=None) -> tuple[dict, LocalRun]:
    """Run with real node processes; `fault(launcher, row)` may kill or pause nodes from the progress stream."""
    run = LocalRun(path, run_dir, free_ports=True, weights_out=run_dir / "weights", evaluate=False)
    resolved = run.prepare()
    topology = topology_from_spec(load_spec(resolved), str(resolved), path.parent)
    if fault:
        run.on_progress = lambda row: fault(run, row)
    run.start(topology, resolved)
    try:
        return run.follow(topology, timeout=240), run
    finally:
        run.stop()


def weights(run_dir: Path) -> dict:
    return {p.stem: load_file(str(p)) for p in sorted((run_dir / "weights").glob("*.safetensors"))}


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for segment in a:
        for key in a[segment]:
            assert torch.equal(a[segment][key], b[segment][key]), f"{segment}.{key} differs"


def kill_at(node: str, step: int, sig=signal.SIGKILL):
    fired = threading.Event()

    def fault(run: LocalRun, row: dict) -> None:
        if row.get("step") == step and not fired.is_set():
            fired.set()
            os.kill(run.processes[node].pid, sig)
    return fault


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    path = chaos_topology(tmp)
    summary, _ = train(path, tmp / "run")
    return path, weights(tmp / "run"), summary


@pytest.mark.parametrize("victim,step", [("client", 5), ("server", 11)])
def test_sigkill_any_node_gives_identical_weights(tmp_path, reference_run, victim, step):
    """server is the label holder and hosts the coordinator: its loss is recovered too."""
    path, expected, reference_summary = reference_run
    summary, run = train(path, tmp_path / "run", kill_at(victim, step))
    assert run.restarts.get(victim) == 1
    assert_same_weights(weights(tmp_path / "run"), expected)
    if victim != "server":
        assert summary["failovers"] == 1
        assert summary["recovery_seconds"][0] > 0


def test_paused_node_is_replaced(tmp_path, reference_run):
    """A peer that pauses (SIGSTOP) past the heartbeat timeout is declared failed, replaced, and the
    run still ends with the same weights."""
    path, expected, _ = reference_run
    summary, run = train(path, tmp_path / "run", kill_at("client", 7, signal.SIGSTOP))
    assert run.restarts.get("client") == 1
    assert summary["failovers"] == 1
    assert_same_weights(weights(tmp_path / "run"), expected)


def test_without_checkpoints_a_lost_node_stops_the_run_with_its_name(tmp_path):
    path = chaos_topology(tmp_path, every=0)
    with pytest.raises(PeerFailed, match="client"):
        train(path, tmp_path / "run", kill_at("client", 3))
