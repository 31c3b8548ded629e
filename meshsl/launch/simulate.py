"""Host every node of a topology in this process (in-process transport): tests and large simulations."""
from __future__ import annotations

import asyncio
import itertools
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from meshsl.errors import PeerFailed
from meshsl.coordinator.runtime import RunOptions
from meshsl.launch.entry import run_node
from meshsl.transport.inprocess import InProcessHub, InProcessTransport

_run_ids = itertools.count()


async def simulate(topology, options: Optional[RunOptions] = None, traffic_hook=None) -> tuple[dict, dict]:
    """Run all nodes concurrently on one event loop; returns (coordinator summary, runtimes by node).

    Every node's compute runs on one shared compute thread (one thread per node would make a
    1,000-client simulation fight over the GIL with 1,000 threads); the event loop stays free for messages.
    `traffic_hook(sender, peer, frames)` sees every message on the wire (the privacy audit uses it)."""
    run = next(_run_ids)
    book = {name: f"inproc://meshsl-{run}-{name}" for name in topology.nodes}
    hub = InProcessHub()  # this simulation's mailboxes
    results = {}
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"simulate-{run}-compute")

    async def one(name: str):
        transport = InProcessTransport(name, book[name], book, hub=hub)
        transport.sent_hook = traffic_hook
        runtime, summary = await run_node(topology, name, options if name == topology.coordinator else None,
                                          transport=transport, metrics=None, serve_metrics=False,
                                          executor=executor)
        results[name] = (runtime, summary)

    try:
        async with asyncio.TaskGroup() as group:
            for name in topology.nodes:
                group.create_task(one(name))
    finally:
        executor.shutdown(wait=True)
    failures = {n: r.failure for n, (r, _) in results.items() if r.failure}
    if failures:
        node = topology.coordinator if topology.coordinator in failures else next(iter(failures))  # the cause
        detail = failures[node]
        raise PeerFailed(node, detail)
    return results[topology.coordinator][1], {n: r for n, (r, _) in results.items()}
