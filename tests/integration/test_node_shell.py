"""The node shell driven through a fake transport (a small Transport of the test's own): it announces
itself, joins on the coordinator's acknowledgement, counts malformed messages without stopping, and
returns from run() on SHUTDOWN. No sockets, no coordinator, no other node."""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Optional, Sequence

import pytest

from support.paths import TOPOLOGIES
from meshsl.protocol.envelope import Envelope, Kind
from meshsl.protocol.frames import decode_message, encode_message
from meshsl.node.runtime import NodeRuntime
from meshsl.topology.model import load_topology
from meshsl.transport.base import Transport

pytestmark = pytest.mark.integration


class FakeTransport(Transport):
    """Records what the node sends; hands it what the test delivers. Declares no optional capability."""

    def __init__(self, node: str, address_book: dict) -> None:
        super().__init__(node, f"fake://{node}", address_book)
        self.sent: list[tuple[str, Envelope]] = []
        self.inbox: asyncio.Queue = asyncio.Queue(maxsize=64)
        self.started = self.closed = False

    async def start(self) -> None:
        self.started = True

    async def send(self, peer: str, frames: Sequence) -> None:
        envelope, _ = decode_message([bytes(f) for f in frames], 1 << 30)
        self.sent.append((peer, envelope))

    async def recv(self) -> tuple[str, list]:
        return await self.inbox.get()

    async def close(self) -> None:
        self.closed = True

    def deliver(self, sender: str, frames: list) -> None:
        self.inbox.put_nowait((sender, frames))

    def kinds_to(self, peer: str) -> list[Kind]:
        return [envelope.kind for to, envelope in self.sent if to == peer]


def _from(topology, sender: str, kind: Kind, **fields) -> list:
    return encode_message(Envelope(kind=kind, topology=topology.hash, sender=sender, **fields))


async def _until(predicate, what: str, timeout_s: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def _scenario(checkpoints: Path) -> tuple[NodeRuntime, FakeTransport]:
    topology = load_topology(TOPOLOGIES / "vanilla.yaml")
    server = topology.coordinator
    transport = FakeTransport("client", {name: f"fake://{name}" for name in topology.nodes})
    runtime = NodeRuntime(topology, "client", transport=transport, checkpoint_dir=checkpoints)
    assert runtime.transport.on_dropped is not None  # set without probing: every Transport declares it
    running = asyncio.create_task(runtime.run())

    await _until(lambda: Kind.HELLO in transport.kinds_to(server), "a HELLO to the coordinator")
    assert transport.started and not runtime.liveness.joined
    hello = next(envelope for to, envelope in transport.sent if envelope.kind == Kind.HELLO)
    assert hello.meta["incarnation"] == runtime.incarnation and hello.meta["checkpoints"] == []  # checkpoint.every: 0

    transport.deliver(server, _from(topology, server, Kind.ACK, meta={"of": "hello"}))
    await _until(lambda: runtime.liveness.joined, "joining on the ACK")
    assert runtime.liveness.hello_acked and runtime.liveness.contacted

    transport.deliver(server, _from(topology, server, Kind.RESTORE, meta={"checkpoint": "soon"}))  # malformed
    transport.deliver(server, [b"not a header"])
    transport.deliver("stranger", _from(topology, "stranger", Kind.HEARTBEAT))
    await _until(lambda: sum(runtime.counters.rejected.values()) == 3, "three rejections")
    assert not running.done()

    transport.deliver(server, _from(topology, server, Kind.SHUTDOWN))
    await asyncio.wait_for(running, timeout=30)
    return runtime, transport


def test_node_shell_joins_counts_malformed_messages_and_stops_on_shutdown(tmp_path: Path) -> None:
    runtime, transport = asyncio.run(_scenario(tmp_path))
    assert runtime.failure is None and not runtime.aborted and runtime.dropped is None
    assert transport.closed
    assert set(runtime.counters.rejected) == {"bad_control", "bad_header", "unknown_peer"}, runtime.counters.rejected


async def _abort(checkpoints: Path) -> NodeRuntime:
    topology = load_topology(TOPOLOGIES / "vanilla.yaml")
    server = topology.coordinator
    transport = FakeTransport("client", {name: f"fake://{name}" for name in topology.nodes})
    runtime = NodeRuntime(topology, "client", transport=transport, checkpoint_dir=checkpoints)
    running = asyncio.create_task(runtime.run())
    await _until(lambda: Kind.HELLO in transport.kinds_to(server), "a HELLO to the coordinator")
    transport.deliver(server, _from(topology, server, Kind.SHUTDOWN, meta={"abort": "disk full on server"}))
    await asyncio.wait_for(running, timeout=30)
    return runtime


def test_node_shell_fails_when_the_coordinator_aborts_the_run(tmp_path: Path) -> None:
    runtime = asyncio.run(_abort(tmp_path))
    assert runtime.aborted and "disk full on server" in runtime.failure


def test_control_from_another_node_than_the_coordinator_is_refused(tmp_path: Path) -> None:
    async def scenario() -> Optional[NodeRuntime]:
        topology = load_topology(TOPOLOGIES / "vanilla.yaml")
        transport = FakeTransport("client", {name: f"fake://{name}" for name in topology.nodes})
        # Only the coordinator's node may send control: a SHUTDOWN naming another sender is refused.
        runtime = NodeRuntime(topology, "client", transport=transport, checkpoint_dir=tmp_path)
        running = asyncio.create_task(runtime.run())
        await _until(lambda: transport.sent, "a first message")
        transport.deliver("client", _from(topology, "client", Kind.SHUTDOWN))
        await _until(lambda: runtime.counters.rejected.get("not_coordinator") == 1, "the refusal")
        assert not running.done()
        runtime.stop()
        await asyncio.wait_for(running, timeout=30)
        return runtime

    assert asyncio.run(scenario()).failure is None
