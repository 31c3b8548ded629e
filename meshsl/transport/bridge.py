"""Many logical nodes per process, several processes: in-process mailboxes inside, one ZeroMQ link between.

The Ray engine hosts a share of a simulation's logical nodes in each actor. Nodes of the same actor
talk over the in-process transport, unchanged. Every process knows node X as `inproc://<run>/X`
(the same string everywhere, so the endpoint a node announces in its HELLO is the one its peers
have); in a process that does not host X, that mailbox is a `RemoteMailbox`: putting a message there
sends it over the actor's ZeroMQ DEALER to that actor's ROUTER (one TCP connection per pair of
actors, whatever the number of logical nodes: 10,000 simulated clients need no 10,000 sockets).
The receiving bridge puts it into the addressee's in-process mailbox (bounded: a full mailbox holds
the link back, as a full ZeroMQ queue would).

Identity: the ROUTER sees which actor sent a message (its DEALER's routing id, set by the bridge)
and refuses a sender name that actor does not host, so a peer cannot speak for another actor's node.
"""
from __future__ import annotations

import asyncio
import logging
import socket
from typing import Optional, Sequence, cast

import zmq
import zmq.asyncio

from meshsl.transport.inprocess import InProcessHub

log = logging.getLogger("meshsl.bridge")

HWM = 100_000  # messages queued per link and direction before a sender waits


def node_endpoint(run: str, node: str) -> str:
    return f"inproc://{run}/{node}"


def host_address() -> str:
    """An address other machines of the cluster can reach this one at (Ray's node IP when in Ray)."""
    try:
        import ray  # optional extra 'ray'
        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    return socket.gethostbyname(socket.gethostname())


class RemoteMailbox:
    """Stands in for a remote node's asyncio.Queue in the in-process transport's mailbox table."""

    def __init__(self, bridge: "Bridge", actor: str, node: str) -> None:
        self.bridge, self.actor, self.node = bridge, actor, node

    def full(self) -> bool:
        return not self.bridge.writable(self.actor)

    def put_nowait(self, item: tuple[str, list]) -> None:
        sender, frames = item
        self.bridge.send_nowait(self.actor, sender, self.node, frames)

    async def put(self, item: tuple[str, list]) -> None:
        sender, frames = item
        await self.bridge.send(self.actor, sender, self.node, frames)


class Bridge:
    """This actor's end of the links: a ROUTER others send to, a DEALER to each other actor."""

    def __init__(self, run: str, actor: str, hosted: Sequence[str], hub: InProcessHub) -> None:
        self.run, self.actor = run, actor
        self.hub = hub  # this actor's in-process mailboxes; remote nodes get stand-ins there
        self.hosted = set(hosted)
        self.context = zmq.asyncio.Context()
        self.router = self.context.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.RCVHWM, HWM)
        self.router.setsockopt(zmq.LINGER, 0)
        host = host_address()
        port = self.router.bind_to_random_port(f"tcp://{host}")
        self.address = f"tcp://{host}:{port}"
        self.dealers: dict[str, zmq.asyncio.Socket] = {}
        self.nodes_of: dict[str, set[str]] = {}
        self.endpoints: dict[str, str] = {}  # remote node -> its stand-in endpoint
        self.refused = 0
        self._bound_once: set[str] = set()  # hosted nodes whose mailbox existed (missing again: stopped)
        self._receiver: Optional[asyncio.Task] = None

    def connect(self, actors: dict[str, tuple[str, Sequence[str]]]) -> dict[str, str]:
        """`actors`: every actor's (address, hosted nodes). Returns the address book entries of remote nodes."""
        for actor, (address, nodes) in actors.items():
            if actor == self.actor:
                continue
            dealer = self.context.socket(zmq.DEALER)
            dealer.setsockopt(zmq.IDENTITY, self.actor.encode())
            dealer.setsockopt(zmq.SNDHWM, HWM)
            dealer.setsockopt(zmq.LINGER, 2000)
            dealer.connect(address)
            self.dealers[actor] = dealer
            self.nodes_of[actor] = set(nodes)
            for node in nodes:
                self.endpoints[node] = node_endpoint(self.run, node)
        return dict(self.endpoints)

    def start(self) -> None:
        """Install the stand-in mailboxes and start receiving (on the running event loop)."""
        for actor, nodes in self.nodes_of.items():
            for node in nodes:
                endpoint = self.endpoints[node]
                self.hub.install(endpoint, RemoteMailbox(self, actor, node))
        self._receiver = asyncio.get_running_loop().create_task(self._receive(), name=f"bridge-{self.actor}")

    def writable(self, actor: str) -> bool:
        return bool(cast(int, self.dealers[actor].get(zmq.EVENTS)) & zmq.POLLOUT)

    def send_nowait(self, actor: str, sender: str, node: str, frames: list) -> None:
        self.dealers[actor].send_multipart([sender.encode(), node.encode(), *frames], flags=zmq.NOBLOCK)

    async def send(self, actor: str, sender: str, node: str, frames: list) -> None:
        await self.dealers[actor].send_multipart([sender.encode(), node.encode(), *frames])

    async def _receive(self) -> None:
        while True:
            raw_actor, raw_sender, raw_node, *frames = await self.router.recv_multipart()
            actor, sender, node = raw_actor.decode(errors="replace"), raw_sender.decode(errors="replace"), \
                raw_node.decode(errors="replace")
            if sender not in self.nodes_of.get(actor, ()) or node not in self.hosted:
                self.refused += 1
                log.warning("bridge %s: refused a message from actor %s naming sender %r for %r", self.actor,
                            actor, sender, node)
                continue
            endpoint = node_endpoint(self.run, node)
            mailbox = self.hub.mailboxes.get(endpoint)
            if mailbox is None and node not in self._bound_once:  # not started yet: wait, as a DEALER would
                await self.hub.bound(endpoint).wait()
                mailbox = self.hub.mailboxes.get(endpoint)
            if mailbox is None:  # the node has stopped; like a closed ZeroMQ peer, the message is gone
                continue
            self._bound_once.add(node)
            await mailbox.put((sender, frames))

    async def close(self) -> None:
        if self._receiver is not None:
            self._receiver.cancel()
            try:
                await self._receiver
            except asyncio.CancelledError:
                pass
        for nodes in self.nodes_of.values():
            for node in nodes:
                self.hub.remove(self.endpoints[node])
        for dealer in self.dealers.values():
            dealer.close()
        self.router.close()
        self.context.term()
