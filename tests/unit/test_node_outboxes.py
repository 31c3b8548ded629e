"""PeerOutboxes: per-peer order, the fast path past an idle outbox, the compute thread's direct sends only
where the transport declares them, byte counting, re-routing. A fake transport, no sockets."""
from __future__ import annotations

import asyncio
from typing import Sequence

import pytest

from meshsl.errors import TransportError
from meshsl.node.runtime import NodeCounters
from meshsl.node.owned_tasks import OwnedTasks
from meshsl.node.peer_outboxes import PeerOutboxes
from meshsl.transport.base import Transport

pytestmark = pytest.mark.unit


class Wire(Transport):
    """`accept_now`: whether try_send succeeds; `sent`: (peer, payload, how) in send order."""

    def __init__(self, accept_now: bool = False, threadsafe: bool = False) -> None:
        super().__init__("me", "fake://me", {"peer": "fake://peer"})
        self.accept_now = accept_now
        self.threadsafe_send = threadsafe
        self.sent: list = []

    async def start(self) -> None: ...

    async def send(self, peer: str, frames: Sequence) -> None:
        if frames[0] == b"broken":
            raise TransportError("peer gone")
        await asyncio.sleep(0)
        self.sent.append((peer, frames[0], "send"))

    def try_send(self, peer: str, frames: Sequence) -> bool:
        if self.accept_now:
            self.sent.append((peer, frames[0], "now"))
        return self.accept_now

    def try_send_threadsafe(self, peer: str, frames: Sequence) -> bool:
        self.sent.append((peer, frames[0], "thread"))
        return True

    async def recv(self): ...

    async def close(self) -> None: ...


def _outboxes(wire: Wire, counters: NodeCounters) -> PeerOutboxes:
    return PeerOutboxes("me", wire, limit=2, timeout_s=5.0, counters=counters, metrics=lambda: None)


def test_queued_messages_go_out_in_order_and_tensor_bytes_are_counted() -> None:
    async def scenario() -> tuple[Wire, NodeCounters]:
        wire, counters = Wire(), NodeCounters()
        async with asyncio.TaskGroup() as group:
            tasks = OwnedTasks(group)
            boxes = _outboxes(wire, counters)
            boxes.start(tasks)
            for i in range(3):
                boxes.post("peer", [b"m%d" % i], ("a->b", "forward"))
            await boxes.enqueue("peer", [b"control"], None)
            await boxes.drain()
            tasks.cancel_all()
        return wire, counters

    wire, counters = asyncio.run(scenario())
    assert [payload for _, payload, _ in wire.sent] == [b"m0", b"m1", b"m2", b"control"]
    assert counters.bytes == {("a->b", "forward"): 6}


def test_an_idle_outbox_is_skipped_when_the_transport_takes_the_message_now() -> None:
    async def scenario() -> Wire:
        wire = Wire(accept_now=True)
        async with asyncio.TaskGroup() as group:
            boxes = _outboxes(wire, NodeCounters())
            boxes.start(OwnedTasks(group))
            boxes.post("peer", [b"fast"], None)
            assert boxes.boxes["peer"].idle
            boxes.reroute("peer", "fake://elsewhere")
        return wire

    wire = asyncio.run(scenario())
    assert wire.sent == [("peer", b"fast", "now")]
    assert wire.address_book["peer"] == "fake://elsewhere"


def test_a_failed_send_is_dropped_and_the_next_still_goes() -> None:
    async def scenario() -> Wire:
        wire = Wire()
        async with asyncio.TaskGroup() as group:
            tasks = OwnedTasks(group)
            boxes = _outboxes(wire, NodeCounters())
            boxes.start(tasks)
            boxes.post("peer", [b"broken"], None)
            boxes.post("peer", [b"after"], None)
            await boxes.drain()
            tasks.cancel_all()
        return wire

    assert [payload for _, payload, _ in asyncio.run(scenario()).sent] == [b"after"]


@pytest.mark.parametrize("threadsafe", [False, True])
def test_the_compute_thread_sends_directly_only_where_the_transport_declares_it(threadsafe: bool) -> None:
    async def scenario() -> tuple[list, Wire, NodeCounters]:
        wire, counters = Wire(threadsafe=threadsafe), NodeCounters()
        async with asyncio.TaskGroup() as group:
            boxes = _outboxes(wire, counters)
            boxes.start(OwnedTasks(group))
            assert boxes.send_from_compute("peer", [b"x"], ("e", "backward")) is False  # no outbox yet
            boxes.outbox("peer")
            results = [await asyncio.to_thread(boxes.send_from_compute, "peer", [b"abc"], ("e", "backward"))]
            boxes.stop_direct_sends()  # the transport is closing
            results.append(boxes.send_from_compute("peer", [b"late"], ("e", "backward")))
            boxes.reroute("peer", "fake://peer")  # cancels the sender
        return results, wire, counters

    results, wire, counters = asyncio.run(scenario())
    assert results == [threadsafe, False]
    assert wire.sent == ([("peer", b"abc", "thread")] if threadsafe else [])
    assert counters.bytes == ({("e", "backward"): 3} if threadsafe else {})


def test_every_transport_declares_its_optional_capabilities() -> None:
    wire = Wire()
    assert wire.threadsafe_send is False and Transport.try_send_threadsafe(wire, "peer", []) is False
    assert wire.refused_by == {} and wire.on_dropped is None
    assert wire.bind_address == "fake://me"
    wire.bind = "tcp://0.0.0.0:1"
    assert wire.bind_address == "tcp://0.0.0.0:1"
