"""ZmqTransport.try_send / recv_nowait on real ZeroMQ sockets (tcp loopback)."""
from __future__ import annotations

import asyncio
import socket

import pytest
import torch

from meshsl.errors import TransportError
from meshsl.protocol.envelope import Envelope, Kind, parse_envelope
from meshsl.protocol.frames import decode_message, describe, encode_message
from meshsl.transport.zmq_backend import ZmqTransport

PAYLOAD = 1 << 20  # large frames fill the socket buffers after a few messages
TIMEOUT = 30


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _message(seq: int, size: int = PAYLOAD) -> list:
    tensor = torch.full((size // 4,), float(seq))
    envelope = Envelope(kind=Kind.ACTIVATION, topology="t", sender="a", step=seq, edge="a->b",
                        tensors=(describe(tensor.dtype, tuple(tensor.shape), "none", [tensor]),))
    return encode_message(envelope, [[tensor]])


@pytest.fixture
async def pair():
    book = {"a": f"tcp://127.0.0.1:{_port()}", "b": f"tcp://127.0.0.1:{_port()}"}
    a = ZmqTransport("a", book["a"], book, high_water_mark=1)
    b = ZmqTransport("b", book["b"], book, high_water_mark=1)
    await a.start()
    await b.start()
    yield a, b
    await a.close()
    await b.close()


async def _recv_step(b: ZmqTransport) -> int:
    sender, frames = await asyncio.wait_for(b.recv(), TIMEOUT)
    assert sender == "a"
    envelope, tensors = decode_message(frames, 1 << 30)
    assert float(tensors[0][0][0]) == envelope.step  # the payload is the message's own
    return envelope.step


async def test_try_send_sends_until_the_queue_is_full_and_never_half_sends(pair) -> None:
    a, b = pair
    hooked = []
    a.sent_hook = lambda node, peer, frames: hooked.append(parse_envelope(bytes(frames[0])).step)
    await asyncio.wait_for(a.send("b", _message(0)), TIMEOUT)  # waits for the connection (IMMEDIATE)
    assert await _recv_step(b) == 0

    # Nobody receives: with HWM 1 on both sides the queue and the socket buffers fill up.
    sent, refused = [], None
    for seq in range(1, 2000):
        if a.try_send("b", _message(seq)):
            sent.append(seq)
        else:
            refused = seq
            break
    assert refused is not None, "try_send never reported a full queue"
    assert sent, "try_send refused the first message on an idle connection"
    assert hooked == [0] + sent  # the hook sees what was sent, not the refused message

    # The refused message goes by the waiting path, after everything sent before it.
    send = asyncio.ensure_future(a.send("b", _message(refused)))
    received = [await _recv_step(b) for _ in range(len(sent) + 1)]
    await asyncio.wait_for(send, TIMEOUT)
    assert received == sent + [refused]  # in order, none lost, none twice, no half-sent message
    assert hooked == [0] + sent + [refused]
    # A refused message that had gone anyway would arrive before this marker.
    await asyncio.wait_for(a.send("b", _message(10_000, 64)), TIMEOUT)
    assert await _recv_step(b) == 10_000


async def test_recv_nowait_returns_a_waiting_message(pair) -> None:
    a, b = pair
    assert b.recv_nowait() is None
    await asyncio.wait_for(a.send("b", _message(7, 64)), TIMEOUT)
    assert await _recv_step(b) == 7  # now connected both ways
    await asyncio.wait_for(a.send("b", _message(8, 64)), TIMEOUT)
    await asyncio.wait_for(a.send("b", _message(9, 64)), TIMEOUT)
    first = await asyncio.wait_for(b.recv(), TIMEOUT)  # 8 has arrived; 9 follows on the same connection
    got = [decode_message(first[1], 1 << 20)[0].step]
    while len(got) < 2:
        message = b.recv_nowait()
        if message is None:
            message = await asyncio.wait_for(b.recv(), TIMEOUT)
        assert message[0] == "a"
        got.append(decode_message(message[1], 1 << 20)[0].step)
    assert got == [8, 9]


async def test_try_send_to_an_unknown_peer_is_a_transport_error(pair) -> None:
    a, _ = pair
    with pytest.raises(TransportError):
        a.try_send("nobody", _message(1, 64))


async def test_try_send_threadsafe_from_another_thread(pair) -> None:
    a, b = pair
    assert a.try_send_threadsafe("b", _message(1, 64)) is False  # no socket yet: it creates none
    assert "b" not in a._dealers
    await asyncio.wait_for(a.send("b", _message(2, 64)), TIMEOUT)
    assert await _recv_step(b) == 2
    sent = await asyncio.to_thread(a.try_send_threadsafe, "b", _message(3, 64))
    assert sent is True
    assert await _recv_step(b) == 3
    assert await asyncio.to_thread(a.try_send_threadsafe, "nobody", _message(4, 64)) is False
