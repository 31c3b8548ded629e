"""A task group that keeps the handles of the tasks it starts (asyncio.TaskGroup does not expose them)."""
from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, Optional


class OwnedTasks:
    """Starts tasks in `group` and remembers the ones still running, so the owner can stop them all
    without reading the group's private state."""

    def __init__(self, group: asyncio.TaskGroup) -> None:
        self.group = group
        self.running: set[asyncio.Task] = set()

    def create_task(self, coro: Coroutine[Any, Any, Any], *, name: Optional[str] = None) -> asyncio.Task:
        task = self.group.create_task(coro, name=name)
        self.running.add(task)
        task.add_done_callback(self.running.discard)
        return task

    def cancel_all(self) -> None:
        for task in list(self.running):
            task.cancel()
