"""OwnedTasks: the node's task group keeps its task handles (no reading asyncio.TaskGroup's private state)."""
import asyncio

import pytest

from meshsl.node.owned_tasks import OwnedTasks

pytestmark = pytest.mark.unit


def test_cancel_all_stops_the_running_tasks_and_forgets_finished_ones():
    async def scenario():
        forever = asyncio.Event()
        async with asyncio.TaskGroup() as group:
            owned = OwnedTasks(group)
            done = owned.create_task(asyncio.sleep(0), name="short")
            waiting = [owned.create_task(forever.wait(), name=f"wait-{i}") for i in range(3)]
            await done
            await asyncio.sleep(0)  # the done callback runs
            running_before = set(owned.running)
            owned.cancel_all()
        return done, waiting, running_before, owned.running

    done, waiting, running_before, running_after = asyncio.run(scenario())
    assert running_before == set(waiting) and done.result() is None
    assert all(t.cancelled() for t in waiting) and running_after == set()
