"""`meshsl align` (overlap per pair of parties, without training) and the plan's alignment step."""
from __future__ import annotations

import asyncio
import itertools
from typing import Optional

from meshsl.align.ids import _id_origin, data_nodes, leader_of, node_ids, uses_ids
from meshsl.align.runner import align_locally
from meshsl.align.session import Session

PROTOCOL = "ECDH private set intersection (openmined-psi, P-256), over the nodes' own transport"


def alignment_step(topology) -> Optional[dict]:
    """What the plan shows: who runs the PSI with whom, on which ids, and what each party learns."""
    if not uses_ids(topology):
        return None
    leader = leader_of(topology)
    members = [n for n in data_nodes(topology) if n != leader]
    spec = topology.spec.alignment
    party = {n: s.party for n, s in topology.nodes.items()}
    learns = {}
    for node in topology.nodes:
        if node == leader:
            what = ("the common ids (its own rows in the intersection), each member's id count and its "
                    "overlap with each member")
        elif node in members:
            what = (f"the common ids (its own rows in the intersection), the leader's id count and its own "
                    f"overlap with the leader {leader!r}")
        else:
            what = "the number of common samples only"
        learns[node] = what
    return {
        "when": "before training and before prediction, before any data is read",
        "protocol": PROTOCOL,
        "leader": leader,
        "members": members,
        "observers": [n for n in topology.nodes if n not in data_nodes(topology)],
        "ids": {d.name: {"node": topology.placement[d.name][0], "party": party[topology.placement[d.name][0]],
                         "from": _id_origin(topology, d)} for d in topology.spec.data},
        "min_intersection": spec.min_intersection if spec else 1,
        "order": "common samples sorted by id (every party holding them knows them); train/test split and "
                 "batches are then drawn over that order with the training seed",
        "crosses": "blinded P-256 points and counts only; never an id or a hash of an id",
        "learns": learns,
    }


async def _pair(topology, first: str, second: str) -> tuple[int, int, int]:
    from meshsl.transport.inprocess import InProcessTransport
    book = {n: f"inproc://meshsl-align-pair-{id(topology)}-{first}-{second}-{n}" for n in (first, second)}
    transports = {n: InProcessTransport(n, book[n], book, queue_size=16) for n in book}
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
    from meshsl.plan.steps import sample_pools
    pools = sample_pools(topology)
    return {"topology": topology.spec.name, "leader": leader_of(topology), "pairs": pairs, "common": size,
            "train": int(sum(len(p) for p in pools.train)), "test": int(len(pools.test)),
            "test_fraction": test_fraction,
            "seconds": {n: round(o.seconds, 3) for n, o in outcomes.items()}}
