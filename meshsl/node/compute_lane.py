"""A node's compute lane: the executor compute runs on, the lock that shares the state machine between the
event loop and the compute thread, and the *chain* that runs one compute action after another.

When an action finishes the chain asks the machine (under the lock) for the next, encodes the tensors to
send, hands them to the loop in one call and goes straight on, so a busy pipeline stage never waits on
the event loop between micro-batches.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional

from meshsl.machines import node as m

log = logging.getLogger("meshsl.node")

COMPUTE_ACTIONS = (m.Forward, m.Backward, m.ApplyOptimizer, m.Prepare)


def failure_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]


class ComputeLane:
    """`executor`: where compute runs, one task at a time per node (default: a thread of its own; a
    simulation hosting many nodes passes one shared single-thread executor)."""

    def __init__(self, node: str, machine, executor: Optional[concurrent.futures.Executor] = None) -> None:
        self.node = node
        self.machine = machine
        self.owns_executor = executor is None
        self.executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"compute-{node}")
        self.lock = threading.Lock()  # the machine is fed from the loop and from the compute thread
        self._chain: Optional[ComputeChain] = None

    def handle(self, event) -> list:
        with self.lock:
            return self.machine.handle(event)

    def reset(self, round_: int) -> None:
        with self.lock:
            self.machine.reset(round_)

    @property
    def idle(self) -> bool:
        """Nothing computing, no commit pending, nothing queued."""
        machine = self.machine
        return not machine.busy and machine.pending_commit is None and not machine.queued

    async def call(self, fn, *args):
        """`fn(*args)` on the compute thread, awaited on the loop."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def bind(self, chain: "ComputeChain") -> None:
        self._chain = chain

    def start(self, action) -> None:
        """Run a chain starting at `action` on the compute thread."""
        chain = self._chain
        if chain is None:
            raise RuntimeError("a compute chain is bound before the first action")
        self.executor.submit(chain.run, action).add_done_callback(chain.report_crash)

    def shutdown(self) -> None:
        if self.owns_executor:
            self.executor.shutdown(wait=True)


class ComputeChain:
    """The loop on the compute thread. `work`: NodeWork; `outboxes`: PeerOutboxes; `deliver(messages, others,
    done)` and `fail(error)` are posted to the event loop; `wait_for_room(peers)` applies backpressure."""

    def __init__(self, lane: ComputeLane, work, outboxes, counters, metrics: Callable[[], Any],
                 on_loop: Callable, deliver: Callable, fail: Callable, wait_for_room: Callable) -> None:
        self.lane = lane
        self.work = work
        self.outboxes = outboxes
        self.counters = counters
        self._metrics = metrics
        self._on_loop = on_loop
        self._deliver = deliver
        self._fail = fail
        self._wait_for_room = wait_for_room

    def run(self, action) -> None:
        """Run `action`, then whatever the machine says comes next, until nothing does.

        Outgoing tensors are encoded here (codecs are compute) and handed to the loop once per action."""
        while action is not None:
            if not self._timed(action):
                return
            with self.lane.lock:
                actions = self.lane.machine.handle(m.ComputeFinished(action))
                phase = self.lane.machine.phase
            action, messages, others, done = self._sort(actions, phase)
            if done is False:
                return
            if messages or others or done is not None or action is None:  # a wake-up only when there is news
                self._on_loop(self._deliver, messages, others, done)
            if action is not None and messages:
                self._wait_for_room([peer for peer, _, _ in messages])

    def _timed(self, action) -> bool:
        start = time.perf_counter()
        try:
            self.work.run(action)
        except Exception as exc:  # a local compute failure: report it, do not hang the topology
            log.exception("%s: %s failed", self.lane.node, type(action).__name__)
            self._on_loop(self._fail, failure_text(exc))
            return False
        seconds = time.perf_counter() - start
        self.counters.busy_seconds += seconds
        metrics = self._metrics()
        if metrics and isinstance(action, (m.Forward, m.Backward)):
            metrics.microbatch(action.segment, "forward" if isinstance(action, m.Forward) else "backward", seconds)
        return True

    def _sort(self, actions: list, phase: str) -> tuple:
        """(next compute action, messages left for the loop, other actions, finished step or None; False:
        finishing the step failed)."""
        action, messages, others, done = None, [], [], None
        for follow in actions:
            if isinstance(follow, COMPUTE_ACTIONS):
                action = follow
            elif isinstance(follow, (m.SendActivation, m.SendGradient)):
                message = self.work.tensor_message(follow, phase)
                if not self.outboxes.send_from_compute(*message):
                    messages.append(message)
            elif isinstance(follow, m.RoundDone) and follow.phase == "train":
                try:
                    done = self.work.step_applied(follow)
                except Exception as exc:  # e.g. the checkpoint could not be written: the run must know
                    log.exception("%s: finishing step of round %d failed", self.lane.node, follow.round)
                    self._on_loop(self._fail, failure_text(exc))
                    return None, [], [], False
            else:
                others.append(follow)
        return action, messages, others, done

    def report_crash(self, future: concurrent.futures.Future) -> None:
        """A chain raised outside its own guard (e.g. a checkpoint write: disk full, read-only): the
        coordinator must hear the OS error, not wait for a step that never ends."""
        exc = None if future.cancelled() else future.exception()
        if exc is None:
            return
        log.error("%s: compute thread failed: %s: %s", self.lane.node, type(exc).__name__, exc)
        self._on_loop(self._fail, failure_text(exc))
