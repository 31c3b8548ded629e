"""Training at the coordinator: runs of self-driven steps between barriers (docs/wan.md), what each
barrier does (client weights, evaluation), and evaluation rounds. Drives the nodes through the
coordinator (its `broadcast`, `collect`, `forward_round`); where barriers fall is the StepPlanner's."""
from __future__ import annotations

import logging
import time
from typing import Optional

from meshsl.data import eval_batches
from meshsl.errors import NodesLost
from meshsl.schedule.steps import sample_pools
from meshsl.protocol import control
from meshsl.protocol.envelope import Kind
from meshsl.machines.coordinator_plan import StepPlanner
from meshsl.machines.coordinator_summary import merge_evaluation

log = logging.getLogger("meshsl.coordinator")


class Training:
    """The training steps of `coordinator` (the async driver), planned by `planner`."""

    def __init__(self, coordinator, planner: StepPlanner) -> None:
        self.coordinator = coordinator
        self.planner = planner
        self.last_train_round = 0
        self.last_lanes: tuple[int, ...] = ()  # clients of the last training step (sequential: the live model)

    async def train(self, index: int) -> None:
        """Runs of self-driven steps from `index`, each up to its barrier, then what the barrier does
        (client weights, evaluation); a lost node sends the run back to a checkpoint."""
        coordinator, planner, steps = self.coordinator, self.planner, self.planner.steps
        options = coordinator.options
        while index < len(steps):
            following = self._next_training_step(index)  # sequential: the turns of dropped clients are skipped
            if following is None:
                break
            index = following
            end = planner.barrier_after(index) + 1
            try:
                await coordinator.clients.hand_over_past_dropped(planner, index)
                await self._run_steps(index, end)
                info, row = steps[end - 1], coordinator.history[-1]
                if await coordinator.clients.sync(info, planner) and coordinator.checkpoint_every > 0 \
                        and end % coordinator.checkpoint_every == 0:
                    coordinator.machine.defer_checkpoint(end)  # written by the next Run, after the averaging/hand-off
                if options.evaluate and planner.eval_due(info):
                    row["eval"] = await self.evaluate()
                    _log_evaluation(coordinator.node.node, row)
            except NodesLost as lost:
                index = await coordinator.recovery.recover(lost)
                continue
            if options.progress:
                options.progress(row)
            index = end

    def _next_training_step(self, index: int) -> Optional[int]:
        coordinator = self.coordinator
        following, changes = self.planner.next_training_step(index)
        for change in changes:
            coordinator.note_change(change)
        if coordinator.planned:
            coordinator.machine.roster_changed()
        return following

    async def _run_steps(self, index: int, end: int) -> None:
        """Steps [index, end) run self-driven: one Run out, then a DONE per node and step back, each
        answered by a COMMIT (the nodes stay within `lag` steps of the last commit)."""
        coordinator, steps = self.coordinator, self.planner.steps
        base = coordinator.machine.run_rounds(end - index)  # rounds base+1 .. base+count are this run's steps
        training = coordinator.topology.spec.training
        run = control.Run(first_step=index, count=end - index, micro_batches=training.micro_batches,
                          checkpoint=coordinator.machine.take_deferred_checkpoint(),
                          hold_checkpoint=self.planner.sync_due(steps[end - 1]),
                          dropped_lanes=coordinator.roster.dropped_lanes())
        await coordinator.broadcast(run, step=base)
        mark = time.perf_counter()
        for i in range(index, end):
            info, round_ = self.planner.as_trained(steps[i]), base + 1 + (i - index)
            done = await coordinator.collect(Kind.DONE, set(coordinator.nodes), round_, "finish its step")
            await coordinator.broadcast(control.Commit(), phase="train", step=round_)
            now = time.perf_counter()
            row = coordinator.record.commit_step(info, done, now - mark, training.batch_size)
            mark = now
            self.last_train_round = round_
            self.last_lanes = tuple(info.lanes)
            log.info("step committed", extra={
                "node": coordinator.node.node, "step": row["step"], "epoch": row["epoch"],
                "samples_per_s": round(row["samples_per_s"], 1),
                **{f"{t}_loss": round(v["loss"], 5) for t, v in row["tasks"].items()}})
            if coordinator.options.progress and i < end - 1:
                coordinator.options.progress(row)  # the run's last row goes out after its evaluation

    async def await_commits(self) -> None:
        """Every node reported (DONE) that it applied the optimizer step of the last training round."""
        coordinator, round_ = self.coordinator, self.last_train_round
        missing = {n for n in coordinator.nodes if coordinator.machine.book.committed.get(n, 0) < round_}
        if round_ and missing:
            await coordinator.collect(Kind.DONE, missing, round_, "finish its step")

    async def evaluate(self) -> dict:
        """One evaluation round over the clients taking part, merged per task."""
        coordinator = self.coordinator
        topology, clients = coordinator.topology, coordinator.clients
        batches = len(eval_batches(sample_pools(topology).test, topology.spec.training.eval_batch_size))
        lanes = coordinator.roster.active_lanes(range(topology.lanes))  # dropped clients are not evaluated
        done = await coordinator.forward_round("eval", control.Begin(lanes=lanes, micro_batches=batches),
                                               "finish evaluation")
        sequential = topology.spec.clients is not None and topology.spec.clients.mode == "sequential"
        latest = clients.client_node(self.last_lanes[0]) if self.last_lanes and sequential else None
        return merge_evaluation(done, topology.lanes, clients.client_node, latest)


def _log_evaluation(node: str, row: dict) -> None:
    for task, result in row["eval"].items():
        log.info("evaluated", extra={"node": node, "step": row["step"], "task": task, **{
            k: round(v, 5) for k, v in result.items() if k in ("loss", "accuracy", "f1", "auroc")
            and isinstance(v, float)}})
