"""Issue 15's smaller items: validation bounds, endpoint spellings, checkpoints of another topology or
truncated by a full disk (real files, real node processes for the resume)."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
import yaml

from meshsl.compute import checkpoint
from meshsl.config.loader import load_spec
from meshsl.errors import CheckpointError, ConfigError, PeerFailed
from meshsl.launch.launcher import LocalRun
from meshsl.topology.model import load_topology, topology_from_spec
from support.processes import assert_same_weights, chaos_topology, saved_weights as weights, train

ROOT = Path(__file__).resolve().parents[2]


def _variant(tmp_path: Path, change) -> Path:
    document = yaml.safe_load((ROOT / "topologies" / "vanilla.yaml").read_text())
    change(document)
    path = ROOT / "topologies" / f"_test_{tmp_path.name}.yaml"  # data paths are relative to topologies/
    path.write_text(yaml.safe_dump(document))
    return path


def _load_error(tmp_path: Path, change) -> str:
    path = _variant(tmp_path, change)
    try:
        with pytest.raises(ConfigError) as raised:
            load_topology(path)
    finally:
        path.unlink()
    return str(raised.value)


def test_a_batch_larger_than_the_data_is_rejected(tmp_path):
    message = _load_error(tmp_path, lambda d: d["training"].update(batch_size=10**9))
    assert "training.batch_size" in message and "1000000000" in message and "training rows" in message


def test_localhost_and_127_0_0_1_on_one_port_are_the_same_endpoint(tmp_path):
    def same_port(document):
        first = document["nodes"][0]["endpoint"]
        document["nodes"][1]["endpoint"] = first.replace("127.0.0.1", "localhost")
    message = _load_error(tmp_path, same_port)
    assert "used twice" in message and "localhost" in message


def _vanilla(tmp_path: Path, **training):
    path = _variant(tmp_path, lambda d: d["training"].update(training))
    try:
        return load_topology(path)
    finally:
        path.unlink()


def test_a_checkpoint_of_another_topology_is_refused_by_name(tmp_path):
    small, wide = _vanilla(tmp_path), _vanilla(tmp_path, seed=7)
    assert checkpoint.model_hash(small) != checkpoint.model_hash(wide)
    checkpoint.save(tmp_path, "client", 3, {"w": torch.ones(2)}, checkpoint.model_hash(small))
    with pytest.raises(CheckpointError, match="another topology"):
        checkpoint.load(tmp_path, "client", 3, checkpoint.model_hash(wide))
    with pytest.raises(CheckpointError, match="another topology"):
        checkpoint.load_newest(tmp_path, "client", checkpoint.model_hash(wide))
    assert checkpoint.load(tmp_path, "client", 3, checkpoint.model_hash(small))["w"].sum() == 2


def test_endpoints_and_timeouts_do_not_change_the_model_hash(tmp_path):
    base = _vanilla(tmp_path)
    path = _variant(tmp_path, lambda d: (d["nodes"][0].update(endpoint="tcp://127.0.0.1:6999"),
                                         d.update(retry={"timeout_s": 99})))
    try:
        moved = load_topology(path)
    finally:
        path.unlink()
    assert checkpoint.model_hash(base) == checkpoint.model_hash(moved)


def test_a_truncated_newest_checkpoint_is_set_aside(tmp_path):
    for step in (2, 4):
        checkpoint.save(tmp_path, "client", step, {"w": torch.full((1000,), float(step))})
    newest = checkpoint.node_dir(tmp_path, "client") / "step-4.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # a disk that filled up mid-write of a non-atomic copy
    step, state = checkpoint.load_newest(tmp_path, "client")
    assert step == 2 and float(state["w"][0]) == 2.0
    assert checkpoint.available_steps(tmp_path, "client") == [2]  # step 4 is no longer offered
    assert (newest.parent / "step-4.pt.corrupt").exists()


@pytest.mark.slow
def test_resume_falls_back_to_an_older_step_every_node_has(tmp_path):
    """The job dies; the client's newest checkpoint is truncated. `--resume` restores every node to an
    older step they all have and ends with the weights of an uninterrupted run."""
    path = chaos_topology(tmp_path, every=2, max_restarts=0)
    train(path, tmp_path / "clean")
    run_dir = tmp_path / "run"
    run = LocalRun(path, run_dir, free_ports=True, weights_out=run_dir / "weights", evaluate=False)
    resolved = run.prepare()
    topology = topology_from_spec(load_spec(resolved), str(resolved), path.parent)

    def kill_everything(launched: LocalRun, row: dict) -> None:
        if row.get("step") == 9:
            for proc in launched.processes.values():
                os.kill(proc.pid, signal.SIGKILL)

    run.on_progress = lambda row: kill_everything(run, row)
    run.start(topology, resolved)
    with pytest.raises(PeerFailed):
        try:
            run.follow(topology, timeout=120)
        finally:
            run.stop()
    steps = checkpoint.available_steps(run.checkpoint_dir, "client")
    newest = checkpoint.node_dir(run.checkpoint_dir, "client") / f"step-{steps[-1]}.pt"
    newest.write_bytes(newest.read_bytes()[:64])
    resumed = LocalRun(path, run_dir, free_ports=True, weights_out=run_dir / "weights", evaluate=False, resume=True)
    resolved = resumed.prepare()
    resumed.start(topology_from_spec(load_spec(resolved), str(resolved), path.parent), resolved)
    try:
        resumed.follow(topology, timeout=120)
    finally:
        resumed.stop()
    assert_same_weights(weights(run_dir), weights(tmp_path / "clean"))


def test_meshsl_run_checkpoints_by_default_into_a_documented_run_dir(tmp_path, monkeypatch):
    """Failover on out of the box: the resolved topology checkpoints unless the YAML or the user says
    otherwise; runs go to runs/<topology>-<time>."""
    from meshsl.launch.launcher import DEFAULT_CHECKPOINT_EVERY, default_run_dir

    def resolved_every(every_in_yaml, launcher_every):
        document = yaml.safe_load((ROOT / "topologies" / "multi_hop.yaml").read_text())
        if every_in_yaml is not None:
            document["checkpoint"] = {"every": every_in_yaml}
        path = tmp_path / f"t-{every_in_yaml}-{launcher_every}.yaml"
        path.write_text(yaml.safe_dump(document))
        run = LocalRun(path, tmp_path / f"run-{every_in_yaml}-{launcher_every}", checkpoint_every=launcher_every)
        return load_spec(run.prepare()).checkpoint.every

    assert resolved_every(None, DEFAULT_CHECKPOINT_EVERY) == DEFAULT_CHECKPOINT_EVERY
    assert resolved_every(3, DEFAULT_CHECKPOINT_EVERY) == 3  # the topology's own choice wins
    assert resolved_every(0, DEFAULT_CHECKPOINT_EVERY) == 0  # explicitly off stays off
    assert resolved_every(5, 0) == 0  # --no-checkpoint
    monkeypatch.chdir(tmp_path)
    first, second = default_run_dir("multi-hop"), None
    first.mkdir(parents=True)
    second = default_run_dir("multi-hop")
    assert first.parent == second.parent == Path("runs") and first != second
    assert first.name.startswith("multi-hop-")
