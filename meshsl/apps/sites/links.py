"""The CURVE-secured ZeroMQ sockets of sites, submitters and the broker: identities map to key rings."""
from __future__ import annotations

import zmq
import zmq.asyncio

from meshsl.errors import ConfigError
from meshsl.security.curve import configure_client, configure_server, start_authenticator
from meshsl.security.keys import KeyRing
from meshsl.apps.sites.identity import Identity, PublicIdentity


def keyring(own: Identity, peers: list[PublicIdentity]) -> KeyRing:
    return KeyRing(own_node=own.name, public_key=own.public.curve_public.encode(), secret_key=own.curve_secret,
                   peers={p.name: p.curve_public.encode() for p in peers if p.name != own.name})


async def broker_socket(ctx: zmq.asyncio.Context, own: Identity, allowed: list[PublicIdentity], bind: str):
    """A ROUTER that accepts exactly the allowed identities' CURVE keys; returns (socket, authenticator)."""
    ring = keyring(own, allowed)
    auth = await start_authenticator(ctx, ring)
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    sock.router_mandatory = False
    configure_server(sock, ring)
    try:
        sock.bind(bind)
    except zmq.ZMQError as exc:
        sock.close(0)
        auth.stop()
        raise ConfigError(f"the broker cannot bind {bind}: {exc}", "project broker.bind") from None
    return sock, auth


def dial(ctx: zmq.Context, own: Identity, broker: PublicIdentity, endpoint: str) -> zmq.Socket:
    """A DEALER to the broker (it dials out: works from behind a firewall that drops inbound connections)."""
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    configure_client(sock, keyring(own, [broker]), broker.name)
    sock.connect(endpoint)
    return sock
