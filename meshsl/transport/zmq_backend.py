"""ZeroMQ transport: one ROUTER bound on the node's endpoint, one DEALER per peer (routing id = node name)."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable, Optional, Sequence

import zmq
import zmq.asyncio

from meshsl.errors import TransportError
from meshsl.transport.base import SPOOFED_PREFIX, Transport

log = logging.getLogger("meshsl.transport")
_clock = time.perf_counter

# A task that sends or receives without ever waiting still yields to the event loop this often.
YIELD_INTERVAL_S = 0.0005
_NOBLOCK = int(zmq.NOBLOCK)
FRAME_SLACK_BYTES = 64 * 1024
CLOSE_LINGER_MS = 500
_NOBLOCK_MORE = int(zmq.NOBLOCK | zmq.SNDMORE)


def _send_now(sock: zmq.Socket, frames: Sequence) -> bool:
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
            if attempt or not sock.get(zmq.EVENTS) & zmq.POLLOUT:
                return False
    return False


def _recv_now(sock: zmq.Socket) -> Optional[list]:
    """All frames of the next message (zero-copy zmq.Frames), or None when none is waiting."""
    try:
        frame = sock.recv(_NOBLOCK, copy=False)
    except zmq.Again:
        if not sock.get(zmq.EVENTS) & zmq.POLLIN:  # (see _send_now: pending commands processed now)
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


class ZmqTransport(Transport):
    def __init__(self, node: str, endpoint: str, address_book: dict[str, str], high_water_mark: int = 128,
                 keyring=None, on_auth_refused: Optional[Callable[[str], None]] = None,
                 context: Optional[zmq.asyncio.Context] = None, copy_threshold: int = zmq.COPY_THRESHOLD,
                 max_message_bytes: Optional[int] = None, connection_timeout_s: Optional[float] = None) -> None:
        """`max_message_bytes`: the socket drops (disconnects) a peer whose frame is larger, before it is
        buffered; `connection_timeout_s`: ZMTP heartbeats drop a connection silent that long, so a node
        restarted elsewhere can claim its name after a half-open connection (names are never taken over)."""
        super().__init__(node, endpoint, address_book)
        self.high_water_mark = high_water_mark
        self.keyring = keyring  # meshsl.security.keys.KeyRing when CURVE is on
        self.on_auth_refused = on_auth_refused
        self.context = context or zmq.asyncio.Context()
        self._owns_context = context is None
        self._router: Optional[zmq.asyncio.Socket] = None
        self._dealers: dict[str, zmq.asyncio.Socket] = {}
        self._shadows: dict = {}  # id(async socket) -> (socket, its blocking shadow)
        self._authenticator = None
        self._monitors: list = []
        self.refused_by: dict[str, int] = {}  # peer -> CURVE handshakes it refused (our key is not theirs)
        self.sent_hook = None
        self.copy_threshold = copy_threshold
        self.max_message_bytes = max_message_bytes
        self.connection_timeout_s = connection_timeout_s
        self._identities: dict[bytes, str] = {}  # routing id -> its decoded name (bounded)
        self._last_yield = _clock()
        self._waiters: dict[int, tuple] = {}  # fd -> (future, loop) of the task waiting on that socket

    async def start(self) -> None:
        router = self.context.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.RCVHWM, self.high_water_mark)
        # A routing id stays with the connection that first claimed it: another connection naming an
        # existing node is refused (no takeover). A restarted node reconnects once its old connection
        # is closed (process gone) or timed out by ZMTP heartbeats (half-open, machine gone).
        router.setsockopt(zmq.ROUTER_HANDOVER, 0)
        if self.max_message_bytes is not None:
            # Checked on each frame's header, before anything is buffered; the slack covers CURVE's box.
            router.setsockopt(zmq.MAXMSGSIZE, int(self.max_message_bytes) + FRAME_SLACK_BYTES)
        if self.connection_timeout_s is not None:
            ivl = max(100, int(self.connection_timeout_s * 1000 / 10))
            router.setsockopt(zmq.HEARTBEAT_IVL, ivl)
            router.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(self.connection_timeout_s * 1000))
        if self.keyring is not None:
            from meshsl.security.curve import configure_server, start_authenticator
            self._authenticator = await start_authenticator(self.context, self.keyring, self.on_auth_refused)
            configure_server(router, self.keyring)
            from meshsl.security.curve import HandshakeMonitor
            # ZAP refusals are counted by the authenticator; the monitor adds what never reaches ZAP
            # (plain-text clients, garbled handshakes).
            self._monitors.append(HandshakeMonitor(router, self._on_handshake_failure))
        try:
            router.bind(self.endpoint)
        except zmq.ZMQError as exc:
            router.close(0)
            raise TransportError(f"cannot bind {self.endpoint}: {exc.strerror}") from None
        self._router = router

    def _dealer(self, peer: str) -> zmq.asyncio.Socket:
        sock = self._dealers.get(peer)
        if sock is not None:
            return sock
        endpoint = self.address_book.get(peer)
        if endpoint is None:
            raise TransportError(f"no endpoint known for peer {peer!r}")
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, self.high_water_mark)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # queue only on live connections: a dead peer blocks, not buffers
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        sock.setsockopt(zmq.ROUTING_ID, self.node.encode())
        if self.keyring is not None:
            from meshsl.security.curve import configure_client
            configure_client(sock, self.keyring, peer)
            from meshsl.security.curve import HandshakeMonitor
            self._monitors.append(HandshakeMonitor(sock, lambda reason, peer=peer: self._on_refused_by(peer, reason)))
        sock.connect(endpoint)
        self._dealers[peer] = sock
        return sock

    async def send(self, peer: str, frames: Sequence) -> None:
        if self.sent_hook:
            self.sent_hook(self.node, peer, frames)
        sock = self._sync(self._dealer(peer))
        if _send_now(sock, frames):  # no future, no event-loop round trip when the socket can take it now
            await self._maybe_yield()
            return
        while True:  # backpressure: the peer's queue is at its high-water mark (or not connected yet)
            if not sock.get(zmq.EVENTS) & zmq.POLLOUT:
                await self._readable(sock)
            if _send_now(sock, frames):
                return

    def try_send(self, peer: str, frames: Sequence) -> bool:
        """Send now with NOBLOCK; False (nothing sent) when the peer's queue is full or not yet connected.

        A multipart message is atomic under the HWM: libzmq checks it on the first frame only, and rolls
        back a message whose later frame cannot go, so EAGAIN means that no frame left."""
        if not _send_now(self._sync(self._dealer(peer)), frames):
            return False
        if self.sent_hook:
            self.sent_hook(self.node, peer, frames)
        return True

    def try_send_threadsafe(self, peer: str, frames: Sequence) -> bool:
        """`try_send` for a thread other than the event loop's (a node's compute thread). It creates
        nothing: a peer without a socket yet gives False. The caller serialises every send to `peer`
        (no `send` or `try_send` in flight for it) and does not race `reroute`/`close`."""
        sock = self._dealers.get(peer)
        shadow = self._shadows.get(id(sock)) if sock is not None else None
        if shadow is None or shadow[0] is not sock:
            return False
        if not _send_now(shadow[1], frames):
            return False
        if self.sent_hook:
            self.sent_hook(self.node, peer, frames)
        return True

    async def _maybe_yield(self) -> None:
        """A suspension point at least every YIELD_INTERVAL_S: a busy stream never starves other tasks,
        without paying an event-loop iteration for every message."""
        now = _clock()
        if now - self._last_yield >= YIELD_INTERVAL_S:
            await asyncio.sleep(0)
            self._last_yield = _clock()

    async def _readable(self, sock: zmq.Socket) -> None:
        """Wait until the socket's event fd signals (zmq's fd is edge-triggered: callers re-check EVENTS).

        A one-shot reader on the blocking shadow, instead of the zmq.asyncio future machinery: half the
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

    def _stop_waiting(self, sock) -> None:
        """Before a socket closes: drop its fd reader and cancel a task waiting on it (as zmq.asyncio did)."""
        shadow = self._shadows.pop(id(sock), None)
        if shadow is None or shadow[0] is not sock:
            return
        try:
            fd = shadow[1].FD
        except zmq.ZMQError:
            return
        entry = self._waiters.pop(fd, None)
        if entry is not None:
            waiter, loop = entry
            loop.remove_reader(fd)
            waiter.cancel()

    def _sync(self, sock) -> zmq.Socket:
        """A blocking-API shadow of an asyncio socket (same underlying socket; used with NOBLOCK only)."""
        shadow = self._shadows.get(id(sock))
        if shadow is None or shadow[0] is not sock:
            shadow = self._shadows[id(sock)] = (sock, zmq.Socket.shadow(sock.underlying))
            shadow[1].copy_threshold = self.copy_threshold
        return shadow[1]

    async def recv(self) -> tuple[str, list]:
        sock = self._sync(self._router)
        frames = _recv_now(sock)
        if frames is not None:
            await self._maybe_yield()
            return self._identify(frames)
        while frames is None:
            if not sock.get(zmq.EVENTS) & zmq.POLLIN:
                await self._readable(sock)
            frames = _recv_now(sock)
        return self._identify(frames)

    def recv_nowait(self) -> Optional[tuple[str, list]]:
        """The next message if one is already here, else None (never waits, never yields)."""
        frames = _recv_now(self._sync(self._router))
        return None if frames is None else self._identify(frames)

    def _identify(self, frames: list) -> tuple[str, list]:
        routing_id = frames[0].bytes
        identity = self._identities.get(routing_id)
        if identity is None:
            identity = routing_id.decode("utf-8", "replace")
            if len(self._identities) < 4096:
                self._identities[routing_id] = identity
        if self.keyring is not None:
            # With CURVE the authenticator maps the peer's key to its node name: trust that, not the
            # routing id. A mismatch comes back as an identity no header can name, and the node
            # rejects it as "spoofed_sender".
            try:
                user = frames[1].get("User-Id") if len(frames) > 1 else None
            except zmq.ZMQError:
                user = None
            if user != identity:
                log.warning("%s: peer authenticated as %r claims routing id %r", self.node, user, identity[:64])
                identity = f"{SPOOFED_PREFIX}{user}:{identity[:64]}"
        return identity, frames[1:]

    def _on_handshake_failure(self, reason: str) -> None:
        if reason != "auth" and self.on_auth_refused is not None:
            self.on_auth_refused(reason)

    def _on_refused_by(self, peer: str, reason: str) -> None:
        if reason == "auth":
            self.refused_by[peer] = self.refused_by.get(peer, 0) + 1
            log.error("%s: node %r refused this node's CURVE key (is %s.key_secret the key the topology "
                      "declares for %s?)", self.node, peer, self.node, self.node)

    def reroute(self, peer: str, endpoint: str) -> None:
        super().reroute(peer, endpoint)
        sock = self._dealers.pop(peer, None)
        if sock is not None:
            if self.keyring is not None:  # stop its monitor before the socket goes
                for monitor in [m for m in self._monitors if m._sock is sock]:
                    self._monitors.remove(monitor)
                    monitor.close_now()
            self._stop_waiting(sock)
            sock.close(0)

    async def close(self) -> None:
        for monitor in self._monitors:
            await monitor.stop()
        self._monitors.clear()
        for sock in self._dealers.values():
            self._stop_waiting(sock)
            sock.close(CLOSE_LINGER_MS)  # the last words (an abort, a final ack) still go out
        self._dealers.clear()
        if self._router is not None:
            self._stop_waiting(self._router)
            self._router.close(0)
            self._router = None
        if self._authenticator is not None:
            self._authenticator.stop()
        if self._owns_context:
            self.context.term()
