"""A per-peer send queue that keeps order, bounds what waits, and lets the producer skip the queue.

Producers on the event loop either `await put` (waits for room) or `post` (never waits; used for
messages whose producer applies backpressure itself, see PeerOutboxes.wait_for_room). The one sender
task per peer drains it. `idle` is set when nothing is queued and nothing is being sent, so a message
may go straight to the transport (`Transport.try_send`) without overtaking an earlier one.
"""
from __future__ import annotations

import asyncio
from collections import deque


class Outbox:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._items: deque = deque()
        self._ready = asyncio.Event()  # something to send
        self._room = asyncio.Event()  # fewer than `limit` queued
        self._room.set()
        self._drained = asyncio.Event()  # nothing queued, nothing in flight
        self._drained.set()
        self.sending = False

    def __len__(self) -> int:
        return len(self._items)

    @property
    def full(self) -> bool:
        return len(self._items) >= self.limit

    @property
    def idle(self) -> bool:
        return not self._items and not self.sending

    def post(self, item) -> None:
        """Queue without waiting; may exceed `limit` by what producers posted before they saw it full."""
        self._items.append(item)
        self._ready.set()
        self._drained.clear()
        if self.full:
            self._room.clear()

    async def put(self, item) -> None:
        while self.full:
            await self._room.wait()
        self.post(item)

    async def wait_for_room(self) -> None:
        while self.full:
            await self._room.wait()

    async def get(self):
        """The next item; the box counts as sending until `done()`."""
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        item = self._items.popleft()
        self.sending = True
        if not self.full:
            self._room.set()
        return item

    def done(self) -> None:
        self.sending = False
        if not self._items:
            self._drained.set()

    async def join(self) -> None:
        await self._drained.wait()
