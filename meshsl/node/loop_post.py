"""Hand callbacks from worker threads to an event loop, one wake-up per batch instead of per call.

`call_soon_threadsafe` writes to the loop's self-pipe on every call. When the loop is busy (a
simulation hosting 1,000 nodes, a stage receiving a burst) callbacks pile up anyway, so they are
queued here and the loop is woken only when it is not already due to drain the queue. Order is
kept: callbacks run first in, first out.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import weakref
from collections import deque

log = logging.getLogger("meshsl.node")

_posters: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopPoster]" = weakref.WeakKeyDictionary()
_posters_lock = threading.Lock()


class LoopPoster:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._pending: deque = deque()
        self._lock = threading.Lock()
        self._scheduled = False

    def post(self, callback, *args) -> None:
        with self._lock:
            self._pending.append((callback, args))
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is closed: the node is shutting down
            pass

    def _drain(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, deque()
            self._scheduled = False
        for callback, args in batch:
            try:
                callback(*args)
            except Exception:  # one node's failing callback must not drop the others' batch
                log.exception("callback %r failed", getattr(callback, "__qualname__", callback))


def poster_for(loop: asyncio.AbstractEventLoop) -> LoopPoster:
    """The one poster of `loop` (shared by every node hosted on it)."""
    with _posters_lock:
        poster = _posters.get(loop)
        if poster is None:
            poster = _posters[loop] = LoopPoster(loop)
        return poster
