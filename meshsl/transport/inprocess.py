"""In-process transport: bounded asyncio queues keyed by endpoint, for tests and many-node simulation.

The queues live in an `InProcessHub`, one per simulation (no process-wide table): two simulations in
one process cannot see each other's nodes, and a finished one leaves nothing behind.

It declares no `threadsafe_send`: asyncio queues belong to the event loop, so a node's compute thread
hands its messages to the loop."""
from __future__ import annotations

import asyncio
from typing import Mapping, Optional, Sequence

from meshsl.errors import ConfigError, TransportError
from meshsl.transport.base import Transport, register_backend


class InProcessHub:
    """The mailboxes of one simulation: endpoint -> bounded queue (or a stand-in with `put`,
    `put_nowait` and `full`, such as the Ray bridge's remote mailboxes)."""

    def __init__(self) -> None:
        self.mailboxes: dict[str, asyncio.Queue] = {}
        # Like a ZeroMQ DEALER with IMMEDIATE, a send to a peer that has not bound yet waits for it (bounded
        # by the caller's send timeout) instead of failing: nodes of a simulation start in any order.
        self._bound: dict[str, asyncio.Event] = {}

    def bound(self, endpoint: str) -> asyncio.Event:
        """Set once a mailbox is installed at `endpoint`."""
        event = self._bound.get(endpoint)
        if event is None:
            event = self._bound[endpoint] = asyncio.Event()
        return event

    def install(self, endpoint: str, mailbox) -> None:
        self.mailboxes[endpoint] = mailbox
        self.bound(endpoint).set()

    def remove(self, endpoint: str, mailbox=None) -> None:
        """Drop the mailbox at `endpoint` (only if it is `mailbox`, when given)."""
        if mailbox is None or self.mailboxes.get(endpoint) is mailbox:
            self.mailboxes.pop(endpoint, None)
            self._bound.pop(endpoint, None)


class InProcessTransport(Transport):
    def __init__(self, node: str, endpoint: str, address_book: Mapping[str, Optional[str]], queue_size: int = 256, *,
                 hub: InProcessHub) -> None:
        super().__init__(node, endpoint, address_book)
        self.queue_size = queue_size
        self.hub = hub
        self._mailbox: asyncio.Queue | None = None

    async def start(self) -> None:
        if self.endpoint in self.hub.mailboxes:
            raise TransportError(f"endpoint {self.endpoint} is already bound")
        self._mailbox = asyncio.Queue(maxsize=self.queue_size)
        self.hub.install(self.bound_endpoint, self._mailbox)

    def _queue(self, peer: str) -> asyncio.Queue:
        endpoint = self.address_book.get(peer)
        queue = self.hub.mailboxes.get(endpoint) if endpoint else None
        if queue is None:
            raise TransportError(f"peer {peer!r} is not reachable at {endpoint}")
        return queue

    async def send(self, peer: str, frames: Sequence) -> None:
        endpoint = self.address_book.get(peer)
        if endpoint and endpoint not in self.hub.mailboxes:
            await self.hub.bound(endpoint).wait()
        queue = self._queue(peer)
        if self.sent_hook:
            self.sent_hook(self.node, peer, frames)
        await queue.put((self.node, [bytes(f) for f in frames]))

    def try_send(self, peer: str, frames: Sequence) -> bool:
        if type(self).send is not InProcessTransport.send:
            return False  # a subclass that overrides `send` (tests hold messages back) sees every message
        endpoint = self.address_book.get(peer)
        if endpoint and endpoint not in self.hub.mailboxes:
            return False  # not bound yet: `send` waits for it
        queue = self._queue(peer)
        if queue.full():
            return False
        if self.sent_hook:
            self.sent_hook(self.node, peer, frames)
        queue.put_nowait((self.node, [bytes(f) for f in frames]))
        return True

    @property
    def bound_endpoint(self) -> str:
        """An in-process node always has its mailbox address (nothing dials out in one process)."""
        if not self.endpoint:
            raise TransportError(f"in-process node {self.node!r} needs an endpoint")
        return self.endpoint

    async def recv(self) -> tuple[str, list]:
        if self._mailbox is None:
            raise TransportError(f"in-process node {self.node!r} receives before it started")
        return await self._mailbox.get()

    async def close(self) -> None:
        if self.endpoint:
            self.hub.remove(self.endpoint, self._mailbox)


def _from_options(node: str, endpoint: str, address_book: dict[str, str], hub: Optional[InProcessHub] = None,
                  queue_size: int = 256, **_socket_options) -> InProcessTransport:
    """`make_transport` for `inproc://` endpoints; the socket options of the ZeroMQ backend do not apply."""
    if hub is None:
        raise ConfigError(f"node {node!r}: an in-process endpoint ({endpoint}) needs the hub of its simulation "
                          f"(make_transport(..., hub=InProcessHub()))", "endpoint")
    return InProcessTransport(node, endpoint, address_book, queue_size, hub=hub)


register_backend("inproc", _from_options)
