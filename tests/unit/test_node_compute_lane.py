"""ComputeLane/ComputeChain with a scripted machine and fake work: one chain runs action after action on
the compute thread, hands news to the loop once per action, and reports failures instead of hanging."""
from __future__ import annotations

import concurrent.futures
import threading

import pytest

from meshsl.machines import node as m
from meshsl.node.compute_lane import ComputeChain, ComputeLane
from meshsl.node.runtime import NodeCounters

pytestmark = pytest.mark.unit

FORWARD = m.Forward(1, "bottom", 0, 0)
BACKWARD = m.Backward(1, "bottom", 0, 0)
SEND = m.SendActivation(1, "bottom", "top", 0, 0, peer="server")
OPTIMIZE = m.ApplyOptimizer(1)
DONE = m.RoundDone(1, "train")


class ScriptedMachine:
    """What follows each finished action; idle once the script is used up."""

    def __init__(self, script: dict) -> None:
        self.script = script
        self.phase = "train"
        self.busy, self.pending_commit, self.queued = False, None, ()

    def handle(self, event) -> list:
        return self.script.get(event.action, [])


class FakeWork:
    def __init__(self, failing=()) -> None:
        self.ran: list = []
        self.failing = failing
        self.threads: set = set()

    def run(self, action) -> None:
        self.threads.add(threading.current_thread().name)
        if action in self.failing:
            raise RuntimeError("boom")
        self.ran.append(action)

    def tensor_message(self, action, phase: str) -> tuple:
        return action.peer, [b"frames"], ("bottom->top", "forward")

    def step_applied(self, action) -> tuple:
        return {"loss": 1.0}, action.round


class NoDirectSends:
    def send_from_compute(self, peer, frames, edge_direction) -> bool:
        return False


def _lane(script: dict, work: FakeWork) -> tuple[ComputeLane, list, list]:
    delivered, failures = [], []
    lane = ComputeLane("client", ScriptedMachine(script))

    def on_loop(callback, *args):  # the test has no event loop: run it at once
        callback(*args)

    lane.chain = ComputeChain(lane, work, NoDirectSends(), NodeCounters(), lambda: None, on_loop,
                              lambda *news: delivered.append(news), failures.append, lambda peers: None)
    lane.bind(lane.chain)
    return lane, delivered, failures


def test_a_chain_runs_each_next_action_and_hands_news_to_the_loop() -> None:
    work = FakeWork()
    lane, delivered, failures = _lane({FORWARD: [SEND, BACKWARD], BACKWARD: [OPTIMIZE], OPTIMIZE: [DONE]}, work)
    lane.start(FORWARD)
    lane.shutdown()  # waits for the chain
    assert work.ran == [FORWARD, BACKWARD, OPTIMIZE] and failures == []
    assert work.threads == {"compute-client_0"}  # the node's own compute thread
    assert delivered == [([("server", [b"frames"], ("bottom->top", "forward"))], [], None),
                         ([], [], ({"loss": 1.0}, 1))]
    assert lane.idle


def test_a_failing_action_is_reported_and_ends_the_chain() -> None:
    work = FakeWork(failing=(BACKWARD,))
    lane, delivered, failures = _lane({FORWARD: [BACKWARD], BACKWARD: [OPTIMIZE]}, work)
    lane.start(FORWARD)
    lane.shutdown()
    assert work.ran == [FORWARD] and failures == ["RuntimeError: boom"] and delivered == []


def test_a_crash_outside_the_chains_guard_is_reported() -> None:
    lane, _, failures = _lane({}, FakeWork())
    future: concurrent.futures.Future = concurrent.futures.Future()
    future.set_exception(OSError(28, "No space left on device"))
    lane.chain.report_crash(future)
    done: concurrent.futures.Future = concurrent.futures.Future()
    done.set_result(None)
    lane.chain.report_crash(done)
    assert failures == ["OSError: [Errno 28] No space left on device"]
    lane.shutdown()


def test_a_shared_executor_is_not_shut_down_by_the_lane() -> None:
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as shared:
        lane = ComputeLane("client", ScriptedMachine({}), shared)
        lane.shutdown()
        assert not lane.owns_executor and shared.submit(lambda: 7).result() == 7
