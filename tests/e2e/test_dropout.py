"""Clients that drop out (clients.on_loss: drop), with real node processes: a SIGKILLed client is dropped,
the run goes on over the survivors and ends with exit 0 and the weights of an in-process reference that
applies the same drops and rejoins at the same steps (RunOptions.client_schedule); a dropped client
rejoins; below min_clients every party fails loudly; sequential hand-off skips the dropped client."""
from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from support import processes
from meshsl.config.loader import parse_spec
from meshsl.errors import MeshslError
from meshsl.schedule.steps import training_steps
from meshsl.coordinator.runtime import RunOptions
from meshsl.launch.launcher import LocalRun
from meshsl.launch.simulate import simulate
from meshsl.topology.model import topology_from_spec
from support.processes import TOPOLOGIES, assert_same_weights, saved_weights


def dropout_document(name: str = "splitfed.yaml", clients: int = 3, steps: int = 12, every: int = 2,
                     max_restarts: int = 0, **clients_spec) -> dict:
    document = yaml.safe_load((TOPOLOGIES / name).read_text())
    document["clients"].update(count=clients, on_loss="drop", **clients_spec)
    document["training"].pop("epochs", None)
    document["training"].update(steps=steps, eval_every=0)
    document["checkpoint"] = {"every": every}
    document["retry"] = {"heartbeat_interval_s": 0.25, "heartbeat_timeout_s": 5.0, "timeout_s": 30,
                         "startup_timeout_s": 45, "max_restarts": max_restarts}
    for node in document["nodes"]:
        node.pop("metrics_port", None)
    return document


def train(document: dict, run_dir: Path, fault, runs: list | None = None) -> tuple[dict, LocalRun]:
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(document))
    return processes.train(path, run_dir, fault, runs=runs)


def kill_at(node: str, step: int):
    return processes.kill_at(node, step, skip_events=True)  # at the step's own row, not at an event's


def reference_weights(document: dict, schedule: list) -> dict[str, dict[str, torch.Tensor]]:
    """In process, no faults: the same drops and rejoins at the same steps. {weights file stem: state}."""
    document = dict(document, checkpoint={"every": 0})
    topology = topology_from_spec(parse_spec(document), "<reference>", TOPOLOGIES)
    _, runtimes = asyncio.run(simulate(topology, RunOptions(evaluate=False, client_schedule=schedule)))
    out = {}
    for node, runtime in runtimes.items():
        if runtime.dropped:
            continue  # dropped at the end: writes no weights
        for segment, module in runtime.worker.modules.items():
            stem = f"{segment}@{node}" if topology.is_replicated(segment) else segment
            out[stem] = {k: v.detach().clone() for k, v in module.state_dict().items()}
    return out


def test_splitfed_goes_on_over_the_survivors_of_a_sigkill(tmp_path):
    document = dropout_document(max_restarts=0)  # the launcher leaves the killed client down
    summary, run = train(document, tmp_path / "run", kill_at("clinic1", 3))
    events = summary["client_events"]
    assert [(e["event"], e["nodes"]) for e in events] == [("drop", ["clinic1"])], events
    drop = events[0]
    assert 0 < drop["step"] <= 4 and drop["step"] % document["checkpoint"]["every"] == 0  # a checkpoint step
    assert drop["cause"] in ("exited", "heartbeat", "timeout") and drop["detected"] > 0  # exited: the launcher told
    assert summary["steps"] == 12 and summary["failovers"] == 0
    lanes = {row["step"]: row["lanes"] for row in summary["history"]}
    assert all(lanes[s] == [0, 2] for s in range(drop["step"], 12)) and lanes[0] == [0, 1, 2]
    assert all(run.processes[n].returncode == 0 for n in ("server", "clinic0", "clinic2"))
    got = saved_weights(tmp_path / "run")
    assert "bottom@clinic1" not in got
    assert_same_weights(got, reference_weights(document, events))
    # FedAvg over the survivors at the last step (12 is a multiple of average_every): the clients agree.
    assert all(torch.equal(got["bottom@clinic0"][k], got["bottom@clinic2"][k]) for k in got["bottom@clinic0"])


@pytest.mark.slow  # a fifth process start; the rules of a rejoin run by default in test_dropout_replay.py
def test_a_dropped_client_rejoins_from_the_global_weights(tmp_path):
    """The launcher restarts the killed client; the coordinator is paused until the new process has
    loaded (so the rejoin falls inside the run on a loaded machine); it rejoins at the next FedAvg."""
    document = dropout_document(max_restarts=1, steps=16)
    paused = threading.Event()
    kill = kill_at("clinic1", 3)

    def fault(run: LocalRun, row: dict) -> None:
        kill(run, row)
        if row.get("event") == "client_drop" and not paused.is_set():
            paused.set()
            coordinator = run.processes["server"]
            os.kill(coordinator.pid, signal.SIGSTOP)
            threading.Thread(target=resume_when_back, args=(run, coordinator), daemon=True).start()

    def resume_when_back(run: LocalRun, coordinator) -> None:
        log = run.run_dir / "clinic1.log"
        deadline = time.monotonic() + 60
        try:
            while time.monotonic() < deadline:  # the replacement has loaded its checkpoint: it says hello next
                if run.restarts.get("clinic1") and log.exists() and "resumed from checkpoint" in log.read_text():
                    break
                time.sleep(0.1)
        finally:
            os.kill(coordinator.pid, signal.SIGCONT)

    summary, run = train(document, tmp_path / "run", fault)
    events = summary["client_events"]
    assert [(e["event"], e["nodes"]) for e in events] == [("drop", ["clinic1"]), ("rejoin", ["clinic1"])], events
    drop, rejoin = events
    assert rejoin["step"] > drop["step"] and rejoin["step"] % document["clients"]["average_every"] == 0
    lanes = {row["step"]: row["lanes"] for row in summary["history"]}
    assert lanes[drop["step"]] == [0, 2] and all(lanes[s] == [0, 1, 2] for s in range(rejoin["step"], 16))
    assert all(p.returncode == 0 for p in run.processes.values())
    got = saved_weights(tmp_path / "run")
    assert_same_weights(got, reference_weights(document, events))
    assert all(torch.equal(got["bottom@clinic1"][k], got["bottom@clinic0"][k]) for k in got["bottom@clinic0"])


def test_below_min_clients_every_party_fails_loudly(tmp_path):
    document = dropout_document(max_restarts=0, min_clients=3)
    runs: list = []
    with pytest.raises(MeshslError, match="min_clients") as failure:
        train(document, tmp_path / "run", kill_at("clinic1", 3), runs)
    assert "clinic1" in str(failure.value)
    assert all(p.returncode != 0 for p in runs[0].processes.values()), \
        {n: p.returncode for n, p in runs[0].processes.items()}
    assert runs[0].processes["server"].returncode == 3  # the coordinator's own exit, not a SIGTERM 5 s in
    run_dir = tmp_path / "run"
    assert not list(run_dir.glob("weights/*.safetensors"))  # no party wrote final weights
    for node in ("clinic0", "clinic2"):
        assert "min_clients" in (run_dir / f"{node}.log").read_text()  # told why, not only that it failed


def test_sequential_hand_off_skips_the_dropped_client(tmp_path):
    document = dropout_document("sequential.yaml", every=1, max_restarts=0)
    document["training"].pop("steps")
    document["training"].update(epochs=1, batch_size=96)
    topology = topology_from_spec(parse_spec(dict(document, checkpoint={"every": 0})), "<t>", TOPOLOGIES)
    steps = training_steps(topology)
    turn = [s.step for s in steps if s.lanes == (1,)]
    assert len(turn) >= 3
    summary, run = train(document, tmp_path / "run", kill_at("clinic1", turn[0]))
    events = summary["client_events"]
    assert [(e["event"], e["nodes"]) for e in events] == [("drop", ["clinic1"])], events
    trained = {row["step"]: row["lanes"] for row in summary["history"]}  # replayed steps: the last row counts
    assert all(trained.get(s) is None for s in turn if s >= events[0]["step"])  # the rest of its turn: skipped
    assert trained[steps[-1].step] == [2]  # the hand-off went on to the next client
    got = saved_weights(tmp_path / "run")
    assert "bottom@clinic1" not in got
    assert_same_weights(got, reference_weights(document, events))
