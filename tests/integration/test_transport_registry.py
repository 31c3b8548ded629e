"""Transport wiring: backends chosen by endpoint scheme from a registry, one in-process hub per
simulation, and plain (not asyncio) ZeroMQ sockets in the ZeroMQ backend."""
import asyncio
import socket

import pytest
import zmq
import zmq.asyncio

from meshsl.errors import ConfigError
from meshsl.transport import InProcessHub, make_transport
from meshsl.transport.inprocess import InProcessTransport
from meshsl.transport.zmq_backend import ZmqTransport


def test_backend_is_chosen_by_scheme():
    hub = InProcessHub()
    book = {"a": "inproc://reg-a", "b": "tcp://127.0.0.1:1"}
    assert type(make_transport("a", book["a"], book, hub=hub, high_water_mark=8)) is InProcessTransport
    assert type(make_transport("b", book["b"], book)) is ZmqTransport
    assert type(make_transport("a", book["a"], book, in_process=False)) is ZmqTransport  # ZeroMQ's own inproc
    assert type(make_transport("c", None, book)) is ZmqTransport  # dial-out
    with pytest.raises(ConfigError, match="needs the hub of its simulation"):
        make_transport("a", book["a"], book)


def test_two_hubs_are_two_separate_worlds():
    async def scenario():
        book = {"a": "inproc://same-a", "b": "inproc://same-b"}
        first, second = InProcessHub(), InProcessHub()
        a1, b1 = (InProcessTransport(n, book[n], book, hub=first) for n in "ab")
        a2, b2 = (InProcessTransport(n, book[n], book, hub=second) for n in "ab")
        for t in (a1, b1, a2, b2):
            await t.start()  # the same endpoints bind twice: once per hub
        await a1.send("b", [b"one"])
        await a2.send("b", [b"two"])
        got = (await asyncio.wait_for(b1.recv(), 5), await asyncio.wait_for(b2.recv(), 5))
        for t in (a1, b1, a2, b2):
            await t.close()
        return got, first.mailboxes, second.mailboxes

    got, first, second = asyncio.run(scenario())
    assert got == (("a", [b"one"]), ("a", [b"two"]))
    assert first == {} and second == {}  # closed transports leave nothing behind


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_zeromq_backend_uses_plain_sockets_even_given_an_asyncio_context():
    async def scenario():
        shared = zmq.asyncio.Context()
        book = {"server": f"tcp://127.0.0.1:{_free_port()}", "client": None}  # the client dials out
        server = ZmqTransport("server", book["server"], book, context=shared)
        client = ZmqTransport("client", None, book, context=shared)
        await server.start()
        await client.start()
        try:
            await asyncio.wait_for(client.send("server", [b"hello"]), 10)
            message = await asyncio.wait_for(server.recv(), 10)
            await asyncio.wait_for(server.send("client", [b"back"]), 10)
            reply = await asyncio.wait_for(client.recv(), 10)
            kinds = {type(server.context), type(client.context), type(server._router), type(client._router)}
        finally:
            await client.close()
            await server.close()
            shared.term()
        return message, reply, kinds

    (sender, frames), (replier, back), kinds = asyncio.run(scenario())
    assert sender == "client" and [bytes(f) for f in frames] == [b"hello"]
    assert replier == "server" and [bytes(f) for f in back] == [b"back"]
    assert kinds == {zmq.Context, zmq.Socket}
