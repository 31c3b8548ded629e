"""A node's sending side: one bounded Outbox and one sender task per peer, in order, never blocking receipt.

A message for a peer whose outbox is idle goes straight to the transport (`Transport.try_send`), from the
event loop or, when the transport declares `threadsafe_send`, from the compute thread. Socket use by both
is serialised by one lock; the compute thread only sends to a peer whose outbox is idle.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from typing import Any, Callable, Optional

from meshsl.node.owned_tasks import OwnedTasks
from meshsl.errors import MeshslError
from meshsl.node.outbox import Outbox
from meshsl.transport import Transport

log = logging.getLogger("meshsl.node")


class PeerOutboxes:
    """`limit`: messages an outbox holds; `timeout_s`: a peer that cannot take a message that long is gone
    (the coordinator's recovery replays the round, so the message is dropped, not queued forever);
    `counters`: NodeCounters; `metrics`: returns the node's metrics (None: none), which may appear late."""

    def __init__(self, node: str, transport: Transport, limit: int, timeout_s: float, counters,
                 metrics: Callable[[], Any]) -> None:
        self.node = node
        self.transport = transport
        self.limit = limit
        self.timeout_s = timeout_s
        self.counters = counters
        self._metrics = metrics
        self.boxes: dict[str, Outbox] = {}
        self.last_sent: dict[str, float] = {}  # peer -> when a message for it was last handed over
        self._senders: dict[str, asyncio.Task] = {}
        self._owner: Optional[OwnedTasks] = None  # the running node's tasks
        self._send_lock = threading.Lock()
        self._direct_send = transport.try_send_threadsafe if transport.threadsafe_send else None

    def _started(self) -> OwnedTasks:
        if self._owner is None:
            raise RuntimeError("used before the node started its tasks")
        return self._owner

    def start(self, tasks) -> None:
        """Sender tasks belong to `tasks` (the node's OwnedTasks) from now on."""
        self._owner = tasks

    def outbox(self, peer: str) -> Outbox:
        box = self.boxes.get(peer)
        if box is None:
            box = self.boxes[peer] = Outbox(self.limit)
            self._senders[peer] = self._started().create_task(self._sender(peer, box), name=f"{self.node}-send-{peer}")
        return box

    def full(self, peer: str) -> bool:
        box = self.boxes.get(peer)
        return box is not None and box.full

    async def enqueue(self, peer: str, frames: list, edge_direction: Optional[tuple]) -> None:
        """Send in order after what is queued for `peer`; waits while its queue is full."""
        box = self.outbox(peer)
        self.last_sent[peer] = time.monotonic()
        if not box.idle or not self._try_send(peer, frames, edge_direction):
            await box.put((frames, edge_direction))

    def post(self, peer: str, frames: list, edge_direction: Optional[tuple]) -> None:
        """Like `enqueue` but never waits: the caller bounds what it posts (see `wait_for_room`)."""
        box = self.outbox(peer)
        self.last_sent[peer] = time.monotonic()
        if not box.idle or not self._try_send(peer, frames, edge_direction):
            box.post((frames, edge_direction))

    def _try_send(self, peer: str, frames: list, edge_direction: Optional[tuple]) -> bool:
        try:
            with self._send_lock:
                sent = self.transport.try_send(peer, frames)
                if sent:
                    self._count_sent(frames, edge_direction)
        except MeshslError as exc:
            log.warning("%s: dropped a message to %s: %s", self.node, peer, exc)
            return True
        return sent

    def send_from_compute(self, peer: str, frames: list, edge_direction: tuple) -> bool:
        """On the compute thread: put a tensor message straight on the socket when nothing for `peer` is
        queued or being sent (True), saving the event loop a wake-up per message; else False."""
        box = self.boxes.get(peer)
        if self._direct_send is None or box is None:
            return False
        with self._send_lock:
            send = self._direct_send  # None once the transport is closing
            if send is None or not box.idle:
                return False
            try:
                sent = send(peer, frames)
            except Exception:  # noqa: BLE001 - e.g. a socket closed under us: the loop's path reports it
                return False
            if sent:
                self._count_sent(frames, edge_direction)
                self.last_sent[peer] = time.monotonic()
        return sent

    def stop_direct_sends(self) -> None:
        """The compute thread must not touch a socket once it may be closed."""
        with self._send_lock:
            self._direct_send = None

    def _count_sent(self, frames: list, edge_direction: Optional[tuple]) -> None:
        if edge_direction is not None:
            nbytes = sum(len(f) if isinstance(f, (bytes, memoryview)) else f.nbytes for f in frames)
            self.counters.add_bytes(*edge_direction, nbytes)
            metrics = self._metrics()
            if metrics:
                metrics.message(edge_direction[0], "sent", nbytes)

    async def _sender(self, peer: str, box: Outbox) -> None:
        """One sender per peer keeps per-peer order and never blocks the receive loop."""
        while True:
            frames, edge_direction = await box.get()
            metrics = self._metrics()
            if metrics:
                metrics.queue_depth(f"outbox:{peer}", len(box))
            try:
                await asyncio.wait_for(self.transport.send(peer, frames), timeout=self.timeout_s)
                with self._send_lock:  # the compute thread counts its direct sends too
                    self._count_sent(frames, edge_direction)
            except (MeshslError, TimeoutError) as exc:
                log.warning("%s: dropped a message to %s: %s", self.node, peer, exc or "timed out")
            finally:
                box.done()

    def wait_for_room(self, peers: list, loop: asyncio.AbstractEventLoop, stopped: asyncio.Event) -> None:
        """Backpressure on the compute thread: do not produce more for a peer whose queue is full."""
        if not any(self.full(peer) for peer in peers):
            return

        async def room() -> None:
            for peer in peers:
                box = self.boxes.get(peer)
                if box is not None:
                    await box.wait_for_room()

        while not stopped.is_set():
            future = asyncio.run_coroutine_threadsafe(room(), loop)
            try:
                future.result(timeout=1.0)
                return
            except concurrent.futures.TimeoutError:
                future.cancel()
            except (RuntimeError, concurrent.futures.CancelledError):
                return

    async def drain(self, timeout: float = 5.0) -> None:
        """Wait (at most `timeout` in all, not per peer) until every peer's queue is sent: a run aborted
        after clients were lost must not wait 5 s for each dead one before its node exits."""
        waits = [asyncio.ensure_future(box.join()) for box in list(self.boxes.values())]
        if not waits:
            return
        _, pending = await asyncio.wait(waits, timeout=timeout)
        for wait in pending:
            wait.cancel()

    def reroute(self, peer: str, endpoint: str) -> None:
        """`peer` now lives at `endpoint` (a standby took over): drop what was queued for the old one."""
        with self._send_lock:  # not while the compute thread is sending on the old socket
            self.transport.reroute(peer, endpoint)
        sender = self._senders.pop(peer, None)
        if sender is not None:
            sender.cancel()
        self.boxes.pop(peer, None)
