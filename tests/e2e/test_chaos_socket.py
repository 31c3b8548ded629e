"""The node's ROUTER socket under hostile peers (real ZeroMQ sockets and a real sender process):
no connection takes over a node's name, and a frame above the message limit is dropped by the
socket before it is buffered."""
from __future__ import annotations

import asyncio
import socket
import sys
import textwrap

import zmq
import zmq.utils.monitor

from meshsl.transport.zmq_backend import ZmqTransport

TIMEOUT = 30


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dealer(context: zmq.Context, name: str, endpoint: str, wait_for_handshake: bool = False) -> zmq.Socket:
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTING_ID, name.encode())
    monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED) if wait_for_handshake else None
    sock.connect(endpoint)  # after the monitor: its event cannot be missed
    if monitor is not None:
        try:
            assert monitor.poll(TIMEOUT * 1000), "no handshake"
            zmq.utils.monitor.recv_monitor_message(monitor)
        finally:
            sock.disable_monitor()
            monitor.close(0)
    return sock


async def test_a_second_connection_cannot_take_over_a_node_name() -> None:
    endpoint = f"tcp://127.0.0.1:{_port()}"
    router = ZmqTransport("server", endpoint, {"server": endpoint}, max_message_bytes=1 << 20)
    await router.start()
    context = zmq.Context()
    try:
        real = _dealer(context, "client", endpoint)
        real.send(b"real-0")
        sender, frames = await asyncio.wait_for(router.recv(), TIMEOUT)
        assert (sender, frames[0].bytes) == ("client", b"real-0")

        impostor = _dealer(context, "client", endpoint, wait_for_handshake=True)  # as "client", a second time
        impostor.send(b"impostor")
        got = []
        for seq in range(1, 21):  # the real client keeps talking; the impostor's message must never appear
            real.send(f"real-{seq}".encode())
            while not got or got[-1] != ("client", f"real-{seq}".encode()):
                sender, frames = await asyncio.wait_for(router.recv(), TIMEOUT)
                got.append((sender, frames[0].bytes))
                assert frames[0].bytes != b"impostor", "a second connection took over the name 'client'"
        assert all(sender == "client" for sender, _ in got)  # the real node was never knocked off
    finally:
        context.destroy(0)
        await router.close()


SENDER = textwrap.dedent("""
    import sys, zmq
    endpoint, size = sys.argv[1], int(sys.argv[2])
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.ROUTING_ID, b"outsider")
    monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    sock.connect(endpoint)
    sock.send(bytearray(size), copy=False)
    # The receiver drops a connection whose frame is over its limit: wait for that (or give up).
    print("dropped" if monitor.poll(60000) else "kept", flush=True)
    sock.setsockopt(zmq.LINGER, 0)
""")


def _peak_rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


async def test_a_frame_over_the_message_limit_is_dropped_by_the_socket() -> None:
    """An outsider's 256 MiB frame to a node limited to 1 MiB: the connection is dropped on the frame
    header, the node's memory does not grow by the frame, and legitimate peers carry on."""
    endpoint = f"tcp://127.0.0.1:{_port()}"
    router = ZmqTransport("server", endpoint, {"server": endpoint}, max_message_bytes=1 << 20)
    await router.start()
    received: list = []

    async def receive() -> None:
        while True:
            sender, frames = await router.recv()
            received.append((sender, sum(len(f.bytes) for f in frames)))

    receiver = asyncio.create_task(receive())
    before = _peak_rss_mib()
    size = 256 << 20
    try:
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", SENDER, endpoint, str(size),
                                                    stdout=asyncio.subprocess.PIPE)
        out, _ = await asyncio.wait_for(proc.communicate(), 120)
        assert out.decode().strip() == "dropped", "the oversized frame was accepted"
        context = zmq.Context()
        try:
            legit = _dealer(context, "client", endpoint)
            legit.send(b"x" * 1000)
            while not any(sender == "client" for sender, _ in received):  # noqa: ASYNC110  (polls the receiver's list)
                await asyncio.sleep(0.01)  # bounded by the test timeout
        finally:
            context.destroy(0)
        assert not any(sender == "outsider" for sender, _ in received)
        grown = _peak_rss_mib() - before
        assert grown < 64, f"peak memory grew by {grown:.0f} MiB for a dropped {size >> 20} MiB frame"
    finally:
        receiver.cancel()
        await router.close()
