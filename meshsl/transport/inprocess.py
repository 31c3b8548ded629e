"""In-process transport: bounded asyncio queues keyed by endpoint, for tests and many-node simulation.

It has no `try_send_threadsafe`: asyncio queues belong to the event loop, so a node's compute thread
hands its messages to the loop (the node falls back to that when the transport lacks the method)."""
from __future__ import annotations

import asyncio
from typing import Sequence

from meshsl.errors import TransportError
from meshsl.transport.base import Transport

_MAILBOXES: dict[str, asyncio.Queue] = {}
# Like a ZeroMQ DEALER with IMMEDIATE, a send to a peer that has not bound yet waits for it (bounded by
# the caller's send timeout) instead of failing: nodes of a simulation start in any order.
_BOUND: dict[str, asyncio.Event] = {}


def _bound(endpoint: str) -> asyncio.Event:
    event = _BOUND.get(endpoint)
    if event is None:
        event = _BOUND[endpoint] = asyncio.Event()
    return event


class InProcessTransport(Transport):
    def __init__(self, node: str, endpoint: str, address_book: dict[str, str], queue_size: int = 256) -> None:
        super().__init__(node, endpoint, address_book)
        self.queue_size = queue_size
        self.sent_hook = None  # tests record traffic here: hook(sender, peer, frames)
        self._mailbox: asyncio.Queue | None = None

    async def start(self) -> None:
        if self.endpoint in _MAILBOXES:
            raise TransportError(f"endpoint {self.endpoint} is already bound")
        self._mailbox = _MAILBOXES[self.endpoint] = asyncio.Queue(maxsize=self.queue_size)
        _bound(self.endpoint).set()

    def _queue(self, peer: str) -> asyncio.Queue:
        endpoint = self.address_book.get(peer)
        queue = _MAILBOXES.get(endpoint) if endpoint else None
        if queue is None:
            raise TransportError(f"peer {peer!r} is not reachable at {endpoint}")
        return queue

    async def send(self, peer: str, frames: Sequence) -> None:
        endpoint = self.address_book.get(peer)
        if endpoint and endpoint not in _MAILBOXES:
            await _bound(endpoint).wait()
        queue = self._queue(peer)
        if self.sent_hook:
            self.sent_hook(self.node, peer, frames)
        await queue.put((self.node, [bytes(f) for f in frames]))

    def try_send(self, peer: str, frames: Sequence) -> bool:
        if type(self).send is not InProcessTransport.send:
            return False  # a subclass that overrides `send` (tests hold messages back) sees every message
        endpoint = self.address_book.get(peer)
        if endpoint and endpoint not in _MAILBOXES:
            return False  # not bound yet: `send` waits for it
        queue = self._queue(peer)
        if queue.full():
            return False
        if self.sent_hook:
            self.sent_hook(self.node, peer, frames)
        queue.put_nowait((self.node, [bytes(f) for f in frames]))
        return True

    async def recv(self) -> tuple[str, list]:
        return await self._mailbox.get()

    async def close(self) -> None:
        if _MAILBOXES.get(self.endpoint) is self._mailbox:
            _MAILBOXES.pop(self.endpoint, None)
            _BOUND.pop(self.endpoint, None)
