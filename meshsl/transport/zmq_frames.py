"""Non-blocking multipart send and receive on a plain zmq socket, and the event-loop side of waiting on one.

Plain (blocking-API) sockets used with NOBLOCK only, waited on through their fds on the event loop: half
the CPU of zmq.asyncio's futures per message.
"""
from __future__ import annotations

import asyncio
import time
from typing import Optional, Sequence, cast

import zmq

from meshsl.errors import TransportError

_clock = time.perf_counter

# A task that sends or receives without ever waiting still yields to the event loop this often.
YIELD_INTERVAL_S = 0.0005
_NOBLOCK = int(zmq.NOBLOCK)
_NOBLOCK_MORE = int(zmq.NOBLOCK | zmq.SNDMORE)


def send_now(sock: zmq.Socket, frames: Sequence) -> bool:
    """Send a multipart message with NOBLOCK (zero-copy above the socket's copy threshold); False when
    it cannot go now, in which case libzmq sent none of it."""
    last = len(frames) - 1
    if last < 0:
        raise TransportError("an empty message")
    for attempt in (0, 1):
        try:
            for i in range(last):
                sock.send(frames[i], _NOBLOCK_MORE, copy=False)
            sock.send(frames[last], _NOBLOCK, copy=False)
            return True
        except zmq.Again:
            # libzmq processes its command queue (the peer's "read up to here" credit among them) at
            # most about once a millisecond on a non-blocking send; EVENTS processes it now.
            if attempt or not cast(int, sock.get(zmq.EVENTS)) & zmq.POLLOUT:
                return False
    return False


def recv_now(sock: zmq.Socket) -> Optional[list]:
    """All frames of the next message (zero-copy zmq.Frames), or None when none is waiting."""
    try:
        frame = sock.recv(_NOBLOCK, copy=False)
    except zmq.Again:
        if not cast(int, sock.get(zmq.EVENTS)) & zmq.POLLIN:  # (see send_now: pending commands processed now)
            return None
        try:
            frame = sock.recv(_NOBLOCK, copy=False)
        except zmq.Again:
            return None
    frames = [frame]
    while frame.more:  # the rest of a multipart message is already here
        frame = sock.recv(_NOBLOCK, copy=False)
        frames.append(frame)
    return frames


def _wake(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)


class SocketWaits:
    """The tasks waiting on sockets' event fds (one per socket at most), and the pacing of busy streams."""

    def __init__(self) -> None:
        self._waiters: dict[int, tuple] = {}  # fd -> (future, loop) of the task waiting on that socket
        self._last_yield = _clock()

    async def maybe_yield(self) -> None:
        """A suspension point at least every YIELD_INTERVAL_S: a busy stream never starves other tasks,
        without paying an event-loop iteration for every message."""
        now = _clock()
        if now - self._last_yield >= YIELD_INTERVAL_S:
            await asyncio.sleep(0)
            self._last_yield = _clock()

    async def readable(self, sock: zmq.Socket) -> None:
        """Wait until the socket's event fd signals (zmq's fd is edge-triggered: callers re-check EVENTS).

        A one-shot reader on the socket's fd, instead of the zmq.asyncio future machinery: half the
        CPU per wait. Sends to one peer and receives are each issued by one task, one at a time, so a
        socket has at most one waiter."""
        loop = asyncio.get_running_loop()
        fd = sock.FD
        waiter = loop.create_future()
        loop.add_reader(fd, _wake, waiter)
        self._waiters[fd] = (waiter, loop)
        try:
            await waiter
        finally:
            if self._waiters.get(fd, (None,))[0] is waiter:
                del self._waiters[fd]
                loop.remove_reader(fd)

    def wake(self, sock: zmq.Socket) -> None:
        """Wake the task waiting on `sock`, if any (something arrived that the fd does not signal)."""
        entry = self._waiters.get(sock.FD)
        if entry is not None:
            _wake(entry[0])

    def kick(self, sock: Optional[zmq.Socket]) -> None:
        """Sending on the socket we also receive on may consume the edge-triggered fd's signal: wake the
        receiver when a message is waiting."""
        if sock is None:
            return
        entry = self._waiters.get(sock.FD)
        if entry is not None and cast(int, sock.get(zmq.EVENTS)) & zmq.POLLIN:
            _wake(entry[0])

    def stop_waiting(self, sock: zmq.Socket) -> None:
        """Before a socket closes: drop its fd reader and cancel a task waiting on it (as zmq.asyncio did)."""
        try:
            fd = sock.FD
        except zmq.ZMQError:
            return
        entry = self._waiters.pop(fd, None)
        if entry is not None:
            waiter, loop = entry
            loop.remove_reader(fd)
            waiter.cancel()
