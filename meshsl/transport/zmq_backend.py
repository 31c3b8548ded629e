"""ZeroMQ transport: one ROUTER bound on the node's endpoint, one DEALER per peer (routing id = node name).

Dial-out nodes (`inbound: false`, no endpoint) bind nothing. Such a node has one ROUTER that *connects*
to every peer accepting inbound connections (one alias per connection, `peer#n`) and carries both
directions over those connections. Its ROUTER presents the routing id `node#nonce`; a peer learns that
route from the node's first message (an empty announcement sent on every handshake) and answers through
its own bound ROUTER. With CURVE a route is learned only from a message whose authenticated key is that
node's, so another key holder cannot take the route over; the dial-out node pins each server's key.

The parts: socket options (`zmq_sockets`), non-blocking frames and fd waits (`zmq_frames`), a dial-out
node's connections (`zmq_dial_out`), the senders of received messages (`zmq_inbound`).
"""
from __future__ import annotations

import asyncio
import collections
import errno
import functools
import logging
import secrets
from typing import Callable, Optional, Sequence

import zmq

from meshsl.errors import TransportError
from meshsl.security.curve import (HandshakeMonitor, MeshAuthenticator, configure_client, configure_server,
                                   start_authenticator)
from meshsl.transport.base import DEFAULT_BACKEND, Transport, register_backend
from meshsl.transport.zmq_dial_out import DialOutLinks
from meshsl.transport.zmq_frames import YIELD_INTERVAL_S, SocketWaits, recv_now, send_now  # noqa: F401
from meshsl.transport.zmq_inbound import InboundRoutes
from meshsl.transport.zmq_sockets import FRAME_SLACK_BYTES, RECONNECT_IVL_MAX_MS, SocketOptions  # noqa: F401

log = logging.getLogger("meshsl.transport")

CLOSE_LINGER_MS = 500


class ZmqTransport(Transport):
    threadsafe_send = True  # try_send_threadsafe below

    def __init__(self, node: str, endpoint: Optional[str], address_book: dict[str, Optional[str]],
                 high_water_mark: int = 128,
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
        self._authenticator: Optional[MeshAuthenticator] = None
        self._monitors: list[HandshakeMonitor] = []
        # on_dropped (base): a frame above MAXMSGSIZE makes libzmq drop the connection unread
        self.copy_threshold = copy_threshold
        self.max_message_bytes = max_message_bytes
        self.connection_timeout_s = connection_timeout_s
        self._waits = SocketWaits()
        # Dial-out: this node binds nothing (no endpoint) and reaches every peer through one connecting ROUTER.
        self.dial_out = not endpoint
        self._links = DialOutLinks(node, keyring, lambda: self._waits.kick(self._router),
                                   self._on_refused_by) if self.dial_out else None
        self._inbound = InboundRoutes(node, self.dial_out, keyring)
        self._routes = self._inbound.routes  # accepting: dial-out peer -> routing id it announced (authenticated)
        self._loopback: collections.deque = collections.deque()  # dial-out: messages to itself (bounded by HWM)
        self._nonce = secrets.token_hex(6)  # this process's part of its outgoing routing ids

    @property
    def router(self) -> zmq.Socket:
        """The ROUTER socket (bound, or dialling out), once started."""
        if self._router is None:
            raise TransportError(f"node {self.node!r}: the transport is used before it started")
        return self._router

    @property
    def _dial_out_links(self) -> DialOutLinks:
        if self._links is None:
            raise TransportError(f"node {self.node!r} binds an endpoint: it has no dial-out links")
        return self._links

    def _socket_options(self) -> SocketOptions:
        return SocketOptions(self.context, self.copy_threshold, self.high_water_mark, self.max_message_bytes,
                             self.connection_timeout_s)

    async def start(self) -> None:
        if self.dial_out:
            router = self._socket_options().dial_out_router(self.node)
            if self.keyring is not None:
                router.curve_publickey = self.keyring.public_key
                router.curve_secretkey = self.keyring.secret_key
            self._router = router
            self._dial_out_links.start(router, self.address_book)
            return
        router = self._socket_options().bound_router()
        if self.keyring is not None:
            self._authenticator = await start_authenticator(self.context, self.keyring, self.on_auth_refused)
            configure_server(router, self.keyring)
            # ZAP refusals are counted by the authenticator; the monitor adds what never reaches ZAP
            # (plain-text clients, garbled handshakes), and connections dropped after a handshake.
            self._monitors.append(HandshakeMonitor(router, self._on_handshake_failure, on_dropped=self.on_dropped))
        elif self.on_dropped is not None:
            self._monitors.append(HandshakeMonitor(router, None, on_dropped=self.on_dropped))
        try:
            router.bind(self.bind or self.endpoint or "")
        except zmq.ZMQError as exc:
            router.close(0)
            raise TransportError(f"cannot bind {self.bind or self.endpoint}: {exc.strerror}") from None
        self._router = router

    # -- sending -----------------------------------------------------------------------------------
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
            self._waits.wake(self.router)
            return True
        route = self._dial_out_links.aliases.get(peer) if self.dial_out else self._routes.get(peer)
        if route is None:
            if self.dial_out:
                raise TransportError(f"node {self.node!r} dials out and knows no endpoint of {peer!r}: two "
                                     f"dial-out nodes cannot talk directly")
            return False  # the dial-out peer has not announced itself yet
        try:
            sent = send_now(self.router, (route, *frames))
        except zmq.ZMQError as exc:
            if exc.errno != errno.EHOSTUNREACH:
                raise TransportError(f"cannot send to {peer}: {exc.strerror}") from None
            sent = False  # its connection is gone (for now)
        self._waits.kick(self._router)
        return sent

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
        sock = self._socket_options().dealer(self.node, self._nonce)
        if self.keyring is not None:
            configure_client(sock, self.keyring, peer)
            self._monitors.append(HandshakeMonitor(sock, functools.partial(self._on_refused_by, peer)))
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
        if send_now(sock, frames):  # no future, no event-loop round trip when the socket can take it now
            await self._waits.maybe_yield()
            return
        while True:  # backpressure: the peer's queue is at its high-water mark (or not connected yet)
            if not int(sock.get(zmq.EVENTS)) & zmq.POLLOUT:
                await self._waits.readable(sock)
            if send_now(sock, frames):
                return

    def try_send(self, peer: str, frames: Sequence) -> bool:
        """Send now with NOBLOCK; False (nothing sent) when the peer's queue is full or not yet connected.

        A multipart message is atomic under the HWM: libzmq checks it on the first frame only, and rolls
        back a message whose later frame cannot go, so EAGAIN means that no frame left."""
        if self._routed(peer):
            if not self._send_routed_now(peer, frames):
                return False
        elif not send_now(self._dealer(peer), frames):
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
        if sock is None or not send_now(sock, frames):
            return False
        if self.sent_hook:
            self.sent_hook(self.node, peer, frames)
        return True

    # -- receiving ---------------------------------------------------------------------------------
    async def recv(self) -> tuple[str, list]:
        while True:
            if self._loopback:
                await self._waits.maybe_yield()
                return self.node, self._loopback.popleft()
            sock = self.router
            frames = recv_now(sock)
            if frames is not None:
                await self._waits.maybe_yield()
            while frames is None and not self._loopback:
                if not int(sock.get(zmq.EVENTS)) & zmq.POLLIN:
                    await self._waits.readable(sock)
                frames = recv_now(sock)
            if frames is None:
                continue  # a message to itself woke us
            if self._inbound.is_announcement(frames, self.address_book):  # a dial-out peer's: route only
                self._inbound.identify(frames, self.address_book)
                continue
            return self._inbound.identify(frames, self.address_book)

    def recv_nowait(self) -> Optional[tuple[str, list]]:
        """The next message if one is already here, else None (never waits, never yields)."""
        while True:
            if self._loopback:
                return self.node, self._loopback.popleft()
            frames = recv_now(self.router)
            if frames is None:
                return None
            if self._inbound.is_announcement(frames, self.address_book):
                self._inbound.identify(frames, self.address_book)
                continue
            return self._inbound.identify(frames, self.address_book)

    # -- refusals, moves, closing ------------------------------------------------------------------
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
        super().reroute(peer, endpoint)
        if self.dial_out:
            self._dial_out_links.forget(peer)
            if self._router is not None:
                self._dial_out_links.dial(peer, endpoint)
            return
        sock = self._dealers.pop(peer, None)
        if sock is not None:
            if self.keyring is not None:  # stop its monitor before the socket goes
                for monitor in [m for m in self._monitors if m._sock is sock]:
                    self._monitors.remove(monitor)
                    monitor.close_now()
            self._waits.stop_waiting(sock)
            sock.close(0)

    async def close(self) -> None:
        if self._links is not None:
            await self._links.stop()
        for monitor in self._monitors:
            await monitor.stop()
        self._monitors.clear()
        for sock in self._dealers.values():
            self._waits.stop_waiting(sock)
            sock.close(CLOSE_LINGER_MS)  # the last words (an abort, a final ack) still go out
        self._dealers.clear()
        if self._router is not None:
            self._waits.stop_waiting(self._router)
            self._router.close(0)
            self._router = None
        if self._authenticator is not None:
            self._authenticator.stop()
        if self._owns_context:
            self.context.term()


register_backend("tcp", ZmqTransport)
register_backend("ipc", ZmqTransport)
register_backend(DEFAULT_BACKEND, ZmqTransport)  # dial-out nodes (no endpoint) and ZeroMQ's own inproc
