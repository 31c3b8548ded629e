"""A dial-out node's connections: one connecting ROUTER, an alias per connection (`peer#n`), and the
empty announcement that tells each peer the route back, sent again after every handshake."""
from __future__ import annotations

import asyncio
import logging
from typing import Callable, Optional

import zmq

from meshsl.errors import TransportError
from meshsl.security.curve import next_monitor_event
from meshsl.transport.zmq_frames import send_now

log = logging.getLogger("meshsl.transport")

_MONITORED = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
              | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


class DialOutLinks:
    """Connections a dial-out node opened, by peer. `on_connected()`: after each handshake (the
    transport wakes its receiver); `on_refused_by(peer, reason)`: a server refused our CURVE key."""

    def __init__(self, node: str, keyring, on_connected: Callable[[], None],
                 on_refused_by: Callable[[str, str], None]) -> None:
        self.node = node
        self.keyring = keyring
        self._router: Optional[zmq.Socket] = None
        self.aliases: dict[str, bytes] = {}  # peer -> routing alias of our connection to it
        self.alias_endpoints: dict[str, str] = {}  # endpoint connected -> peer
        self._connections = 0
        self._monitor: Optional[asyncio.Task] = None
        self._on_connected = on_connected
        self._on_refused_by = on_refused_by

    def start(self, router: zmq.Socket, address_book: dict[str, Optional[str]]) -> None:
        """Watch `router`'s handshakes and dial every peer with an endpoint."""
        self._router = router
        self._monitor = asyncio.ensure_future(self._watch(router.get_monitor_socket(_MONITORED)))
        for peer, endpoint in address_book.items():
            if endpoint and peer != self.node:
                self.dial(peer, endpoint)

    @property
    def router(self) -> zmq.Socket:
        if self._router is None:
            raise TransportError(f"node {self.node!r}: dial-out links are used before they started")
        return self._router

    def dial(self, peer: str, endpoint: str) -> None:
        """Connect to `peer` under a new alias (aliases are never reused, so a moved peer's old
        connection can linger while the new one starts) and queue the announcement."""
        self._connections += 1
        alias = f"{peer}#{self._connections}".encode()
        router = self.router
        if self.keyring is not None:
            router.curve_serverkey = self.keyring.public_key_of(peer)  # copied into this connection
        router.setsockopt(zmq.CONNECT_ROUTING_ID, alias)
        try:
            router.connect(endpoint)
        except zmq.ZMQError as exc:
            raise TransportError(f"cannot connect to {peer} at {endpoint}: {exc.strerror}") from None
        self.aliases[peer] = alias
        self.alias_endpoints[endpoint] = peer
        self.announce(peer)

    def announce(self, peer: str) -> None:
        """An empty message tells `peer` the route back to us (queued until the connection is up)."""
        alias = self.aliases.get(peer)
        if alias is None:
            return
        try:
            send_now(self.router, (alias, b""))
        except zmq.ZMQError:
            pass  # no room or no pipe: the next handshake announces again, any message carries the route

    def forget(self, peer: str) -> None:
        """Drop the connection to `peer` (it moved; `dial` opens the new one)."""
        old = self.aliases.pop(peer, None)
        for address, name in list(self.alias_endpoints.items()):
            if name == peer and old is not None:
                del self.alias_endpoints[address]
                try:
                    self.router.disconnect(address)
                except zmq.ZMQError:
                    pass

    async def _watch(self, monitor: zmq.Socket) -> None:
        """Announce again after every (re)connection; count servers that refuse our CURVE key."""
        while True:
            try:
                event = await next_monitor_event(monitor)
            except (zmq.ZMQError, asyncio.CancelledError):
                monitor.close(0)
                return
            endpoint = event["endpoint"].decode("utf-8", "replace")
            peer = self.peer_at(endpoint)
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                log.debug("%s: connected to %s (%s)", self.node, peer or "a peer", endpoint)
                for name in ([peer] if peer else list(self.aliases)):
                    self.announce(name)
                self._on_connected()
            elif event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self._on_refused_by(peer or endpoint, "auth")
            else:
                log.warning("%s: handshake with %s failed (%s)", self.node, endpoint, event["event"])

    def peer_at(self, endpoint: str) -> Optional[str]:
        """The peer we dialled at `endpoint` (libzmq may report a host name resolved: match the port)."""
        peer = self.alias_endpoints.get(endpoint)
        if peer is None:
            port = endpoint.rsplit(":", 1)[-1]
            matches = {p for address, p in self.alias_endpoints.items() if address.rsplit(":", 1)[-1] == port}
            peer = matches.pop() if len(matches) == 1 else None
        return peer

    async def stop(self) -> None:
        """Stop watching handshakes (before the router closes)."""
        if self._monitor is None:
            return
        self._monitor.cancel()
        try:
            await self._monitor
        except asyncio.CancelledError:
            pass
        try:
            self.router.disable_monitor()
        except zmq.ZMQError:
            pass
        self._monitor = None
