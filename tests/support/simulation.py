"""Every node of a topology in one process (in-process transport), each with its own Prometheus registry
when asked: meshsl.launch.simulate plus the metrics the privacy gauges are read from."""
from __future__ import annotations

import asyncio
import itertools

from meshsl.coordinator.runtime import RunOptions
from meshsl.launch.entry import run_node
from meshsl.launch.metrics import NodeMetrics
from meshsl.transport.inprocess import InProcessHub, InProcessTransport

_runs = itertools.count()


def run(topology, hook=None, metrics: bool = False, evaluate: bool = True):
    """Like meshsl.launch.simulate, but every node may get its own Prometheus registry."""
    run_id = next(_runs)
    book = {name: f"inproc://privacy-{run_id}-{name}" for name in topology.nodes}
    hub = InProcessHub()
    registries = {name: NodeMetrics(name, n.party, "node", topology.spec.name, topology.hash)
                  for name, n in topology.nodes.items()} if metrics else {}
    results = {}

    async def one(name):
        transport = InProcessTransport(name, book[name], book, hub=hub)
        transport.sent_hook = hook
        options = RunOptions(evaluate=evaluate) if name == topology.coordinator else None
        results[name] = await run_node(topology, name, options, transport=transport, metrics=registries.get(name))

    async def main():
        async with asyncio.TaskGroup() as group:
            for name in topology.nodes:
                group.create_task(one(name))

    asyncio.run(main())
    assert not any(r.failure for r, _ in results.values()), {n: r.failure for n, (r, _) in results.items()}
    return results[topology.coordinator][1], {n: r for n, (r, _) in results.items()}, registries
