"""How the ZeroMQ transport's sockets are made: the bound ROUTER, a dial-out node's connecting ROUTER,
and the DEALER to each peer (options only; CURVE, binding and connecting are the transport's)."""
from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Optional

import zmq

FRAME_SLACK_BYTES = 64 * 1024
# A restarted peer is reached again within this after it binds (recovery waits on it; 2 s was the old cap).
RECONNECT_IVL_MAX_MS = 500


@dataclass(frozen=True)
class SocketOptions:
    """The transport's settings at start (they may be changed between construction and start)."""
    context: zmq.Context
    copy_threshold: int
    high_water_mark: int
    max_message_bytes: Optional[int] = None
    connection_timeout_s: Optional[float] = None

    def socket(self, kind: int) -> zmq.Socket:
        sock = self.context.socket(kind)
        sock.copy_threshold = self.copy_threshold
        return sock

    def bound_router(self) -> zmq.Socket:
        """The ROUTER a node binds on its endpoint: every peer's messages arrive here."""
        router = self.socket(zmq.ROUTER)
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
        return router

    def dial_out_router(self, node: str) -> zmq.Socket:
        """A dial-out node's one ROUTER, connecting to every peer that accepts inbound connections."""
        router = self.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.RCVHWM, self.high_water_mark)
        router.setsockopt(zmq.SNDHWM, self.high_water_mark)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if self.max_message_bytes is not None:  # as on the bound socket: refused before it is buffered
            router.setsockopt(zmq.MAXMSGSIZE, int(self.max_message_bytes) + FRAME_SLACK_BYTES)
        router.setsockopt(zmq.RECONNECT_IVL, 100)
        router.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
        # A fresh nonce per socket: a restarted node is a new route, never a takeover of an old one.
        router.setsockopt(zmq.ROUTING_ID, f"{node}#{secrets.token_hex(6)}".encode())
        return router

    def dealer(self, node: str, nonce: str) -> zmq.Socket:
        """The DEALER this node sends to one peer's bound ROUTER through."""
        sock = self.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, self.high_water_mark)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # queue only on live connections: a dead peer blocks, not buffers
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
        # `name#nonce`, new in every process: a restarted node's connection never collides with the one
        # its dead predecessor left behind (libzmq leaves a duplicate routing id unread for good).
        sock.setsockopt(zmq.ROUTING_ID, f"{node}#{nonce}".encode())
        return sock
