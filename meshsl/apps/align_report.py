"""`meshsl align`: the overlap per pair of parties, without training (the plan's alignment step: align.ids)."""
from __future__ import annotations

import asyncio
import itertools

from meshsl.align.ids import data_nodes, leader_of, node_ids
from meshsl.node.align_runner import align_locally
from meshsl.align.session import Session
from meshsl.schedule.steps import sample_pools
from meshsl.transport.inprocess import InProcessHub, InProcessTransport


async def _pair(topology, first: str, second: str) -> tuple[int, int, int]:
    hub = InProcessHub()
    book = {n: f"inproc://meshsl-align-pair-{first}-{second}-{n}" for n in (first, second)}
    transports = {n: InProcessTransport(n, book[n], book, queue_size=16, hub=hub) for n in book}
    for t in transports.values():
        await t.start()
    try:
        sessions = [Session(transports[n], n, topology.hash, first, [first, second], [], 600.0, 1)
                    for n in (first, second)]
        ids = [node_ids(topology, n).ids for n in (first, second)]
        try:
            outcome, _ = await asyncio.gather(*(s.run(v) for s, v in zip(sessions, ids)))
            common = outcome.size
        except Exception:  # an empty pairwise overlap ends the session with an error on both sides
            common = 0
    finally:
        for t in transports.values():
            await t.close()
    return len(ids[0]), len(ids[1]), common


def overlap_report(topology) -> dict:
    """Every pair of data nodes' overlap (each pair its own 2-party PSI) and the full alignment."""
    pairs = []
    for first, second in itertools.combinations(data_nodes(topology), 2):
        held_first, held_second, common = asyncio.run(_pair(topology, first, second))
        pairs.append({"nodes": [first, second],
                      "parties": [topology.nodes[first].party, topology.nodes[second].party],
                      "ids": [held_first, held_second], "common": common,
                      "share": [common / held_first if held_first else 0.0, common / held_second if held_second else 0.0]})
    outcomes = align_locally(topology)
    size = next(iter(outcomes.values())).size
    test_fraction = topology.spec.data[0].dataset.test_fraction
    pools = sample_pools(topology)
    return {"topology": topology.spec.name, "leader": leader_of(topology), "pairs": pairs, "common": size,
            "train": int(sum(len(p) for p in pools.train)), "test": int(len(pools.test)),
            "test_fraction": test_fraction,
            "seconds": {n: round(o.seconds, 3) for n, o in outcomes.items()}}
