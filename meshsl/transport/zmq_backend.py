"""ZeroMQ transport: one ROUTER bound on the node's endpoint, one DEALER per peer (routing id = node name).

Dial-out nodes (`inbound: false`, no endpoint) bind nothing. Such a node has one ROUTER that *connects*
to every peer accepting inbound connections (one alias per connection, `peer#n`) and carries both
directions over those connections. Its ROUTER presents the routing id `node#nonce`; a peer learns that
route from the node's first message (an empty announcement sent on every handshake) and answers through
its own bound ROUTER. With CURVE a route is learned only from a message whose authenticated key is that
node's, so another key holder cannot take the route over; the dial-out node pins each server's key.
"""
from __future__ import annotations

import asyncio
import collections
import errno
import logging
import secrets
import time
from typing import Callable, Optional, Sequence

import zmq

from meshsl.errors import TransportError
from meshsl.security.curve import (HandshakeMonitor, configure_client, configure_server, next_monitor_event,
                                  start_authenticator)
from meshsl.transport.base import DEFAULT_BACKEND, SPOOFED_PREFIX, Transport, register_backend

log = logging.getLogger("meshsl.transport")
_clock = time.perf_counter

# A task that sends or receives without ever waiting still yields to the event loop this often.
YIELD_INTERVAL_S = 0.0005
_NOBLOCK = int(zmq.NOBLOCK)
FRAME_SLACK_BYTES = 64 * 1024
CLOSE_LINGER_MS = 500
# A restarted peer is reached again within this after it binds (recovery waits on it; 2 s was the old cap).
RECONNECT_IVL_MAX_MS = 500
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
    threadsafe_send = True  # try_send_threadsafe below

    def __init__(self, node: str, endpoint: str, address_book: dict[str, str], high_water_mark: int = 128,
                 keyring=None, on_auth_refused: Optional[Callable[[str], None]] = None,
                 context: Optional[zmq.Context] = None, copy_threshold: int = zmq.COPY_THRESHOLD,
                 max_message_bytes: Optional[int] = None, connection_timeout_s: Optional[float] = None,
                 bind: Optional[str] = None) -> None:
        """`max_message_bytes`: the socket drops (disconnects) a peer whose frame is larger, before it is
        buffered; `connection_timeout_s`: ZMTP heartbeats drop a connection silent that long, so a node
        restarted elsewhere can claim its name after a half-open connection (names are never taken over)."""
        super().__init__(node, endpoint, address_book)
        self.bind = bind  # where the ROUTER binds when that differs from the endpoint peers use (containers)
        self.high_water_mark = high_water_mark
        self.keyring = keyring  # meshsl.security.keys.KeyRing when CURVE is on
        self.on_auth_refused = on_auth_refused
        # Plain (blocking-API) sockets used with NOBLOCK only, waited on through their fds on the event loop:
        # half the CPU of zmq.asyncio's futures per message. A caller's context (even an asyncio one) is
        # shadowed as a plain one: same libzmq context, plain sockets.
        self.context = zmq.Context.shadow(context.underlying) if context is not None else zmq.Context()
        self._owns_context = context is None
        self._router: Optional[zmq.Socket] = None
        self._dealers: dict[str, zmq.Socket] = {}
        self._authenticator = None
        self._monitors: list = []
        self.refused_by: dict[str, int] = {}  # peer -> CURVE handshakes it refused (our key is not theirs)
        self.sent_hook = None
        # Called when the bound socket drops an established connection: a frame above MAXMSGSIZE is
        # refused unread that way (libzmq cannot tell it from a peer hanging up); set before start().
        self.on_dropped: Optional[Callable[[], None]] = None
        self.copy_threshold = copy_threshold
        self.max_message_bytes = max_message_bytes
        self.connection_timeout_s = connection_timeout_s
        self._identities: dict[bytes, str] = {}  # routing id -> its decoded name (bounded)
        self._last_yield = _clock()
        self._waiters: dict[int, tuple] = {}  # fd -> (future, loop) of the task waiting on that socket
        # Dial-out: this node binds nothing (no endpoint) and reaches every peer through one connecting ROUTER.
        self.dial_out = not endpoint
        self._aliases: dict[str, bytes] = {}  # dial-out: peer -> routing alias of our connection to it
        self._alias_endpoints: dict[str, str] = {}  # dial-out: endpoint connected -> peer
        self._connections = 0
        self._routes: dict[str, bytes] = {}  # accepting: dial-out peer -> routing id it announced (authenticated)
        self._dial_monitor: Optional[asyncio.Task] = None
        self._loopback: collections.deque = collections.deque()  # dial-out: messages to itself (bounded by HWM)
        self._nonce = secrets.token_hex(6)  # this process's part of its outgoing routing ids

    async def start(self) -> None:
        if self.dial_out:
            self._start_dial_out()
            return
        router = self._socket(zmq.ROUTER)
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
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a reply to a dial-out peer not connected fails, not vanishes
        router.setsockopt(zmq.SNDHWM, self.high_water_mark)
        if self.keyring is not None:
            self._authenticator = await start_authenticator(self.context, self.keyring, self.on_auth_refused)
            configure_server(router, self.keyring)
            # ZAP refusals are counted by the authenticator; the monitor adds what never reaches ZAP
            # (plain-text clients, garbled handshakes), and connections dropped after a handshake.
            self._monitors.append(HandshakeMonitor(router, self._on_handshake_failure, on_dropped=self.on_dropped))
        elif self.on_dropped is not None:
            self._monitors.append(HandshakeMonitor(router, None, on_dropped=self.on_dropped))
        try:
            router.bind(self.bind or self.endpoint)
        except zmq.ZMQError as exc:
            router.close(0)
            raise TransportError(f"cannot bind {self.bind or self.endpoint}: {exc.strerror}") from None
        self._router = router

    # -- dial-out --------------------------------------------------------------------------------
    def _start_dial_out(self) -> None:
        router = self._socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.RCVHWM, self.high_water_mark)
        router.setsockopt(zmq.SNDHWM, self.high_water_mark)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if self.max_message_bytes is not None:  # as on the bound socket: refused before it is buffered
            router.setsockopt(zmq.MAXMSGSIZE, int(self.max_message_bytes) + FRAME_SLACK_BYTES)
        router.setsockopt(zmq.RECONNECT_IVL, 100)
        router.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
        # A fresh nonce per socket: a restarted node is a new route, never a takeover of an old one.
        router.setsockopt(zmq.ROUTING_ID, f"{self.node}#{secrets.token_hex(6)}".encode())
        if self.keyring is not None:
            router.curve_publickey = self.keyring.public_key
            router.curve_secretkey = self.keyring.secret_key
        self._router = router
        monitor = router.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                                            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                                            | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        self._dial_monitor = asyncio.ensure_future(self._watch_dial_out(monitor))
        for peer, endpoint in self.address_book.items():
            if endpoint and peer != self.node:
                self._dial(peer, endpoint)

    def _dial(self, peer: str, endpoint: str) -> None:
        """Connect to `peer` under a new alias (aliases are never reused, so a moved peer's old
        connection can linger while the new one starts) and queue the announcement."""
        self._connections += 1
        alias = f"{peer}#{self._connections}".encode()
        router = self._router
        if self.keyring is not None:
            router.curve_serverkey = self.keyring.public_key_of(peer)  # copied into this connection
        router.setsockopt(zmq.CONNECT_ROUTING_ID, alias)
        try:
            router.connect(endpoint)
        except zmq.ZMQError as exc:
            raise TransportError(f"cannot connect to {peer} at {endpoint}: {exc.strerror}") from None
        self._aliases[peer] = alias
        self._alias_endpoints[endpoint] = peer
        self._announce(peer)

    def _announce(self, peer: str) -> None:
        """An empty message tells `peer` the route back to us (queued until the connection is up)."""
        alias = self._aliases.get(peer)
        if alias is None:
            return
        try:
            _send_now(self._router, (alias, b""))
        except zmq.ZMQError:
            pass  # no room or no pipe: the next handshake announces again, any message carries the route

    async def _watch_dial_out(self, monitor: zmq.Socket) -> None:
        """Announce again after every (re)connection; count servers that refuse our CURVE key."""
        while True:
            try:
                event = await next_monitor_event(monitor)
            except (zmq.ZMQError, asyncio.CancelledError):
                monitor.close(0)
                return
            endpoint = event["endpoint"].decode("utf-8", "replace")
            peer = self._peer_at(endpoint)
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                log.debug("%s: connected to %s (%s)", self.node, peer or "a peer", endpoint)
                for name in ([peer] if peer else list(self._aliases)):
                    self._announce(name)
                self._kick(self._router)
            elif event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self._on_refused_by(peer or endpoint, "auth")
            else:
                log.warning("%s: handshake with %s failed (%s)", self.node, endpoint, event["event"])

    def _peer_at(self, endpoint: str) -> Optional[str]:
        """The peer we dialled at `endpoint` (libzmq may report a host name resolved: match the port)."""
        peer = self._alias_endpoints.get(endpoint)
        if peer is None:
            port = endpoint.rsplit(":", 1)[-1]
            matches = {p for address, p in self._alias_endpoints.items() if address.rsplit(":", 1)[-1] == port}
            peer = matches.pop() if len(matches) == 1 else None
        return peer

    def _routed(self, peer: str) -> bool:
        """Does traffic to `peer` go through the ROUTER (we dial out, or `peer` does)?"""
        if self.dial_out:
            return True
        if peer not in self.address_book:
            raise TransportError(f"no endpoint known for peer {peer!r}")
        return not self.address_book[peer]

    def _send_routed_now(self, peer: str, frames: Sequence) -> bool:
        if peer == self.node:  # a dial-out coordinator's control messages to its own node
            if len(self._loopback) >= self.high_water_mark:
                return False
            self._loopback.append([bytes(f) for f in frames])
            entry = self._waiters.get(self._router.FD)
            if entry is not None:
                _wake(entry[0])
            return True
        route = self._aliases.get(peer) if self.dial_out else self._routes.get(peer)
        if route is None:
            if self.dial_out:
                raise TransportError(f"node {self.node!r} dials out and knows no endpoint of {peer!r}: two "
                                     f"dial-out nodes cannot talk directly")
            return False  # the dial-out peer has not announced itself yet
        sock = self._router
        try:
            sent = _send_now(sock, (route, *frames))
        except zmq.ZMQError as exc:
            if exc.errno != errno.EHOSTUNREACH:
                raise TransportError(f"cannot send to {peer}: {exc.strerror}") from None
            sent = False  # its connection is gone (for now)
        self._kick(self._router)
        return sent

    def _kick(self, sock) -> None:
        """Sending on the socket we also receive on may consume the edge-triggered fd's signal: wake the
        receiver when a message is waiting."""
        if sock is None:
            return
        entry = self._waiters.get(sock.FD)
        if entry is not None and sock.get(zmq.EVENTS) & zmq.POLLIN:
            _wake(entry[0])

    async def _send_routed(self, peer: str, frames: Sequence) -> None:
        """Wait (polling, bounded by the caller's timeout) for room or for the peer's route."""
        delay = 0.0005
        while not self._send_routed_now(peer, frames):
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)

    def _dealer(self, peer: str) -> zmq.Socket:
        sock = self._dealers.get(peer)
        if sock is not None:
            return sock
        endpoint = self.address_book.get(peer)
        if endpoint is None:
            raise TransportError(f"no endpoint known for peer {peer!r}")
        sock = self._socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, self.high_water_mark)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # queue only on live connections: a dead peer blocks, not buffers
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
        # `name#nonce`, new in every process: a restarted node's connection never collides with the one
        # its dead predecessor left behind (libzmq leaves a duplicate routing id unread for good).
        sock.setsockopt(zmq.ROUTING_ID, f"{self.node}#{self._nonce}".encode())
        if self.keyring is not None:
            configure_client(sock, self.keyring, peer)
            self._monitors.append(HandshakeMonitor(sock, lambda reason, peer=peer: self._on_refused_by(peer, reason)))
        sock.connect(endpoint)
        self._dealers[peer] = sock
        return sock

    async def send(self, peer: str, frames: Sequence) -> None:
        if self.sent_hook:
            self.sent_hook(self.node, peer, frames)
        if self._routed(peer):
            await self._send_routed(peer, frames)
            return
        sock = self._dealer(peer)
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
        if self._routed(peer):
            if not self._send_routed_now(peer, frames):
                return False
        elif not _send_now(self._dealer(peer), frames):
            return False
        if self.sent_hook:
            self.sent_hook(self.node, peer, frames)
        return True

    def try_send_threadsafe(self, peer: str, frames: Sequence) -> bool:
        """`try_send` for a thread other than the event loop's (a node's compute thread). It creates
        nothing: a peer without a socket yet gives False. The caller serialises every send to `peer`
        (no `send` or `try_send` in flight for it) and does not race `reroute`/`close`."""
        if self.dial_out or not self.address_book.get(peer):
            return False  # the ROUTER is the event loop's (it also receives there)
        sock = self._dealers.get(peer)
        if sock is None or not _send_now(sock, frames):
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

    def _stop_waiting(self, sock) -> None:
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

    def _socket(self, kind: int) -> zmq.Socket:
        sock = self.context.socket(kind)
        sock.copy_threshold = self.copy_threshold
        return sock

    async def recv(self) -> tuple[str, list]:
        while True:
            if self._loopback:
                await self._maybe_yield()
                return self.node, self._loopback.popleft()
            sock = self._router
            frames = _recv_now(sock)
            if frames is not None:
                await self._maybe_yield()
            while frames is None and not self._loopback:
                if not sock.get(zmq.EVENTS) & zmq.POLLIN:
                    await self._readable(sock)
                frames = _recv_now(sock)
            if frames is None:
                continue  # a message to itself woke us
            if self._is_announcement(frames):  # a dial-out peer's announcement: route only
                self._identify(frames)
                continue
            return self._identify(frames)

    def recv_nowait(self) -> Optional[tuple[str, list]]:
        """The next message if one is already here, else None (never waits, never yields)."""
        while True:
            if self._loopback:
                return self.node, self._loopback.popleft()
            frames = _recv_now(self._router)
            if frames is None:
                return None
            if self._is_announcement(frames):
                self._identify(frames)
                continue
            return self._identify(frames)

    def _is_announcement(self, frames: list) -> bool:
        """One empty frame from a dial-out route (`name#nonce`): it only tells us the way back. The same
        from any other connection is an ordinary (malformed) message, rejected and counted by the node."""
        if len(frames) != 2 or len(frames[1]) != 0:
            return False
        if self.dial_out:
            return True
        name, hashed, _ = frames[0].bytes.partition(b"#")
        peer = name.decode("utf-8", "replace")
        return bool(hashed) and peer in self.address_book and not self.address_book[peer]

    def _identify(self, frames: list) -> tuple[str, list]:
        routing_id = frames[0].bytes
        identity = self._identities.get(routing_id)
        if identity is None:
            # `name#...`: a dial-out node's route (or, on a dial-out node, its alias of a connection)
            identity = routing_id.split(b"#", 1)[0].decode("utf-8", "replace")
            if len(self._identities) < 4096:
                self._identities[routing_id] = identity
        if self.dial_out:
            # Every connection is one we opened to a pinned server key (CURVE): the alias names the peer.
            return identity, frames[1:]
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
                return f"{SPOOFED_PREFIX}{user}:{identity[:64]}", frames[1:]
        if b"#" in routing_id and self._routes.get(identity) != routing_id \
                and identity in self.address_book and not self.address_book[identity]:
            self._routes[identity] = routing_id  # (authenticated above when CURVE is on)
            log.info("%s: dial-out node %s reachable", self.node, identity)
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
        if not endpoint or not self.address_book.get(peer):
            return  # a dial-out peer moves by connecting again: its new route is learned, not told
        if self.dial_out:
            super().reroute(peer, endpoint)
            old = self._aliases.pop(peer, None)
            for address, name in list(self._alias_endpoints.items()):
                if name == peer and old is not None:
                    del self._alias_endpoints[address]
                    try:
                        self._router.disconnect(address)
                    except zmq.ZMQError:
                        pass
            if self._router is not None:
                self._dial(peer, endpoint)
            return
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
        if self._dial_monitor is not None:
            self._dial_monitor.cancel()
            try:
                await self._dial_monitor
            except asyncio.CancelledError:
                pass
            try:
                self._router.disable_monitor()
            except zmq.ZMQError:
                pass
            self._dial_monitor = None
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


register_backend("tcp", ZmqTransport)
register_backend("ipc", ZmqTransport)
register_backend(DEFAULT_BACKEND, ZmqTransport)  # dial-out nodes (no endpoint) and ZeroMQ's own inproc
