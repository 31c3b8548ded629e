"""The alignment protocol over meshsl's own Transport (ZeroMQ with CURVE when enabled, or in-process).

Roles: one *leader* (a data node, by default the label holder), the other data nodes (*members*)
and the nodes without data (*observers*, who only need the intersection size to plan the steps).

    member -> leader   REQUEST   its ids blinded with its exponent b, in a secret random order
    leader -> member   REQUEST   the leader's ids blinded with a, in a secret random order
    member -> leader   RESPONSE  the leader's request raised to b (same order): H(y)^(ab)
    leader -> member   RESPONSE  the member's request raised to a (same order): H(x)^(ab)
    leader -> member   FINAL     the doubly blinded values of the common ids, sorted, and their count
    leader -> observer FINAL     the count only

The leader learns each member's overlap with its own ids; with 3+ data nodes it intersects those
and tells each member which of its pairwise-common rows are in every party (FINAL), so a member
ends up with the rows common to all. Every party then orders its common rows by the ids themselves
(every party holding them knows them), so row i is the same sample everywhere.

Nothing but blinded points and counts crosses: no id, no hash of an id. Messages are three frames:
a magic tag, a small JSON header (type, topology hash, counts) and the payload in openmined-psi's own
protobuf format. A message that does not parse, comes from the wrong node or belongs to another
topology is logged and dropped, as the node does with training messages.
"""
from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from meshsl.align import psi
from meshsl.errors import AlignmentError, MeshslError, ProtocolError

log = logging.getLogger("meshsl.align")

MAGIC = b"meshsl-align/1"
MAX_HEADER_BYTES = 4096
REQUEST, RESPONSE, FINAL = "request", "response", "final"


@dataclass
class AlignmentOutcome:
    """What one node learned: the common ids in the agreed order (data nodes) and the counts."""

    size: int
    ids: Optional[list[str]]  # None on observers
    pair_sizes: dict[str, int] = field(default_factory=dict)  # peer -> overlap with it (leader: every member)
    peer_sizes: dict[str, int] = field(default_factory=dict)  # peer -> how many ids it holds
    seconds: float = 0.0


def encode(kind: str, topology_hash: str, payload: bytes = b"", **counts: int) -> list[bytes]:
    header = json.dumps({"type": kind, "topology": topology_hash, **counts}).encode()
    return [MAGIC, header, payload]


def is_alignment_message(frames) -> bool:
    return bool(frames) and bytes(frames[0]) == MAGIC


def decode(frames, topology_hash: str) -> tuple[dict, bytes]:
    frames = [bytes(f) for f in frames]
    if len(frames) != 3 or frames[0] != MAGIC:
        raise ProtocolError("align_frames", f"{len(frames)} frames")
    if len(frames[1]) > MAX_HEADER_BYTES:
        raise ProtocolError("align_header", "header too long")
    try:
        header = json.loads(frames[1])
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError("align_header", "not JSON") from None
    if not isinstance(header, dict) or header.get("type") not in (REQUEST, RESPONSE, FINAL):
        raise ProtocolError("align_header", "unknown message type")
    if header.get("topology") != topology_hash:
        raise ProtocolError("topology_mismatch", "alignment message of another topology")
    for key in ("count", "size", "held"):
        value = header.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ProtocolError("align_header", f"{key} must be a count")
    if header.get("error") is not None and not isinstance(header["error"], str):
        raise ProtocolError("align_header", "error must be text")
    return header, frames[2]


def _value_set(payload: bytes) -> set[bytes]:
    return set(psi.response_values(payload))


def _leader_match(count: int, members: list[str], mine: dict, theirs: dict) -> tuple[list[int], dict[str, int]]:
    """Positions (in the leader's request order) common to every member, and each member's overlap."""
    common = [k for k in range(count) if all(mine[m][k] in theirs[m] for m in members)]
    return common, {m: sum(v in theirs[m] for v in mine[m]) for m in members}


class Session:
    """One node's side of an alignment: send, and receive exactly the messages its role expects."""

    def __init__(self, transport, node: str, topology_hash: str, leader: str, members: list[str],
                 observers: list[str], timeout_s: float, min_intersection: int = 1) -> None:
        self.transport = transport
        self.node = node
        self.topology_hash = topology_hash
        self.leader = leader
        self.members = [m for m in members if m != leader]
        self.observers = [o for o in observers if o not in members and o != leader]
        self.timeout_s = timeout_s
        self.min_intersection = min_intersection
        self.dropped = 0

    async def _send(self, peer: str, kind: str, payload: bytes = b"", **counts: Any) -> None:
        await asyncio.wait_for(self.transport.send(peer, encode(kind, self.topology_hash, payload, **counts)),
                               timeout=self.timeout_s)

    async def _receive(self, expected: dict[str, set[str]]) -> tuple[str, dict, bytes]:
        """The next alignment message whose (sender, type) is still expected; others are dropped."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                waiting = ", ".join(f"{kind} from {peer!r}" for peer, kinds in expected.items() for kind in kinds)
                raise AlignmentError(f"no {waiting} within {self.timeout_s:.0f}s; every node of the topology "
                                     f"must be running for the sample-id alignment", f"alignment on {self.node!r}")
            try:
                sender, frames = await asyncio.wait_for(self.transport.recv(), timeout=left)
            except TimeoutError:
                continue
            if not is_alignment_message(frames):
                continue  # a peer already past alignment (hello, heartbeat): it repeats what matters
            try:
                header, payload = decode(frames, self.topology_hash)
            except ProtocolError as exc:
                self.dropped += 1
                log.warning("%s: dropped an alignment message from %r: %s", self.node, sender, exc)
                continue
            if header["type"] not in expected.get(sender, ()):
                self.dropped += 1
                log.warning("%s: dropped an unexpected alignment %s from %r", self.node, header["type"], sender)
                continue
            expected[sender].discard(header["type"])
            if not expected[sender]:
                del expected[sender]
            return sender, header, payload

    async def _offload(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    # ---- roles ----------------------------------------------------------------------------------
    async def run(self, ids: Optional[list[str]]) -> AlignmentOutcome:
        started = time.monotonic()
        if self.node == self.leader:
            outcome = await self._lead(ids or [])
        elif ids is not None:
            outcome = await self._member(ids)
        else:
            outcome = await self._observe()
        outcome.seconds = time.monotonic() - started
        return outcome

    async def _lead(self, ids: list[str]) -> AlignmentOutcome:
        blinder = psi.Blinder()
        order = list(range(len(ids)))
        random.SystemRandom().shuffle(order)  # the request order must not reveal the file's row order
        request = await self._offload(blinder.blind, [ids[i] for i in order])
        for member in self.members:
            await self._send(member, REQUEST, request, count=len(ids))
        expected = {m: {REQUEST, RESPONSE} for m in self.members}
        theirs: dict[str, set[bytes]] = {}  # member -> its ids, doubly blinded (set: order is the member's)
        mine: dict[str, list[bytes]] = {}  # member -> my ids (in `order`), doubly blinded
        held: dict[str, int] = {}
        while expected:
            sender, header, payload = await self._receive(expected)
            try:
                if header["type"] == REQUEST:
                    held[sender] = header["count"]
                    response = await self._offload(blinder.reblind, payload)
                    theirs[sender] = await self._offload(_value_set, response)
                    await self._send(sender, RESPONSE, response, count=header["count"])
                else:
                    values = await self._offload(psi.response_values, payload)
                    if len(values) != len(ids):
                        raise ProtocolError("align_count", f"{len(values)} values for {len(ids)} ids", sender)
                    mine[sender] = values
            except MeshslError:
                raise
            except Exception as exc:  # the library refuses malformed points or protobuf
                raise ProtocolError("align_payload", f"{type(exc).__name__}: {exc}", sender) from None
        common, pair_sizes = await self._offload(_leader_match, len(ids), self.members, mine, theirs)
        error = self._size_problem(len(common))
        for member in self.members:
            # sorted: no hint of my row order
            payload = b"" if error else await self._offload(lambda: psi.pack_values(sorted(mine[member][k] for k in common)))
            await self._send(member, FINAL, payload, size=len(common), **({"error": error} if error else {}))
        told: dict[str, Any] = {"error": error} if error else {}
        for observer in self.observers:
            await self._send(observer, FINAL, size=len(common), **told)
        if error is not None:
            raise AlignmentError(error, f"alignment on {self.node!r}")
        common_ids = await self._offload(lambda: sorted(ids[order[k]] for k in common))
        return AlignmentOutcome(len(common), common_ids, pair_sizes, held)

    async def _member(self, ids: list[str]) -> AlignmentOutcome:
        blinder = psi.Blinder()
        order = list(range(len(ids)))
        random.SystemRandom().shuffle(order)
        request = await self._offload(blinder.blind, [ids[i] for i in order])
        await self._send(self.leader, REQUEST, request, count=len(ids))
        expected = {self.leader: {REQUEST, RESPONSE}}
        mine: list[bytes] = []
        leader_values: set[bytes] = set()
        held = 0
        while expected:
            _, header, payload = await self._receive(expected)
            try:
                if header["type"] == REQUEST:
                    held = header["count"]
                    response = await self._offload(blinder.reblind, payload)
                    leader_values = await self._offload(_value_set, response)
                    await self._send(self.leader, RESPONSE, response, count=header["count"])
                else:
                    mine = await self._offload(psi.response_values, payload)
                    if len(mine) != len(ids):
                        raise ProtocolError("align_count", f"{len(mine)} values for {len(ids)} ids", self.leader)
            except MeshslError:
                raise
            except Exception as exc:
                raise ProtocolError("align_payload", f"{type(exc).__name__}: {exc}", self.leader) from None
        pairwise = await self._offload(lambda: sum(v in leader_values for v in mine))
        _, header, payload = await self._receive({self.leader: {FINAL}})
        if header.get("error"):
            raise AlignmentError(header["error"], f"alignment on {self.node!r} (reported by leader {self.leader!r})")
        try:
            final = await self._offload(_value_set, payload)
        except Exception as exc:
            raise ProtocolError("align_payload", f"{type(exc).__name__}: {exc}", self.leader) from None
        common = await self._offload(lambda: [ids[order[k]] for k, v in enumerate(mine) if v in final])
        if len(common) != header["size"] or len(final) != header["size"]:
            raise AlignmentError(f"the leader {self.leader!r} announced {header['size']} common samples but "
                                 f"{len(common)} of this node's ids are among them", f"alignment on {self.node!r}")
        error = self._size_problem(len(common))
        if error is not None:
            raise AlignmentError(error, f"alignment on {self.node!r}")
        return AlignmentOutcome(len(common), await self._offload(sorted, common), {self.leader: pairwise},
                                {self.leader: held})

    async def _observe(self) -> AlignmentOutcome:
        _, header, _ = await self._receive({self.leader: {FINAL}})
        if header.get("error"):
            raise AlignmentError(header["error"], f"alignment on {self.node!r} (reported by leader {self.leader!r})")
        return AlignmentOutcome(header["size"], None)

    def _size_problem(self, size: int) -> Optional[str]:
        return size_problem(size, self.min_intersection)


def size_problem(size: int, min_intersection: int) -> Optional[str]:
    """Why `size` common samples cannot be trained on, or None."""
    if size == 0:
        return "the parties' sample ids have no sample in common (empty intersection)"
    if size < min_intersection:
        return f"the parties have {size} samples in common, fewer than alignment.min_intersection = {min_intersection}"
    return None
