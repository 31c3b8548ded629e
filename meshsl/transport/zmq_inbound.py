"""Who sent a message on the ROUTER: routing ids to node names, CURVE identities checked, and the
routes dial-out peers announce (learned only from an authenticated message when CURVE is on)."""
from __future__ import annotations

import logging
from typing import Optional

import zmq

from meshsl.transport.base import SPOOFED_PREFIX

log = logging.getLogger("meshsl.transport")

MAX_IDENTITIES = 4096  # routing ids remembered decoded; past it each is decoded again


class InboundRoutes:
    """`routes`: dial-out peer -> the routing id it announced (what an accepting node replies through)."""

    def __init__(self, node: str, dial_out: bool, keyring) -> None:
        self.node = node
        self.dial_out = dial_out
        self.keyring = keyring
        self.routes: dict[str, bytes] = {}
        self._identities: dict[bytes, str] = {}  # routing id -> its decoded name (bounded)

    def is_announcement(self, frames: list, address_book: dict[str, Optional[str]]) -> bool:
        """One empty frame from a dial-out route (`name#nonce`): it only tells us the way back. The same
        from any other connection is an ordinary (malformed) message, rejected and counted by the node."""
        if len(frames) != 2 or len(frames[1]) != 0:
            return False
        if self.dial_out:
            return True
        name, hashed, _ = frames[0].bytes.partition(b"#")
        peer = name.decode("utf-8", "replace")
        return bool(hashed) and peer in address_book and not address_book[peer]

    def identify(self, frames: list, address_book: dict[str, Optional[str]]) -> tuple[str, list]:
        """(sender, the message's frames without the routing id); learns a dial-out peer's route."""
        routing_id = frames[0].bytes
        identity = self._identities.get(routing_id)
        if identity is None:
            # `name#...`: a dial-out node's route (or, on a dial-out node, its alias of a connection)
            identity = routing_id.split(b"#", 1)[0].decode("utf-8", "replace")
            if len(self._identities) < MAX_IDENTITIES:
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
        if b"#" in routing_id and self.routes.get(identity) != routing_id \
                and identity in address_book and not address_book[identity]:
            self.routes[identity] = routing_id  # (authenticated above when CURVE is on)
            log.info("%s: dial-out node %s reachable", self.node, identity)
        return identity, frames[1:]
