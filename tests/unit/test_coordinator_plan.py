"""The coordinator's pure planning and reporting (machines/coordinator_plan.py, coordinator_summary.py):
where barriers fall, which step trains next with dropped clients, history rows, evaluation merging and
the run summary -- without processes."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from meshsl.protocol import control

from meshsl.schedule.steps import StepInfo
from meshsl.machines.coordinator_plan import StepPlanner
from meshsl.machines.coordinator_summary import RunRecord, merge_evaluation
from meshsl.machines.policies import ClientRoster, planned_changes

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def topology(clients=None, eval_every: int = 0):
    return SimpleNamespace(spec=SimpleNamespace(training=SimpleNamespace(eval_every=eval_every), clients=clients))


def steps_of(lanes: list[tuple[int, ...]], epoch_length: int = 100) -> list[StepInfo]:
    return [StepInfo(i, i // epoch_length, i % epoch_length, lane) for i, lane in enumerate(lanes)]


def sequential_roster(lanes: int = 3) -> ClientRoster:
    return ClientRoster({lane: [f"clinic{lane}"] for lane in range(lanes)}, on_loss="drop", min_clients=1)


SEQUENTIAL = SimpleNamespace(mode="sequential", average_every=1)
SPLITFED = SimpleNamespace(mode="splitfed", average_every=2)
TURNS = [(0,), (0,), (1,), (1,), (2,), (2,)]


def test_one_client_evaluates_at_each_epoch_end_and_the_last_step_and_never_syncs():
    steps = steps_of([(0,)] * 10, epoch_length=4)
    planner = StepPlanner(topology(), ClientRoster({0: ["client"]}), steps, epoch_length=4)
    assert [i for i, info in enumerate(steps) if planner.eval_due(info)] == [3, 7, 9]
    assert not any(planner.sync_due(info) for info in steps)
    assert [planner.barrier_after(i) for i in (0, 4, 8)] == [3, 7, 9]
    without_eval = StepPlanner(topology(), ClientRoster({0: ["client"]}), steps, evaluate=False, epoch_length=4)
    assert without_eval.barrier_after(0) == 9


def test_eval_every_overrides_the_epoch():
    steps = steps_of([(0,)] * 7)
    planner = StepPlanner(topology(eval_every=3), ClientRoster({0: ["client"]}), steps, epoch_length=100)
    assert [i for i, info in enumerate(steps) if planner.eval_due(info)] == [2, 5, 6]


def test_splitfed_averages_every_average_every_steps():
    steps = steps_of([(0, 1, 2)] * 6)
    planner = StepPlanner(topology(SPLITFED), sequential_roster(), steps, evaluate=False)
    assert [i for i, info in enumerate(steps) if planner.sync_due(info)] == [1, 3, 5]
    assert planner.barrier_after(2) == 3
    assert not any(planner.turn_ends(info) for info in steps)


def test_sequential_hands_over_at_each_turn_end():
    steps = steps_of(TURNS)
    planner = StepPlanner(topology(SEQUENTIAL), sequential_roster(), steps, evaluate=False)
    assert [i for i, info in enumerate(steps) if planner.sync_due(info)] == [1, 3]
    assert [i for i, info in enumerate(steps) if planner.turn_ends(info)] == [1, 3]
    assert planner.barrier_after(0) == 1 and planner.barrier_after(4) == 5


def test_a_dropped_sequential_client_loses_its_turn():
    roster = sequential_roster()
    steps = steps_of(TURNS)
    planner = StepPlanner(topology(SEQUENTIAL), roster, steps, evaluate=False)
    roster.drop(["clinic1"], 2, "heartbeat")
    assert planner.next_training_step(2) == (4, [])
    assert planner.sync_due(steps[1])  # the hand-off goes past the dropped client, to clinic2
    assert planner.barrier_after(0) == 1
    assert planner.as_trained(StepInfo(0, 0, 0, (0, 1))) == StepInfo(0, 0, 0, (0,))
    roster.drop(["clinic2"], 4, "heartbeat")
    assert planner.next_training_step(2) == (None, [])
    assert not planner.sync_due(steps[1])


def test_replayed_drops_take_effect_at_their_step_and_end_the_run_before_it():
    roster = sequential_roster()
    planned = planned_changes([{"event": "drop", "step": 2, "nodes": ["clinic1"]}])
    steps = steps_of([(0, 1, 2)] * 4)
    planner = StepPlanner(topology(SPLITFED), roster, steps, evaluate=False, planned=planned)
    assert planner.barrier_after(0) == 1  # a change of the clients taking part after step 1
    assert planner.next_training_step(1) == (1, [])
    index, changes = planner.next_training_step(2)
    assert index == 2 and [(c.event, c.nodes, c.step, c.cause) for c in changes] == \
        [("drop", ("clinic1",), 2, "replayed")]
    assert roster.dropped == {1: 2} and planned["drop"] == {}


def done(**metas):
    """{node: the coordinator's event of its DONE}, parsed from the meta a node sends."""
    return {node: SimpleNamespace(message=control.Done.from_meta(meta)) for node, meta in metas.items()}


def test_a_step_row_reads_losses_and_the_worst_leakage_per_edge():
    record = RunRecord({"clinic->server"})
    row = record.commit_step(StepInfo(4, 1, 0, (0, 1)), done(
        server={"tasks": {"digit": {"loss_sum": 6.0, "correct": 3, "count": 4}},
                "label_leakage": {"clinic->server": 0.7, "other->edge": 1.0}},
        clinic0={"leakage": {"clinic->server": 0.2}}, clinic1={"leakage": {"clinic->server": 0.5}}),
        seconds=2.0, batch_size=8)
    assert row == {"step": 4, "epoch": 1, "lanes": [0, 1], "tasks": {"digit": {"loss": 1.5, "accuracy": 0.75}},
                   "leakage": {"clinic->server": 0.5}, "label_leakage": {"clinic->server": 0.7},
                   "samples_per_s": 8.0, "samples_per_s_mean": 8.0}
    assert record.history == [row] and record.samples == 16
    assert record.leakage == {"clinic->server": 0.5} and record.label_leakage == {"clinic->server": 0.7}


def test_a_rows_throughput_is_that_of_the_last_steps_not_a_running_average_since_the_start():
    """A slow first step (start-up, warm-up) does not drag every later row's samples/s down."""
    record = RunRecord(set())
    seconds = [10.0] + [1.0] * 12  # the first step pays the start-up
    rows = [record.commit_step(StepInfo(i, 0, 0, (0,)), done(server={"tasks": {}}), seconds=s, batch_size=10)
            for i, s in enumerate(seconds)]
    assert rows[-1]["samples_per_s"] == pytest.approx(10.0)  # the last 10 steps: 100 samples in 10 s
    assert rows[-1]["samples_per_s_mean"] == pytest.approx(130 / 22)


def test_a_regression_task_has_no_accuracy_in_its_rows():
    record = RunRecord(set(), regression_tasks=frozenset({"price"}))
    row = record.commit_step(StepInfo(0, 0, 0, (0,)), done(server={"tasks": {
        "price": {"loss_sum": 2.0, "correct": 0, "count": 4}, "digit": {"loss_sum": 1.0, "correct": 2, "count": 4}}}),
        seconds=1.0, batch_size=4)
    assert row["tasks"] == {"price": {"loss": 0.5}, "digit": {"loss": 0.25, "accuracy": 0.5}}


def test_the_summary_counts_bytes_once_and_reports_failovers():
    from meshsl.topology.model import load_topology
    vanilla = load_topology(ROOT / "topologies" / "vanilla.yaml")
    record = RunRecord(set())
    stats = {"bytes": {"client->server|forward": 100, "client->server|backward": 40, "client->server|received": 99},
             "tasks": {}}
    record.commit_step(StepInfo(0, 0, 0, (0,)), done(client=stats, server={"tasks": {}}), seconds=1.0, batch_size=10)
    record.history[-1]["eval"] = {name: {"accuracy": 0.9} for name in vanilla.tasks}
    record.failover({"client"}, "heartbeat", "silent", 123.0, 2.5, 0)
    summary = record.summarise(vanilla, steps_of([(0,)]), wall=3.0)
    assert summary["edges"] == {"client->server": {"forward_bytes": 100, "backward_bytes": 40}}
    assert summary["bytes_per_sample"] == {"client->server": 14.0}
    assert summary["samples"] == 10 and summary["samples_per_s"] == 10.0 and summary["steps"] == 1
    assert summary["failovers"] == 1 and summary["recovery_seconds"] == [2.5]
    assert summary["failover_events"] == [{"nodes": ["client"], "cause": "heartbeat", "reason": "silent",
                                           "detected": 123.0, "recovery_seconds": 2.5, "checkpoint": 0}]
    assert all(task["eval"] == {"accuracy": 0.9} for task in summary["tasks"].values())


def test_evaluation_merges_clients_by_sample_weight_and_sequential_reports_the_live_model():
    results = done(server={"tasks": {"digit": {"by_lane": {"0": {"accuracy": 1.0, "samples": 30},
                                                           "1": {"accuracy": 0.5, "samples": 10}}}}})
    merged = merge_evaluation(results, lanes=2, client_node=lambda lane: f"clinic{lane}")
    assert merged["digit"]["accuracy"] == pytest.approx(0.875)
    assert set(merged["digit"]["by_client"]) == {"clinic0", "clinic1"}
    results = done(clinic0={"tasks": {"digit": {"accuracy": 1.0, "samples": 30, "confusion_matrix": [[1]]}}},
                   clinic1={"tasks": {"digit": {"accuracy": 0.5, "samples": 10}}})
    merged = merge_evaluation(results, lanes=2, client_node=str, sequential_model="clinic1")
    assert merged["digit"]["accuracy"] == 0.5 and merged["digit"]["model"] == "clinic1"
    assert "confusion_matrix" not in merged["digit"]
    single = merge_evaluation(done(server={"tasks": {"digit": {"accuracy": 0.8}}}), lanes=1, client_node=str)
    assert single == {"digit": {"accuracy": 0.8}}
