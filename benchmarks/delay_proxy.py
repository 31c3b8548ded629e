"""A transparent wide-area link for one network namespace: every TCP connection a process in the namespace
opens to another site is redirected (nft, OUTPUT chain) to this proxy, which forwards it to its original
destination with a one-way delay and a rate limit in each direction.

These kernels have no netem qdisc, hence user space. Run it inside the namespace:

    ip netns exec NS python -m benchmarks.delay_proxy --port 9999 --delay-ms 25 --rate-mbit 100

and add the redirect (see `nft_rules`). The proxy marks its own upstream sockets (SO_MARK) and the rule
skips marked packets, so the proxy's connections are not redirected back to itself. A round trip
between two sites = the delay of the initiating site's proxy in both directions = 2 x --delay-ms.

Data of one direction is paced at the rate (serialisation) and released `delay` later (propagation),
in order; a bounded queue per direction gives backpressure to the sender.
"""
from __future__ import annotations

import argparse
import asyncio
import socket
import struct

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
SO_MARK = 36
MARK = 0x5A17
CHUNK = 64 * 1024
QUEUE_CHUNKS = 512  # per direction: up to 32 MiB in flight through the emulated link


def nft_rules(table: str, own_address: str, subnet: str, port: int) -> str:
    """nft script: connections from this namespace to another site of `subnet` go to the proxy at `port`."""
    return (f"table ip {table} {{\n"
            f"  chain out {{\n"
            f"    type nat hook output priority -100; policy accept;\n"
            f"    meta mark {MARK:#x} return\n"
            f"    ip daddr {subnet} ip daddr != {own_address} tcp dport != {port} redirect to :{port}\n"
            f"  }}\n"
            f"}}\n")


def original_destination(sock: socket.socket) -> tuple[str, int]:
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, address = struct.unpack_from("!H4s", raw, 2)
    return socket.inet_ntoa(address), port


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float, rate_bps: float) -> None:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue(QUEUE_CHUNKS)

    async def receive() -> None:
        free_at = 0.0  # when the emulated link has sent everything queued so far
        while True:
            chunk = await reader.read(CHUNK)
            now = loop.time()
            if not chunk:
                await queue.put((max(now, free_at) + delay, b""))
                return
            free_at = max(now, free_at) + (len(chunk) * 8 / rate_bps if rate_bps > 0 else 0.0)
            await queue.put((free_at + delay, chunk))

    async def deliver() -> None:
        while True:
            when, chunk = await queue.get()
            wait = when - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not chunk:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(chunk)
            await writer.drain()

    try:
        async with asyncio.TaskGroup() as group:
            group.create_task(receive())
            group.create_task(deliver())
    except* (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def _serve_connection(reader, writer, delay: float, rate_bps: float) -> None:
    sock = writer.get_extra_info("socket")
    try:
        host, port = original_destination(sock)
        upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        upstream.setsockopt(socket.SOL_SOCKET, SO_MARK, MARK)
        upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        upstream.setblocking(False)
        await asyncio.sleep(2 * delay)  # the TCP handshake crosses the link once each way
        await asyncio.get_running_loop().sock_connect(upstream, (host, port))
        up_reader, up_writer = await asyncio.open_connection(sock=upstream)
    except OSError:
        writer.close()
        return
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    await asyncio.gather(_pump(reader, up_writer, delay, rate_bps), _pump(up_reader, writer, delay, rate_bps))


async def serve(port: int, delay_ms: float, rate_mbit: float, ready=None) -> None:
    delay, rate = delay_ms / 1000.0, rate_mbit * 1e6
    server = await asyncio.start_server(lambda r, w: _serve_connection(r, w, delay, rate), "0.0.0.0", port,
                                        reuse_address=True)
    if ready is not None:
        ready()
    async with server:
        await server.serve_forever()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay-ms", type=float, required=True, help="one-way delay per direction (RTT/2)")
    parser.add_argument("--rate-mbit", type=float, default=100.0, help="per direction and connection; 0: unlimited")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.port, args.delay_ms, args.rate_mbit, ready=lambda: print("ready", flush=True)))


if __name__ == "__main__":
    main()
